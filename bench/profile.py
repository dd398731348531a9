"""Where a hot decision's CPU goes, by part: py-spy under wrk load, stacks sorted into parts.

    .venv/bin/pip install py-spy   # a diagnostic, not a dependency
    .venv/bin/python bench/profile.py [verify|authz] [--seconds 10] [--raw FILE] [--source SRC]

Runs the bench server (serve.py, SQLite, durable audit on) pinned to one core and wrk on
the other, samples the server with ``py-spy record --format raw`` (Python frames only:
``--native`` misleads on this kind of machine) and attributes each sample to the part of
the innermost frame that belongs to one: HTTP (uvicorn, the event loop's socket work),
middleware (the hot layer), JSON, hashing, decision, event bus, audit, detectors, metrics,
logging. Prints the share of each part and µs per request (CPU of the run / requests).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: (part, patterns on py-spy's frame text); the innermost frame that matches decides.
PARTS: list[tuple[str, tuple[str, ...]]] = [
    ("audit", ("audit/", "sqlite3", "segments.py")),
    ("detectors", ("engine.py", "detectors.py", "blocklist.py", "anomaly/")),
    ("metrics", ("metrics.py", "prometheus_client")),
    ("logging", ("logs.py", "structlog", "logging/")),
    ("event bus", ("events.py", "failures.py", "emit_access")),
    ("hashing", ("hashing.py", "hmac.py")),
    ("JSON", ("orjson", "json/", "json_nests_deeper", "pydantic")),
    (
        "decision",
        (
            "verify.py",
            "verification.py",
            "auth.py",
            "authz.py",
            "tokens/",
            "scopes.py",
            "model.py",
            "store.py",
            "sqlalchemy",
            "aiosqlite",
            "cache.py",
            "ratelimit",
        ),
    ),
    ("middleware", ("fastpath.py", "asgi.py", "middleware.py", "clientip.py")),
    ("HTTP", ("httptools_impl.py", "server.py", "flow_control.py", "uvloop", "runners.py")),
]


def part_of(stack: str) -> str:
    frames = stack.split(";")
    for frame in reversed(frames):
        for name, patterns in PARTS:
            if any(p in frame for p in patterns):
                return name
    return "other"


def breakdown(raw: Path) -> dict[str, int]:
    counts: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            counts[part_of(stack)] += int(count)
    return dict(counts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("route", choices=["verify", "authz"], nargs="?", default="verify")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--raw", help="keep py-spy's raw stacks in this file")
    parser.add_argument("--source", type=Path, help="profile another checkout's src folder")
    args = parser.parse_args()
    os.chdir(Path(__file__).parent)
    sys.path.insert(0, str(Path(__file__).parent))
    from common import (
        LOAD_CPUS,
        SERVER_CPUS,
        WRK,
        _pinned,
        cpu_seconds,
        free_port,
        tokenward,
        write_policy,
        write_verify_script,
    )

    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(args.raw) if args.raw else Path(tmp) / "raw.txt"
        port = free_port()
        admin: list[str] = []
        policy = write_policy(tmp, free_port())
        source = args.source.resolve() if args.source else None
        served = tokenward("api", port, policy, cpus=SERVER_CPUS, admin_out=admin, source=source)
        with served as (token, pid):
            url = f"http://127.0.0.1:{port}"
            load = [WRK, "-t1", "-c32", f"-d{args.seconds + 4}s"]
            if args.route == "verify":
                load += ["-s", write_verify_script(Path(tmp) / "v.lua", token, admin[0])]
                load.append(f"{url}/v1/verify")
            else:
                load += ["-H", f"Authorization: Bearer {token}", "-H", "X-Original-Method: GET"]
                load += ["-H", "X-Original-URI: /records/7", f"{url}/authz"]
            wrk = subprocess.Popen(
                load, stdout=subprocess.PIPE, text=True, preexec_fn=_pinned(LOAD_CPUS)
            )
            time.sleep(2)
            before = cpu_seconds([pid])
            subprocess.run(
                [
                    *(spy, "record", "--pid", str(pid), "--duration", str(args.seconds)),
                    *("--rate", "200", "--format", "raw", "--nonblocking", "--output", str(raw)),
                ],
                capture_output=True,
                check=True,
                preexec_fn=_pinned(LOAD_CPUS),
            )
            cpu = cpu_seconds([pid]) - before
            out = wrk.communicate()[0]
        rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
        per_request = cpu * 1e6 / (rps * args.seconds)
        parts = breakdown(raw)
    total = sum(parts.values()) or 1
    print(f"{args.route}: {rps:,.0f} req/s, {per_request:.1f} CPU µs per request")
    for name, count in sorted(parts.items(), key=lambda kv: -kv[1]):
        share = count / total
        print(f"  {name:<11} {100 * share:5.1f}%  {share * per_request:6.1f} µs")


if __name__ == "__main__":
    main()
