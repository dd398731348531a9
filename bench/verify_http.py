"""HTTP verification throughput: ``POST /v1/verify`` against a bare route, same server, one run.

    .venv/bin/python bench/http.py [--duration 5] [--connections 32]

Starts ``tokenward serve`` (SQLite, embedded default) pinned to CPU 0 and drives it with wrk
(Debian package) pinned to CPU 1. The bare route is ``GET /healthz`` on the same server stack
(a plain 200 JSON answer that touches nothing). The verify load uses a valid token with its
state cached, an admin credential as the caller, and a scope check.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from common import cpu_seconds, write_verify_script


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pinned(cpu: int, cmd: list[str]) -> list[str]:
    if shutil.which("taskset") and (os.cpu_count() or 1) > 1:
        return ["taskset", "-c", str(cpu), *cmd]
    return cmd


def wrk(
    url: str, duration: int, connections: int, script: Path | None = None, pid: int | None = None
) -> dict[str, float]:
    cmd = ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", url]
    if script is not None:
        cmd[1:1] = ["-s", str(script)]
    before = cpu_seconds([pid]) if pid else 0.0
    out = subprocess.run(pinned(1, cmd), capture_output=True, text=True, check=True).stdout
    cpu = cpu_seconds([pid]) - before if pid else 0.0
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]

    def pct(label: str) -> float:
        m = re.search(rf"{label}%\s+([\d.]+)(us|ms|s)", out)
        assert m, out
        return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]

    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return {
        "rps": rps,
        "p50": pct("50"),
        "p99": pct("99"),
        "errors": float(non2xx.group(1)) if non2xx else 0.0,
        "cpu_us": cpu * 1e6 / requests if requests else 0.0,
    }


def main(duration: int, connections: int, audit_mode: str) -> None:
    if not shutil.which("wrk"):
        sys.exit("wrk is not installed (Debian package 'wrk')")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENWARD_")}
        env["TOKENWARD_AUDIT_MODE"] = audit_mode
        init = subprocess.run(
            [sys.executable, "-m", "tokenward", "init", "--data-dir", str(data), "--json"],
            capture_output=True,
            text=True,
            check=True,
            env=env,
        )
        admin = json.loads(init.stdout)["admin_token"]
        port = free_port()
        server = subprocess.Popen(
            pinned(
                0,
                [
                    sys.executable,
                    "-m",
                    "tokenward",
                    "serve",
                    "--data-dir",
                    str(data),
                    "--port",
                    str(port),
                ],
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            for _ in range(200):
                try:
                    httpx.get(f"{base}/healthz", timeout=0.5)
                    break
                except httpx.HTTPError:
                    time.sleep(0.05)
            auth = {"Authorization": f"Bearer {admin}"}
            httpx.post(
                f"{base}/v1/projects", json={"name": "bench"}, headers=auth
            ).raise_for_status()
            created = httpx.post(
                f"{base}/v1/tokens",
                headers=auth,
                json={"project": "bench", "scopes": ["records:*"]},
            )
            token = created.json()["token"]
            script = Path(write_verify_script(Path(tmp) / "verify.lua", token, admin))
            body = json.dumps({"token": token, "scope": "records:read"})
            check = httpx.post(f"{base}/v1/verify", content=body, headers=auth).json()
            assert check["valid"], check
            wrk(f"{base}/healthz", 1, connections)  # warm up both paths
            wrk(f"{base}/v1/verify", 1, connections, script)
            bare = wrk(f"{base}/healthz", duration, connections, pid=server.pid)
            verify = wrk(f"{base}/v1/verify", duration, connections, script, pid=server.pid)
        finally:
            server.terminate()
            server.wait(10)
    print(f"audit mode: {audit_mode}")
    print(
        f"{'route':28} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>8} {'CPU us/req':>11}"
    )
    for name, r in (("GET /healthz (bare)", bare), ("POST /v1/verify", verify)):
        print(
            f"{name:28} {r['rps']:9,.0f} {r['p50']:8.2f} {r['p99']:8.2f} {r['errors']:8.0f}"
            f" {r['cpu_us']:11.1f}"
        )
    print(
        f"\nverify / bare route: {verify['rps'] / bare['rps']:.2f}x (target >= 0.6x), "
        f"{bare['cpu_us'] / verify['cpu_us']:.2f}x by CPU per request; "
        f"vs the peer library's ~1,600 req/s: {verify['rps'] / 1600:.1f}x (target >= 10x)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument(
        "--audit-mode",
        choices=["sync", "async"],
        default="sync",
        help="sync (default): each answer waits until its audit event is durable",
    )
    args = parser.parse_args()
    main(args.duration, args.connections, args.audit_mode)
