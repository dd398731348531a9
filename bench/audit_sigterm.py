"""SIGTERM mid-load: every acknowledged request has its audit event (0 lost).

    .venv/bin/python bench/audit_sigterm.py [--workers 64] [--after 2000]
        [--database-url postgresql+asyncpg://…] [--mode sync|async]

Starts ``tokenward serve``, sends ``POST /v1/verify`` from many concurrent clients, each
request with its own ``X-Request-ID``; after ``--after`` answers it sends SIGTERM and keeps
sending until the server is gone. Then it counts, in the database, the ``verify_api`` audit
events of the acknowledged requests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx
from sqlalchemy import select
from sqlalchemy.ext.asyncio import create_async_engine

from tokenward.audit.tables import audit_events
from tokenward.tokens.format import generate_token

PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def load(port: int, admin: str, server: subprocess.Popen[bytes], workers: int, after: int):
    acked: list[str] = []
    failed = 0
    stop = asyncio.Event()
    limits = httpx.Limits(max_connections=workers)
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}",
        headers={"Authorization": f"Bearer {admin}"},
        timeout=30,
        limits=limits,
    ) as client:

        async def worker(n: int) -> None:
            nonlocal failed
            i = 0
            while not stop.is_set():
                request_id = f"sigterm-{n}-{i}"
                i += 1
                try:
                    response = await client.post(
                        "/v1/verify",
                        json={"token": generate_token("live"), "ip": "198.51.100.1"},
                        headers={"X-Request-ID": request_id},
                    )
                except httpx.HTTPError:
                    failed += 1
                    return
                if response.status_code != 200:
                    failed += 1
                    return
                acked.append(request_id)

        tasks = [asyncio.create_task(worker(n)) for n in range(workers)]
        started = time.monotonic()
        while len(acked) < after and time.monotonic() - started < 60:
            await asyncio.sleep(0.01)
        at_signal = len(acked)
        server.send_signal(signal.SIGTERM)
        while server.poll() is None and time.monotonic() - started < 120:
            await asyncio.sleep(0.05)
        stop.set()
        await asyncio.gather(*tasks)
    return acked, at_signal, failed


async def count(url: str, acked: list[str]) -> tuple[int, int]:
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(
                select(audit_events.c.request_id).where(audit_events.c.source == "verify_api")
            )
            written = {r[0] for r in rows}
    finally:
        await engine.dispose()
    return len(written & set(acked)), len(written)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=64)
    parser.add_argument("--after", type=int, default=2000)
    parser.add_argument("--database-url")
    parser.add_argument("--mode", default="sync", choices=["sync", "async"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENWARD_")}
        env.update(
            TOKENWARD_DATA_DIR=tmp,
            TOKENWARD_SECRET_KEY=secrets.token_hex(32),
            TOKENWARD_ACCESS_LOG="false",
            TOKENWARD_AUDIT_MODE=args.mode,
        )
        url = f"sqlite+aiosqlite:///{tmp}/tokenward.db"
        if args.database_url:
            env["TOKENWARD_DATABASE_URL"] = url = args.database_url
        out = subprocess.run(
            [PY, "-m", "tokenward", "init", "--json"], env=env, capture_output=True, check=True
        )
        admin = json.loads(out.stdout)["admin_token"]
        port = free_port()
        server = subprocess.Popen(
            [PY, "-m", "tokenward", "serve", "--port", str(port)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(400):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        acked, at_signal, failed = asyncio.run(load(port, admin, server, args.workers, args.after))
        server.wait(timeout=60)
        found, written = asyncio.run(count(url, acked))
    lost = len(acked) - found
    print(
        f"audit mode {args.mode}, {args.workers} concurrent clients, SIGTERM after {at_signal} "
        f"answers\n"
        f"  requests acknowledged (200):         {len(acked)}\n"
        f"  their audit events written:          {found}\n"
        f"  lost:                                {lost}\n"
        f"  verify events written in total:      {written} "
        f"(includes requests answered as the server closed their connection)\n"
        f"  requests refused/cut by shutdown:    {failed}\n"
        f"  server exit status:                  {server.returncode}"
    )
    if lost:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
