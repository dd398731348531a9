"""The SQLite write-ahead log under a sustained full-rate audit load: does it stay bounded?

    .venv/bin/python bench/audit_wal.py [--seconds 120] [--submitters 64] [--readers 2]
                                        [--database-url postgresql+asyncpg://…/scratch]

The real audit writer (sync mode, as a loaded server runs it) is fed as fast as it takes
events by ``--submitters`` concurrent tasks, while ``--readers`` tasks read pages of the log
the way the dashboard and the API do. Every second it prints the events written so far, the
rate, and the size of the ``-wal`` file; at the end, the largest size seen. The bound the
writer keeps is documented in docs/audit.md ("Durability") and checked by
``tests/test_audit_wal.py`` over a shorter run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from tokenward.app import open_services
from tokenward.audit.query import AuditFilter, list_events
from tokenward.audit.records import AuditRecord
from tokenward.settings import Settings


async def run(seconds: float, submitters: int, readers: int, url: str | None) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="tw-wal-"))
    settings = Settings(
        data_dir=tmp,
        database_url=url or f"sqlite+aiosqlite:///{tmp / 'tokenward.db'}",
        secret_key=secrets.token_hex(32),
        anomaly_enabled=False,
        metrics_enabled=False,
    )
    services = await open_services(settings)
    writer = services.audit
    assert writer is not None
    wal = tmp / "tokenward.db-wal"
    stop = asyncio.Event()
    largest = 0

    async def submit() -> None:
        while not stop.is_set():
            await writer.submit(
                AuditRecord(
                    at=datetime.now(UTC),
                    kind="access",
                    action="access.verify_api",
                    source="verify_api",
                    request_id=f"req_{secrets.token_hex(8)}",
                    token_id="tok_benchbenchbench",
                    project_id="prj_bench",
                    decision="allow",
                    reason="ok",
                    client_ip="203.0.113.7",
                    user_agent="bench/1",
                    resource="/v1/verify",
                    method="POST",
                    latency_us=120,
                    detail={"kind": "api_key"},
                )
            )

    async def read() -> None:
        while not stop.is_set():
            await list_events(services.engine, AuditFilter(), limit=50)
            await asyncio.sleep(0.05)

    tasks = [asyncio.create_task(submit()) for _ in range(submitters)]
    tasks += [asyncio.create_task(read()) for _ in range(readers)]
    started = time.monotonic()
    last = 0
    while (elapsed := time.monotonic() - started) < seconds:
        await asyncio.sleep(1.0)
        size = wal.stat().st_size if wal.exists() else 0
        largest = max(largest, size)
        written = writer.written
        print(
            f"{elapsed:6.1f} s  {written:>9} events  {written - last:>7} /s"
            f"  wal {size / 2**20:8.1f} MiB",
            flush=True,
        )
        last = written
    stop.set()
    await asyncio.gather(*tasks)
    total = time.monotonic() - started
    print(
        f"{writer.written} events in {total:.0f} s ({writer.written / total:.0f}/s);"
        f" largest wal {largest / 2**20:.1f} MiB"
    )
    if url is None:
        print(f"database {os.path.getsize(tmp / 'tokenward.db') / 2**20:.0f} MiB")
    await services.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--submitters", type=int, default=64)
    parser.add_argument("--readers", type=int, default=2)
    parser.add_argument(
        "--database-url", help="e.g. a PostgreSQL database of its own: events/s only"
    )
    args = parser.parse_args()
    asyncio.run(run(args.seconds, args.submitters, args.readers, args.database_url))


if __name__ == "__main__":
    main()
