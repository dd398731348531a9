"""Usage analytics on a million audit events: the rollup's pace and the query's p50/p95.

    .venv/bin/python bench/usage.py [--events 1000000] [--repeat 30] [--only sqlite|postgresql]

For SQLite (a temporary file) and PostgreSQL (a scratch database on
``TOKENWARD_BENCH_PG_URL``, default the local server's ``test`` database as admin, created
and dropped here), one run:

1. fills ``--events`` access events into ``audit_events`` (7 days, 3 projects, 60 tokens,
   4 writer chains, about 1 in 10 denied for one of four reasons), straight into the table;
2. runs the usage rollup until it has counted them all, and prints events/s;
3. runs each query shape ``--repeat`` times through :func:`tokenward.usage.usage` (what
   ``GET /v1/usage`` calls) and prints p50/p95 per shape and over all (target: p95 <= 200 ms),
   and the CPU a query spent (this process, where SQLite runs, and the PostgreSQL backends),
   which the load of a shared machine moves much less than the wall time;
4. for contrast, runs the widest shape once straight on the raw audit table (GROUP BY over
   the events), which the rollup exists to avoid.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import secrets
import sqlite3
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.engine import make_url

from tokenward.audit.tables import audit_events
from tokenward.store.engine import create_engine, migrate
from tokenward.usage import UsageFilter, UsageRollup, usage

PG_URL = os.environ.get(
    "TOKENWARD_BENCH_PG_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)
REASONS = ["insufficient_scope", "rate_limited", "expired", "ip_not_allowed"]
PROJECTS = ["prj_a", "prj_b", "prj_c"]
DAYS = 7
COLUMNS = [
    "chain_id",
    "seq",
    "id",
    "at",
    "kind",
    "action",
    "project_id",
    "token_id",
    "decision",
    "reason",
    "detail",
    "key_id",
    "prev_hash",
    "hash",
]


def events(n: int, end: datetime) -> list[tuple[object, ...]]:
    rnd = random.Random(7)
    tokens = [(PROJECTS[i % 3], f"tok_{i:04d}") for i in range(60)]
    chains = [secrets.token_hex(8) for _ in range(4)]
    start = end - timedelta(days=DAYS)
    span = DAYS * 86400
    rows: list[tuple[object, ...]] = []
    seqs = dict.fromkeys(chains, 0)
    for i in range(n):
        chain = chains[i % 4]
        seqs[chain] += 1
        project, token = tokens[int(rnd.paretovariate(1.2)) % 60]
        at = start + timedelta(seconds=span * i / n)
        denied = rnd.random() < 0.1
        rows.append(
            (
                chain,
                seqs[chain],
                f"evt_{i:08d}",
                at,
                "access",
                "verify",
                project,
                token,
                "deny" if denied else "allow",
                rnd.choice(REASONS) if denied else "ok",
                "{}",
                "bench",
                "0" * 64,
                "0" * 64,
            )
        )
    return rows


async def fill(url: str, rows: list[tuple[object, ...]]) -> None:
    if url.startswith("sqlite"):
        path = make_url(url).database
        assert path is not None
        db = sqlite3.connect(path)
        fmt = "%Y-%m-%d %H:%M:%S.%f"
        marks = ", ".join("?" * len(COLUMNS))
        db.executemany(
            f"INSERT INTO audit_events ({', '.join(COLUMNS)}) VALUES ({marks})",
            [(*r[:3], r[3].strftime(fmt), *r[4:]) for r in rows],  # type: ignore[attr-defined]
        )
        db.commit()
        db.close()
        return
    import asyncpg

    u = make_url(url)
    conn = await asyncpg.connect(host=u.host, port=u.port, user=u.username, database=u.database)
    try:
        await conn.copy_records_to_table(
            "audit_events",
            records=[(*r[:10], "{}", *r[11:]) for r in rows],
            columns=COLUMNS,
        )
        await conn.execute("ANALYZE")
    finally:
        await conn.close()


def shapes(end: datetime) -> list[tuple[str, UsageFilter, str, datetime]]:
    week, month, day = end - timedelta(days=7), end - timedelta(days=30), end - timedelta(days=1)
    return [
        ("project, hour, 7 days", UsageFilter(project_ids=["prj_a"]), "hour", week),
        ("project, day, 30 days", UsageFilter(project_ids=["prj_a"]), "day", month),
        ("project, minute, 24 h", UsageFilter(project_ids=["prj_b"]), "minute", day),
        ("token (busiest), minute, 24 h", UsageFilter(token_id="tok_0001"), "minute", day),
        ("token, hour, 7 days", UsageFilter(token_id="tok_0007"), "hour", week),
        ("everything, hour, 7 days", UsageFilter(), "hour", week),
        ("everything, minute, 24 h", UsageFilter(), "minute", day),
    ]


async def _backend_pid(engine: Any) -> list[int]:
    """The PostgreSQL backends of the pool's connections (their CPU counts too)."""
    if engine.dialect.name != "postgresql":
        return []
    query = text("SELECT pid FROM pg_stat_activity WHERE datname = current_database()")
    async with engine.connect() as conn:
        return [int(pid) for pid in (await conn.execute(query)).scalars()]


