"""One audit chain per writer (decision 0021): writers that never wait on each other, chains
tied together by checkpoints, and the single chain of earlier releases migrated."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import secrets
import threading
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from sqlalchemy import delete, func, select, update
from sqlalchemy.engine import make_url

from tests.conftest import PG_ADMIN_URL, truncate_all
from tokenward.app import Services, open_services
from tokenward.audit.chain import parse_anchor, verify_chain
from tokenward.audit.query import AuditFilter, list_events
from tokenward.audit.records import GENESIS, AuditRecord, ChainKeys, canonical
from tokenward.audit.tables import audit_chain_checkpoints, audit_events
from tokenward.settings import Settings
from tokenward.store.engine import MIGRATIONS, create_engine, migrate
from tokenward.store.tables import UTCDateTime


def keys(services: Services) -> ChainKeys:
    return ChainKeys.from_hasher(services.hasher)


@contextlib.asynccontextmanager
async def two_writers(settings: Settings) -> AsyncIterator[tuple[Services, Services]]:
    """Two replicas on one database (which starts empty), each with its own writer."""
    a = await open_services(settings)
    await truncate_all(a)
    b = await open_services(settings)
    for s in (a, b):
        assert s.audit is not None
        s.audit.checkpoint_every = 0.2
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


async def burst(services: Services, label: str, seconds: float, submitters: int = 16) -> int:
    writer = services.audit
    assert writer is not None
    deadline = asyncio.get_running_loop().time() + seconds
    count = 0

    async def one() -> None:
        nonlocal count
        while asyncio.get_running_loop().time() < deadline:
            await writer.submit(
                AuditRecord(at=datetime.now(UTC), kind="admin", action=label, detail={"n": "x"})
            )
            count += 1

    await asyncio.gather(*(one() for _ in range(submitters)))
    return count


async def test_two_writers_append_concurrently_and_never_wait_on_each_other(settings):
    async with two_writers(settings) as (a, b):
        assert a.audit is not None and b.audit is not None
        assert a.audit.chain_id != b.audit.chain_id
        postgres = a.engine.dialect.name == "postgresql"
        sampler = Sampler(settings.resolved_database_url) if postgres else None
        written = await asyncio.gather(burst(a, "from-a", 2.0), burst(b, "from-b", 2.0))
        if sampler is not None:
            waits, blocked = sampler.stop()
            assert len(waits) > 20, "the writers' sessions were hardly seen"
            # Never a row or transaction lock: there is no row, and no lock, that two chains
            # share (the head row made every writer wait on Lock:transactionid). What one
            # table still shares is physical: growing its files (Lock:extend, microseconds)
            # and the server's WAL flush (LWLock:WALWrite).
            print(collections.Counter(waits))
            assert not [w for w in waits if w[0] == "Lock" and w[1] != "extend"], waits
            assert blocked == 0
        await a.audit.flush()
        await b.audit.flush()
        report = await verify_chain(a.engine, keys(a))
        assert report.ok, report.public()
        mine = {c.chain_id: c for c in report.chains}
        assert mine[a.audit.chain_id].checked == written[0] > 100
        assert mine[b.audit.chain_id].checked == written[1] > 100
        # Each chain's checkpoints saw the other chain.
        async with a.engine.connect() as conn:
            marks = (await conn.execute(select(audit_chain_checkpoints))).all()
        assert any(b.audit.chain_id in m.witness for m in marks if m.chain_id == a.audit.chain_id)
        assert any(a.audit.chain_id in m.witness for m in marks if m.chain_id == b.audit.chain_id)
        # The reads merge both chains in time order.
        page = await list_events(a.engine, AuditFilter(kind="admin"), limit=1000, order="asc")
        assert {e.chain_id for e in page.events} == {a.audit.chain_id, b.audit.chain_id}
        positions = [(e.values["at"], e.chain_id, e.seq) for e in page.events]
        assert positions == sorted(positions)
    # Closing wrote each chain's final checkpoint.
    async with open_services_and_close(settings) as s:
        report = await verify_chain(s.engine, keys(s))
        statuses = {c.chain_id: c.public()["status"] for c in report.chains}
        assert statuses[a.audit.chain_id] == statuses[b.audit.chain_id] == "closed"


class Sampler:
    """What the writers' PostgreSQL sessions wait on, sampled every few milliseconds from
    a thread of its own (the test's loop is busy feeding the writers)."""

    def __init__(self, url: str) -> None:
        self.url = make_url(url)
        self.waits: list[tuple[Any, ...]] = []
        self.blocked = 0
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self._thread.start()
        assert self._ready.wait(10)

    async def _run(self) -> None:
        import asyncpg

        u = self.url
        conn = await asyncpg.connect(
            host=u.host, port=u.port or 5432, user=u.username, database=u.database
        )
        self._ready.set()
        try:
            while not self._stop.is_set():
                rows = await conn.fetch(
                    "SELECT wait_event_type, wait_event FROM pg_stat_activity"
                    " WHERE application_name = 'tokenward-audit-writer'"
                    " AND datname = current_database()"
                )
                self.waits.extend(tuple(r) for r in rows)
                self.blocked += await conn.fetchval(
                    "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity s ON s.pid = l.pid"
                    " WHERE NOT l.granted AND l.locktype <> 'extend'"
                    " AND s.application_name = 'tokenward-audit-writer'"
                )
                await asyncio.sleep(0.005)
        finally:
            await conn.close()

    def stop(self) -> tuple[list[tuple[Any, ...]], int]:
        self._stop.set()
        self._thread.join(10)
        return self.waits, self.blocked


@contextlib.asynccontextmanager
async def open_services_and_close(settings: Settings) -> AsyncIterator[Services]:
    s = await open_services(settings)
    try:
        yield s
    finally:
        await s.close()


async def test_pages_over_two_chains_see_every_event_once(settings):
    async with two_writers(settings) as (a, b):
        assert a.audit is not None and b.audit is not None
        at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
        # Same times on both chains: the order falls back on (chain, seq).
        await asyncio.gather(
            a.audit.append([AuditRecord(at=at, kind="admin", action="p") for _ in range(7)]),
            b.audit.append([AuditRecord(at=at, kind="admin", action="p") for _ in range(6)]),
        )
        for order in ("desc", "asc"):
            seen, cursor = [], None
            while True:
                page = await list_events(
                    a.engine, AuditFilter(action="p"), limit=4, cursor=cursor, order=order
                )
                seen += [(e.chain_id, e.seq) for e in page.events]
                if page.next_cursor is None:
                    break
                cursor = page.next_cursor
            assert len(seen) == len(set(seen)) == 13


async def test_verify_notices_a_chain_removed_whole(settings):
    async with two_writers(settings) as (a, b):
        assert a.audit is not None and b.audit is not None
        await b.audit.append([AuditRecord(at=datetime.now(UTC), kind="admin", action="b")] * 3)
        await asyncio.sleep(0.3)  # b's checkpoint is older than a's first one: a sees it
        await a.audit.append([AuditRecord(at=datetime.now(UTC), kind="admin", action="a")] * 3)
        gone = b.audit.chain_id
        assert (await verify_chain(a.engine, keys(a))).ok
        async with a.engine.begin() as conn:
            await conn.execute(delete(audit_events).where(audit_events.c.chain_id == gone))
            await conn.execute(
                delete(audit_chain_checkpoints).where(audit_chain_checkpoints.c.chain_id == gone)
            )
        report = await verify_chain(a.engine, keys(a))
        assert not report.ok and report.chain(gone).problem == "removed"
        assert report.chain(a.audit.chain_id).ok


async def test_verify_notices_a_tail_cut_with_its_own_checkpoints(settings):
    """Chain b's newest events and checkpoints are gone; chain a's checkpoint saw them."""
    async with two_writers(settings) as (a, b):
        assert a.audit is not None and b.audit is not None
        now = datetime.now(UTC)
        await b.audit.append([AuditRecord(at=now, kind="admin", action="b")] * 5)
        await asyncio.sleep(0.3)
        await a.audit.append([AuditRecord(at=now, kind="admin", action="a")] * 2)
        chain = b.audit.chain_id
        async with a.engine.begin() as conn:
            c = audit_events.c
            await conn.execute(delete(audit_events).where(c.chain_id == chain, c.seq > 2))
            await conn.execute(
                delete(audit_chain_checkpoints).where(audit_chain_checkpoints.c.chain_id == chain)
            )
        report = await verify_chain(a.engine, keys(a))
        assert report.chain(chain).problem == "truncated"
        assert report.chain(chain).first_bad_seq == 3


async def test_an_edited_checkpoint_is_caught(settings):
    async with two_writers(settings) as (a, _b):
        assert a.audit is not None
        await a.audit.append([AuditRecord(at=datetime.now(UTC), kind="admin", action="x")] * 4)
        async with a.engine.begin() as conn:
            await conn.execute(update(audit_chain_checkpoints).values(seq=2))
        report = await verify_chain(a.engine, keys(a))
        assert report.chain(a.audit.chain_id).problem == "edited"


async def test_a_crashed_writer_leaves_an_open_chain_with_an_unverified_tail(settings):
    async with two_writers(settings) as (a, _b):
        assert a.audit is not None
        a.audit.checkpoint_every = 3600.0  # only the first batch is checkpointed
        await a.audit.append([AuditRecord(at=datetime.now(UTC), kind="admin", action="x")] * 2)
        await a.audit.append([AuditRecord(at=datetime.now(UTC), kind="admin", action="y")] * 3)
        chain = (await verify_chain(a.engine, keys(a))).chain(a.audit.chain_id)
        assert chain.ok and chain.public()["status"] == "open" and chain.unverified == 3


async def test_a_writer_that_reconnects_continues_its_own_chain(settings):
    async with two_writers(settings) as (a, _b):
        writer = a.audit
        assert writer is not None
        await writer.append([AuditRecord(at=datetime.now(UTC), kind="admin", action="x")] * 2)
        writer.head = None  # what a new connection knows: the database tells it the head
        task = writer._task
        assert task is not None
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await writer.append([AuditRecord(at=datetime.now(UTC), kind="admin", action="y")] * 2)
        report = await verify_chain(a.engine, keys(a))
        assert report.ok and report.chain(writer.chain_id).checked == 4


# -- the migration of the single chain of earlier releases --------------------------------
def _upgrade_to(connection: sa.Connection, target: str) -> None:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    command.upgrade(config, target)


_LEGACY = sa.Table(
    "audit_events",
    sa.MetaData(),
    sa.Column("seq", sa.Integer),
    *(
        sa.Column(n, UTCDateTime() if n == "at" else sa.JSON if n == "detail" else sa.String)
        for n in (
            "id",
            "at",
            "kind",
            "source",
            "request_id",
            "project_id",
            "environment",
            "actor_id",
            "token_id",
            "principal",
            "action",
            "method",
            "resource",
            "scope",
            "decision",
            "reason",
            "client_ip",
            "user_agent",
            "fingerprint",
            "detail",
            "key_id",
            "prev_hash",
            "hash",
        )
    ),
    sa.Column("latency_us", sa.BigInteger),
)


@pytest.fixture(params=["sqlite", "postgresql"])
async def fresh_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'old.db'}"
        return
    import asyncpg

    name = f"tw_migrate_{secrets.token_hex(4)}"
    admin = make_url(PG_ADMIN_URL)
    conn = await asyncpg.connect(host=admin.host, port=admin.port or 5432, user=admin.username)
    await conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield admin.set(database=name).render_as_string(hide_password=False)
    finally:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.close()


