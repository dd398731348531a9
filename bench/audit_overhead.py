"""Decisions per second with the audit log on vs off, in the same run (wrk, real server).

    .venv/bin/python bench/audit_overhead.py [--seconds 5] [--rounds 2] [--connections 32]
        [--database-url postgresql+asyncpg://…]

Each request is ``POST /v1/verify`` with a valid token: two decisions (the caller's
credential and the verified token), one audit event (the verified token's, naming the caller
as its actor). Rounds alternate off/on to spread
the machine's noise evenly over both. Prints requests/s, decisions/s and the on/off ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait(port: int) -> None:
    for _ in range(400):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit("server did not start")


def setup(data_dir: Path, env: dict[str, str]) -> tuple[str, str]:
    out = subprocess.run(
        [PY, "-m", "tokenward", "init", "--reset", "--json"],
        env=env,
        capture_output=True,
        check=True,
    )
    admin = json.loads(out.stdout)["admin_token"]
    port = free_port()
    proc = subprocess.Popen(
        [PY, str(HERE / "audit_serve.py"), str(data_dir), str(port), "on"], env=env
    )
    try:
        wait(port)
        with httpx.Client(
            base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {admin}"}
        ) as http:
            http.post("/v1/projects", json={"name": "bench"}).raise_for_status()
            token = http.post(
                "/v1/tokens", json={"project": "bench", "scopes": ["records:read"]}
            ).json()["token"]
    finally:
        proc.terminate()
        proc.wait()
    return admin, token


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads included."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_wrk(port: int, admin: str, token: str, seconds: int, connections: int) -> float:
    body = json.dumps({"token": token, "scope": "records:read", "ip": "203.0.113.7"})
    script = (
        'wrk.method = "POST"\n'
        f"wrk.body = '{body}'\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Authorization"] = "Bearer {admin}"\n'
        "function response(status, headers, body)\n"
        '  if status ~= 200 then error("status " .. status) end\n'
        "end\n"
    )
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as fh:
        fh.write(script)
    try:
        result = subprocess.run(
            [
                "wrk",
                "-t2",
                f"-c{connections}",
                f"-d{seconds}s",
                "-s",
                fh.name,
                f"http://127.0.0.1:{port}/v1/verify",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
    finally:
        os.unlink(fh.name)
    if "Non-2xx" in result.stdout or (
        "errors" in result.stdout.lower() and "read 0" not in result.stdout
    ):
        errors = re.search(r"Socket errors:.*|Non-2xx.*", result.stdout)
        if errors:
            print("  wrk:", errors.group(0))
    match = re.search(r"Requests/sec:\s+([\d.]+)", result.stdout)
    assert match, result.stdout
    return float(match.group(1))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--database-url")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = Path(tmp)
        env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENWARD_")}
        env.update(TOKENWARD_DATA_DIR=tmp, TOKENWARD_SECRET_KEY=secrets.token_hex(32))
        if args.database_url:
            env["TOKENWARD_DATABASE_URL"] = args.database_url
        admin, token = setup(data_dir, env)
        results: dict[str, list[float]] = {"off": [], "on": []}
        per_cpu: dict[str, list[float]] = {"off": [], "on": []}
        # Both servers run side by side and are loaded in turn, a few seconds each, so
        # that the machine's background noise falls on both alike.
        servers = {}
        for mode in ("off", "on"):
            port = free_port()
            proc = subprocess.Popen(
                [PY, str(HERE / "audit_serve.py"), tmp, str(port), mode],
                env=env,
                stderr=subprocess.DEVNULL,  # wrk hanging up at the end is logged
            )
            servers[mode] = (port, proc)
        try:
            for port, _ in servers.values():
                wait(port)
                run_wrk(port, admin, token, 1, args.connections)  # warm up
            for _ in range(args.rounds):
                for mode, (port, proc) in servers.items():
                    cpu = cpu_seconds(proc.pid)
                    rps = run_wrk(port, admin, token, args.seconds, args.connections)
                    cpu = cpu_seconds(proc.pid) - cpu
                    results[mode].append(rps)
                    per_cpu[mode].append(2 * rps * args.seconds / cpu)
                    print(
                        f"audit {mode:3}: {rps:8.0f} requests/s = {2 * rps:8.0f} decisions/s, "
                        f"{per_cpu[mode][-1]:8.0f} decisions per server CPU-second"
                    )
        finally:
            for _, proc in servers.values():
                proc.terminate()
                proc.wait()
        off = sum(results["off"]) / len(results["off"])
        on = sum(results["on"]) / len(results["on"])
        cpu_off = sum(per_cpu["off"]) / len(per_cpu["off"])
        cpu_on = sum(per_cpu["on"]) / len(per_cpu["on"])
        backend = "PostgreSQL" if args.database_url else "SQLite"
        print(
            f"\n{backend}, {args.connections} connections, {args.rounds}x{args.seconds}s each:\n"
            f"  audit off: {2 * off:8.0f} decisions/s\n"
            f"  audit on:  {2 * on:8.0f} decisions/s\n"
            f"  ratio on/off: {on / off:.2f}x\n"
            f"  per server CPU-second: off {cpu_off:.0f}, on {cpu_on:.0f} decisions,"
            f" ratio {cpu_on / cpu_off:.2f}x"
        )


if __name__ == "__main__":
    main()