def _cpu(backends: list[int]) -> float:
    """CPU seconds of this process (SQLite runs in it) and of the PostgreSQL backends:
    what a query costs, whatever the neighbours on the machine do to its wall time."""
    spent = time.process_time()
    for pid in backends:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            spent += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return spent


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def run(name: str, url: str, n: int, repeat: int) -> None:
    engine = create_engine(url)
    await migrate(engine)
    end = datetime.now(UTC).replace(microsecond=0)
    rows = events(n, end)
    started = time.perf_counter()
    await fill(url, rows)
    print(f"{name}: filled {n:,} events in {time.perf_counter() - started:.1f} s")
    del rows
    rollup = UsageRollup(engine, lambda: end + timedelta(seconds=1))
    started = time.perf_counter()
    counted = await rollup.catch_up(max_ticks=10_000)
    took = time.perf_counter() - started
    print(f"{name}: rollup counted {counted:,} events in {took:.1f} s ({counted / took:,.0f}/s)")
    every: list[float] = []
    backend = await _backend_pid(engine)
    for label, filters, granularity, start in shapes(end):
        times = []
        cpu = []
        total = 0
        for _ in range(repeat):
            c0 = _cpu(backend)
            t0 = time.perf_counter()
            report = await usage(engine, filters, granularity, start, end, end)
            times.append((time.perf_counter() - t0) * 1000)
            cpu.append((_cpu(backend) - c0) * 1000)
            total = report.totals.requests
        every += times
        print(
            f"  {label:<32} p50 {pct(times, 0.5):7.1f} ms   p95 {pct(times, 0.95):7.1f} ms"
            f"   cpu p50 {pct(cpu, 0.5):6.1f} ms"
            f"   ({total:,} requests, {len(report.buckets)} buckets)"
        )
    p95 = pct(every, 0.95)
    verdict = "meets" if p95 <= 200 else "MISSES"
    print(f"  {'all shapes':<32} p50 {pct(every, 0.5):7.1f} ms   p95 {p95:7.1f} ms   {verdict}")
    e = audit_events.c
    raw = (
        select(e.decision, e.reason, func.count())
        .where(e.at >= end - timedelta(days=7), e.at < end, e.kind == "access")
        .group_by(e.decision, e.reason)
    )
    t0 = time.perf_counter()
    async with engine.connect() as conn:
        await conn.execute(raw)
    print(f"  raw audit table, 7 days, GROUP BY: {(time.perf_counter() - t0) * 1000:.0f} ms once")
    await engine.dispose()


async def _pg(statement: str) -> None:
    import asyncpg

    u = make_url(PG_URL)
    conn = await asyncpg.connect(host=u.host, port=u.port, user=u.username, database=u.database)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--only", choices=["sqlite", "postgresql"])
    args = parser.parse_args()
    if args.only != "postgresql":
        with tempfile.TemporaryDirectory() as tmp:
            url = f"sqlite+aiosqlite:///{Path(tmp) / 'usage.db'}"
            await run("SQLite", url, args.events, args.repeat)
    if args.only != "sqlite":
        name = f"tw_bench_usage_{secrets.token_hex(3)}"
        await _pg(f'CREATE DATABASE "{name}"')
        try:
            url = make_url(PG_URL).set(database=name).render_as_string(hide_password=False)
            await run("PostgreSQL", url, args.events, args.repeat)
        finally:
            await _pg(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    asyncio.run(main())
