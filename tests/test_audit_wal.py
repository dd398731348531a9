"""The SQLite write-ahead log stays bounded under a sustained full-rate audit load
(DESIGN.md invariant 8; the bound is in docs/audit.md, "Durability")."""

from __future__ import annotations

import asyncio
import secrets
import time
from datetime import UTC, datetime

from tokenward.app import open_services
from tokenward.audit.chain import verify_chain
from tokenward.audit.query import AuditFilter, list_events
from tokenward.audit.records import AuditRecord, ChainKeys
from tokenward.settings import Settings

#: The documented bound on the ``-wal`` file (docs/audit.md).
WAL_BOUND = 64 * 2**20
SECONDS = 20.0


async def test_the_wal_stays_bounded_at_full_rate_with_readers(tmp_path):
    settings = Settings(
        data_dir=tmp_path,
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'tokenward.db'}",
        secret_key=secrets.token_hex(32),
        anomaly_enabled=False,
        metrics_enabled=False,
    )
    services = await open_services(settings)
    writer = services.audit
    assert writer is not None
    wal = tmp_path / "tokenward.db-wal"
    stop = asyncio.Event()
    reads = 0

    async def submit() -> None:
        while not stop.is_set():
            await writer.submit(
                AuditRecord(
                    at=datetime.now(UTC),
                    kind="access",
                    action="access.verify_api",
                    request_id=f"req_{secrets.token_hex(8)}",
                    token_id="tok_walwalwalwal",
                    project_id="prj_wal",
                    decision="allow",
                    reason="ok",
                    user_agent="wal-test/1",
                    detail={"kind": "api_key"},
                )
            )

    async def read() -> None:
        nonlocal reads
        while not stop.is_set():
            await list_events(services.engine, AuditFilter(), limit=50)
            reads += 1
            await asyncio.sleep(0.02)

    try:
        tasks = [asyncio.create_task(submit()) for _ in range(64)]
        tasks += [asyncio.create_task(read()) for _ in range(2)]
        sizes = []
        started = time.monotonic()
        while time.monotonic() - started < SECONDS:
            await asyncio.sleep(0.25)
            sizes.append(wal.stat().st_size if wal.exists() else 0)
        stop.set()
        await asyncio.gather(*tasks)
        rate = writer.written / (time.monotonic() - started)
        print(f"{writer.written} events ({rate:.0f}/s), {reads} reads, wal max {max(sizes)} B")
        # At full rate the log would grow ~30 MB/s without a checkpoint that keeps up.
        assert writer.written > 50_000
        assert reads > 50
        assert max(sizes) < WAL_BOUND, f"the WAL reached {max(sizes) / 2**20:.0f} MiB"
        report = await verify_chain(services.engine, ChainKeys.from_hasher(services.hasher))
        assert report.ok and report.checked == writer.written
    finally:
        await services.close()
