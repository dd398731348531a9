"""What a durable audit event costs, against what the throughput targets leave for it.

    .venv/bin/python bench/audit_floor.py [--events 20000] [--rounds 2]

The targets compare an audited decision with a bare answer on the same stack: ``/authz``
at >= 0.7x a bare ASGI endpoint, ``POST /v1/verify`` at >= 0.6x a bare route
(``/healthz``, through the same middleware). On one core, throughput is the inverse of CPU
per request, so a ratio r leaves ``bare * (1/r - 1)`` microseconds for everything a
decision adds: the credential checks, the policy, the answer, and its audit event.

One run prints:

1. Over HTTP (wrk, server pinned to one core), the CPU per request of the bare endpoint,
   the bare route, ``/authz`` and ``POST /v1/verify``, with the audit log on, and with the
   audit writer taken off the event bus (a diagnostic server only: tokenward itself never
   runs so). Rounds alternate on/off.
2. In process, on the same core, the CPU per event of the durable append alone: the real
   audit writer in sync mode (32 concurrent submitters, the way 32 connections feed it),
   and, under it, SQLite's own share (the same sealed rows, inserted and committed in
   batches of the size the writer made, with no Python around them).
3. Each target's budget next to the append's cost.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sqlite3
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import uvloop
from common import (
    LOAD_CPUS,
    SERVER_CPUS,
    Result,
    free_port,
    tokenward,
    write_policy,
    write_verify_script,
    wrk,
)


def http_round(audit: bool, tmp: str) -> dict[str, Result]:
    port = free_port()
    config = write_policy(tmp, free_port())
    admin: list[str] = []
    with tokenward("api", port, config, cpus=SERVER_CPUS, audit=audit, admin_out=admin) as (
        token,
        pid,
    ):
        base = f"http://127.0.0.1:{port}"
        script = write_verify_script(Path(tmp) / "verify.lua", token, admin[0])
        authz = {
            "Authorization": f"Bearer {token}",
            "X-Original-Method": "GET",
            "X-Original-URI": "/records/7",
        }
        wrk("warm-up", f"{base}/authz", authz, cpus=LOAD_CPUS)
        wrk("warm-up", f"{base}/v1/verify", cpus=LOAD_CPUS, script=script)
        return {
            "bare": wrk("bare", f"{base}/bare", None, [pid], cpus=LOAD_CPUS),
            "healthz": wrk("healthz", f"{base}/healthz", None, [pid], cpus=LOAD_CPUS),
            "authz": wrk("authz", f"{base}/authz", authz, [pid], cpus=LOAD_CPUS),
            "verify": wrk(
                "verify", f"{base}/v1/verify", None, [pid], cpus=LOAD_CPUS, script=script
            ),
        }


async def append_alone(events: int, data_dir: str) -> tuple[float, float, float]:
    """CPU µs per event of the writer, of SQLite under it, and the mean batch size."""
    os.environ["TOKENWARD_DATA_DIR"] = data_dir
    os.environ.setdefault("TOKENWARD_SECRET_KEY", secrets.token_hex(32))
    from tokenward.app import open_services
    from tokenward.events import AccessEvent
    from tokenward.service import TokenSpec, issue_bootstrap_record
    from tokenward.settings import Settings
    from tokenward.tokens.model import Reason
    from tokenward.verify import Decision

    services = await open_services(Settings.load())
    try:
        admin = issue_bootstrap_record(services.hasher, services.verifier.clock())
        await services.store.insert_token(admin.record, services.hasher.hash(admin.secret))
        await services.tokens.create_project(admin.record, "bench")
        issued = await services.tokens.create_token(
            admin.record, TokenSpec(project="bench", scopes=["records:read"])
        )
        writer = services.audit
        assert writer is not None
        decision = Decision(True, Reason.OK, issued.record)
        batches: list[int] = []
        observe = writer.observe

        def seen(n: int, seconds: float) -> None:
            batches.append(n)
            if observe is not None:
                observe(n, seconds)

        writer.observe = seen

        async def submitter(n: int) -> None:
            for i in range(n):
                await writer.access(
                    AccessEvent(
                        at=datetime.now(UTC),
                        source="verify_api",
                        decision=decision,
                        request_id=f"req_bench{i:08x}",
                        client_ip="203.0.113.7",
                        user_agent="wrk",
                        method="POST",
                        path="/v1/verify",
                        scope="records:read",
                        latency_ms=0.05,
                        actor_id=admin.record.id,
                    )
                )

        await asyncio.gather(*(submitter(200) for _ in range(32)))  # warm up
        batches.clear()
        per = events // 32
        started = time.process_time()
        await asyncio.gather(*(submitter(per) for _ in range(32)))
        writer_us = (time.process_time() - started) * 1e6 / (per * 32)
        mean_batch = sum(batches) / len(batches)
    finally:
        await services.close()
    return (
        writer_us,
        sqlite_share(Path(data_dir) / "tokenward.db", per * 32, round(mean_batch)),
        (mean_batch),
    )


def sqlite_share(db_path: Path, events: int, batch: int) -> float:
    """Insert the last ``events`` stored rows again (new sequence numbers and ids) into a copy
    of the table, in transactions of ``batch``, as the writer's connection does."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = sqlite3.connect(Path(tmp) / "copy.db", isolation_level=None)
        src = sqlite3.connect(db_path)
        schema = src.execute(
            "SELECT sql FROM sqlite_master WHERE tbl_name = 'audit_events' AND sql IS NOT NULL"
        ).fetchall()
        rows = src.execute(
            "SELECT * FROM audit_events ORDER BY at DESC LIMIT ?", (events,)
        ).fetchall()
        src.close()
        for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "wal_autocheckpoint=0"):
            copy.execute(f"PRAGMA {pragma}")
        for (sql,) in schema:
            copy.execute(sql)
        marks = ", ".join("?" * len(rows[0]))
        insert = f"INSERT INTO audit_events VALUES ({marks})"
        # (chain_id, seq, id, …): one chain of the writer's own, no head row to move.
        fresh = [("copy", n, f"evt_copy{n:012x}", *row[3:]) for n, row in enumerate(rows, 1)]
        started = time.process_time()
        for start in range(0, len(fresh), batch):
            chunk = fresh[start : start + batch]
            copy.execute("BEGIN IMMEDIATE")
            copy.executemany(insert, chunk)
            copy.execute("COMMIT")
        spent = time.process_time() - started
        copy.close()
    return spent * 1e6 / len(fresh)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=2, help="HTTP rounds (on/off each)")
    args = parser.parse_args()

    runs: dict[bool, list[dict[str, Result]]] = {True: [], False: []}
    order = [True, False, False, True] * ((args.rounds + 1) // 2)
    with tempfile.TemporaryDirectory() as tmp:
        for audit in order[: 2 * args.rounds]:
            runs[audit].append(http_round(audit, tmp))

    def cpu(audit: bool, route: str) -> float:
        return min(r[route].cpu_us or 0.0 for r in runs[audit])

    if SERVER_CPUS is not None:
        os.sched_setaffinity(0, SERVER_CPUS)
    with tempfile.TemporaryDirectory() as data_dir:
        writer_us, sqlite_us, batch = uvloop.run(append_alone(args.events, data_dir))

    bare, healthz = cpu(True, "bare"), cpu(True, "healthz")
    print("CPU per request over HTTP (µs, best of the rounds; server on one core):")
    print(f"  {'':34} {'audit on':>9} {'audit off':>10}")
    for route, label in (
        ("bare", "bare ASGI endpoint"),
        ("healthz", "bare route (/healthz)"),
        ("authz", "/authz allow"),
        ("verify", "POST /v1/verify"),
    ):
        print(f"  {label:34} {cpu(True, route):9.1f} {cpu(False, route):10.1f}")
    print("\nThe durable append alone, per event (µs of CPU, in process, one core):")
    print(f"  audit writer, sync, 32 submitters   {writer_us:6.1f}   (mean batch {batch:.0f})")
    print(f"  of which SQLite's insert + commit   {sqlite_us:6.1f}")
    print("\nBudgets (what a target leaves for everything a decision adds):")
    for label, base, target, route in (
        ("/authz >= 0.7x bare endpoint", bare, 0.7, "authz"),
        ("/v1/verify >= 0.6x bare route", healthz, 0.6, "verify"),
    ):
        budget = base * (1 / target - 1)
        added = cpu(True, route) - base
        added_off = cpu(False, route) - base
        print(
            f"  {label:32} budget {budget:5.1f} µs; the append alone {writer_us:5.1f} "
            f"(SQLite {sqlite_us:4.1f}); added now {added:5.1f}, without audit {added_off:5.1f}"
        )


if __name__ == "__main__":
    main()
