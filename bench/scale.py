"""Scale-out: nginx in front of 1, 2 and 3 replicas (and 1 replica of 2 workers) on
PostgreSQL + Redis, the layout of docs/operations.md, started natively.

    .venv/bin/python bench/scale.py [--duration 8]

Every tokenward process runs ``tokenward serve`` as an operator runs it, pinned to the
server CPU; nginx (keep-alive to the replicas), wrk, PostgreSQL and Redis run on the other.
The load is ``POST /v1/verify`` of one cached token through nginx. For each layout it prints
requests/s, the CPU all tokenward processes spent per request together (on a 2-core machine
throughput cannot grow much: CPU per request is what shows a serialisation point), and how
often PostgreSQL backends were seen waiting on a lock while it ran (sampled from
``pg_stat_activity`` every 50 ms): a shared audit head row shows up there as
``Lock:transactionid``.

Needs PostgreSQL (``BENCH_PG_URL``, default the local server as ``postgres``), Redis
(``BENCH_REDIS_URL``), nginx and wrk.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
from common import LOAD_CPUS, SERVER_CPUS, _pinned, cpu_seconds, nginx, write_verify_script, wrk

PG_URL = os.environ.get("BENCH_PG_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")


async def _pg(statement: str, database: str | None = None) -> list[tuple[object, ...]]:
    import asyncpg

    url = PG_URL if database is None else PG_URL.rsplit("/", 1)[0] + "/" + database
    conn = await asyncpg.connect(url)
    try:
        return [tuple(r) for r in await conn.fetch(statement)]
    finally:
        await conn.close()


class LockSampler(threading.Thread):
    """Counts the backends of ``database`` seen waiting on a lock, by wait event."""

    def __init__(self, database: str) -> None:
        super().__init__(daemon=True)
        self.database = database
        self.waits: Counter[str] = Counter()
        self.samples = 0
        self.stop = threading.Event()

    def run(self) -> None:
        async def loop() -> None:
            import asyncpg

            conn = await asyncpg.connect(PG_URL)
            try:
                while not self.stop.is_set():
                    rows = await conn.fetch(
                        "SELECT wait_event_type, wait_event FROM pg_stat_activity "
                        "WHERE datname = $1 AND wait_event_type = 'Lock'",
                        self.database,
                    )
                    self.samples += 1
                    for row in rows:
                        self.waits[f"{row[0]}:{row[1]}"] += 1
                    await asyncio.sleep(0.05)
            finally:
                await conn.close()

        asyncio.run(loop())


@contextlib.contextmanager
def replicas(
    env: dict[str, str], count: int, workers: int
) -> Iterator[tuple[list[int], list[int]]]:
    """``count`` servers of ``workers`` processes each; their ports and their top pids."""
    procs: list[subprocess.Popen[str]] = []
    ports: list[int] = []
    try:
        for _ in range(count):
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tokenward",
                    "serve",
                    "--port",
                    "0",
                    "--workers",
                    str(workers),
                ],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
                preexec_fn=_pinned(SERVER_CPUS),
            )
            procs.append(proc)
            assert proc.stdout is not None
            line = proc.stdout.readline()
            match = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
            assert match, f"a replica did not start: {line!r}"
            ports.append(int(match.group(1)))
        for port in ports:
            deadline = time.monotonic() + 30
            while not _ready(port):
                assert time.monotonic() < deadline, f"replica on {port} not ready"
                time.sleep(0.1)
        time.sleep(1.0 if workers > 1 else 0.2)
        yield ports, [p.pid for p in procs]
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(40)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


def _ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200
    except httpx.HTTPError:
        return False


def process_tree(pids: list[int]) -> list[int]:
    found = list(pids)
    for pid in pids:
        children = Path(f"/proc/{pid}/task/{pid}/children")
        with contextlib.suppress(FileNotFoundError):
            found += [int(c) for c in children.read_text().split()]
    return found


def main(duration: int) -> None:
    os.environ["BENCH_DURATION"] = f"{duration}s"
    database = f"tw_bench_scale_{secrets.token_hex(3)}"
    asyncio.run(_pg(f'CREATE DATABASE "{database}"'))
    try:
        run(database)
    finally:
        asyncio.run(_pg(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))


def run(database: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        pg = PG_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("TOKENWARD_")},
            "TOKENWARD_DATA_DIR": tmp,
            "TOKENWARD_DATABASE_URL": f"{pg}/{database}",
            "TOKENWARD_REDIS_URL": REDIS_URL,
            "TOKENWARD_REDIS_PREFIX": f"twbench-{secrets.token_hex(3)}:",
            "TOKENWARD_ACCESS_LOG": "false",
        }
        init = subprocess.run(
            [sys.executable, "-m", "tokenward", "init", "--json"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        admin = json.loads(init.stdout)["admin_token"]
        layouts = [(1, 1), (2, 1), (3, 1), (1, 2)]
        results = []
        for count, workers in layouts:
            with replicas(env, count, workers) as (ports, pids):
                base = f"http://127.0.0.1:{ports[0]}"
                headers = {"Authorization": f"Bearer {admin}"}
                project = f"p{secrets.token_hex(3)}"
                httpx.post(f"{base}/v1/projects", json={"name": project}, headers=headers)
                created = httpx.post(
                    f"{base}/v1/tokens",
                    json={"project": project, "scopes": ["records:read"]},
                    headers=headers,
                ).json()
                script = write_verify_script(Path(tmp) / "verify.lua", created["token"], admin)
                lb = _free_port()
                servers = " ".join(f"server 127.0.0.1:{p};" for p in ports)
                conf = (
                    f"upstream tw {{ {servers} keepalive 64; }}"
                    f" server {{ listen 127.0.0.1:{lb}; keepalive_requests 100000;"
                    " location / { proxy_pass http://tw; proxy_http_version 1.1;"
                    ' proxy_set_header Connection ""; } }'
                )
                with nginx(conf, lb, cpus=LOAD_CPUS):
                    url = f"http://127.0.0.1:{lb}/v1/verify"
                    wrk("warm-up", url, cpus=LOAD_CPUS, script=script)
                    sampler = LockSampler(database)
                    sampler.start()
                    tree = process_tree(pids)
                    before = cpu_seconds(tree)
                    result = wrk(
                        f"{count} replica(s) x {workers} worker(s)",
                        url,
                        cpus=LOAD_CPUS,
                        script=script,
                    )
                    spent = cpu_seconds(tree) - before
                    sampler.stop.set()
                    sampler.join()
                result.cpu_us = spent * 1e6 / max(result.requests, 1)
                results.append((result, sampler))
                print(
                    result.line(),
                    f"  lock waits seen: {sum(sampler.waits.values())} "
                    f"in {sampler.samples} samples {dict(sampler.waits) or ''}",
                    flush=True,
                )
        base_cpu = results[0][0].cpu_us or 1.0
        print()
        for result, _ in results:
            cpu = result.cpu_us or 0.0
            print(
                f"{result.name:<28} CPU per request {cpu:6.1f} us = {cpu / base_cpu:.2f}x "
                f"one replica (target: within 1.15x)"
            )


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--duration", type=int, default=8)
    main(parser.parse_args().duration)