async def test_the_single_chain_of_earlier_releases_becomes_the_legacy_chain(fresh_url, tmp_path):
    settings = Settings(data_dir=tmp_path, database_url=fresh_url, secret_key=secrets.token_hex(32))
    engine = create_engine(fresh_url)
    chain_keys = None
    try:
        async with engine.begin() as conn:
            await conn.run_sync(_upgrade_to, "0004_audit")  # the audit tables as they were
        from tokenward.settings import load_hasher

        chain_keys = ChainKeys.from_hasher(load_hasher(settings))
        prev, rows = GENESIS, []
        start = datetime(2026, 3, 1, tzinfo=UTC)
        for seq in range(1, 6):
            values = AuditRecord(
                at=start + timedelta(minutes=seq), kind="admin", action=f"old.{seq}"
            ).values()
            key_id = chain_keys.current_id
            digest = chain_keys.hash_canonical(key_id, prev, canonical(values))
            rows.append({"seq": seq, **values, "key_id": key_id, "prev_hash": prev, "hash": digest})
            prev = digest
        async with engine.begin() as conn:
            await conn.execute(_LEGACY.insert(), rows)
            await conn.execute(
                sa.text("INSERT INTO audit_head (id, seq, hash) VALUES (1, 5, :h)"), {"h": prev}
            )
        await migrate(engine)
        report = await verify_chain(engine, chain_keys, anchor=parse_anchor(f"5:{prev}"))
        legacy = report.chain("legacy")
        assert report.ok and legacy.checked == 5 and legacy.closed
        async with engine.connect() as conn:
            tables = await conn.run_sync(lambda c: sa.inspect(c).get_table_names())
        assert "audit_head" not in tables
    finally:
        await engine.dispose()

    services = await open_services(settings)  # a writer of this release goes on beside it
    try:
        assert services.audit is not None
        await services.audit.append([AuditRecord(at=datetime.now(UTC), kind="admin", action="new")])
        page = await list_events(services.engine, AuditFilter(kind="admin"), limit=100)
        assert [e.values["action"] for e in page.events][-1] == "old.1"
        report = await verify_chain(services.engine, chain_keys)
        assert report.ok and len(report.chains) == 2
        async with services.engine.begin() as conn:
            await conn.execute(
                update(audit_events)
                .where(audit_events.c.chain_id == "legacy", audit_events.c.seq == 3)
                .values(action="forged")
            )
        report = await verify_chain(services.engine, chain_keys)
        assert report.chain("legacy").problem == "edited"
        async with services.engine.connect() as conn:
            count = (await conn.execute(select(func.count()).select_from(audit_events))).scalar()
        assert count >= 6
    finally:
        await services.close()


async def test_the_verify_api_reports_every_chain_and_takes_anchors(services, admin, api):
    assert services.audit is not None
    await api.post("/v1/projects", json={"name": "anchored"})
    body = (await api.get("/v1/audit/verify")).json()
    assert body["ok"] and [c["chain"] for c in body["chains"]] == [services.audit.chain_id]
    [head] = body["heads"]
    again = await api.get("/v1/audit/verify", params={"anchor": head})
    assert again.status_code == 200 and again.json()["ok"]
    chain, _, digest = head.split(":")
    ahead = await api.get("/v1/audit/verify", params={"anchor": f"{chain}:999:{digest}"})
    assert ahead.json()["problem"] == "truncated"
    bad = await api.get("/v1/audit/verify", params={"anchor": "nonsense"})
    assert bad.status_code == 422
