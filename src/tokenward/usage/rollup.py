"""The usage rollup: counts access events per minute and per hour, behind the audit writer.

The audit log is the source of truth; this task reads it incrementally and keeps the counts
that :mod:`tokenward.usage.query` answers from (a range query then reads a few thousand
rows instead of a million events). It never touches the writer: it reads each audit chain
(decision 0021) past its watermark, ``seq > usage_chains.seq``, in primary-key order, and
adds the counts (one ``INSERT … SELECT … GROUP BY … ON CONFLICT DO UPDATE`` per table: the
database aggregates) and moves the watermark **in one transaction**, so an event is counted once
even across crashes. The watermark row is updated first and only if it still holds the value
read (``WHERE seq = :old``): when two replicas tick at once, the second one's update finds
nothing to change (PostgreSQL makes it wait for the first one's commit) and it rolls back.

**Bounded work.** A tick reads at most ``batch`` events in all; the chains it looks at are
the ones that moved in the last day or that a recent checkpoint names (every writer
checkpoints its chain within seconds of writing), so idle chains of long-gone processes
cost nothing. On its first tick in a process it also lists every chain once (one index scan),
which picks up events written before the rollup existed: the migration path.

**Bounded size.** Minute rows older than ``minute_days`` and hour rows older than
``hour_days`` are deleted now and then; ``usage_chains`` has one row per audit chain.

**Lag.** Counts trail the audit log by at most one tick (``TOKENWARD_USAGE_ROLLUP_SECONDS``)
while the rollup keeps up; :meth:`UsageRollup.catch_up` runs ticks until nothing is left.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Table,
    cast,
    delete,
    extract,
    func,
    literal,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine

from tokenward.audit.tables import LEGACY_CHAIN, audit_chain_checkpoints, audit_events
from tokenward.usage.tables import PROJECT_TOTAL, usage_chains, usage_hours, usage_minutes

log = structlog.get_logger("tokenward.usage")

#: chains that moved within this long are read every tick
ACTIVE_FOR = timedelta(days=1)
#: checkpoints newer than the last discovery minus this name chains to read
DISCOVERY_MARGIN = timedelta(minutes=5)
PRUNE_EVERY = timedelta(minutes=10)


def epoch_minute(at: datetime) -> int:
    return int(at.timestamp()) // 60


class UsageRollup:
    def __init__(
        self,
        engine: AsyncEngine,
        clock: Callable[[], datetime],
        *,
        batch: int = 20_000,
        interval: float = 2.0,
        minute_days: int = 14,
        hour_days: int = 400,
    ) -> None:
        self.engine = engine
        self.clock = clock
        self.batch = batch
        self.interval = interval
        self.minute_days = minute_days
        self.hour_days = hour_days
        self._listed_all = False
        self._discovered_at: datetime | None = None
        self._pruned_at: datetime | None = None
        self._recent: set[str] = set()
        self._lock = asyncio.Lock()

    async def run_forever(self) -> None:
        while True:
            try:
                counted = await self.tick()
            except Exception as exc:  # a bad tick must not stop the rollup
                log.warning("usage_rollup_failed", error=type(exc).__name__)
                counted = 0
            if counted < self.batch:  # behind: go on at once, else wait a tick
                await asyncio.sleep(self.interval)

    async def catch_up(self, max_ticks: int = 1000) -> int:
        """Tick until a tick finds nothing left (tests, benchmarks, ``usage`` after a lull)."""
        total = 0
        for _ in range(max_ticks):
            counted = await self.tick()
            total += counted
            if counted == 0:
                break
        return total

    async def tick(self) -> int:
        """Count up to ``batch`` new events; the number of events read."""
        async with self._lock:
            now = self.clock()
            await self._discover(now)
            budget = self.batch
            read = 0
            for chain_id, seq in await self._chains(now):
                if budget <= 0:
                    break
                n = await self._roll_chain(chain_id, seq, budget, now)
                budget -= n
                read += n
            if self._pruned_at is None or now - self._pruned_at >= PRUNE_EVERY:
                await self.prune(now)
                self._pruned_at = now
            return read

    # -- which chains --------------------------------------------------------------------
    async def _discover(self, now: datetime) -> None:
        """Make a watermark row (at 0) for every chain not known yet."""
        async with self.engine.connect() as conn:
            if not self._listed_all:
                names = set(
                    (await conn.execute(select(audit_events.c.chain_id).distinct())).scalars()
                )
            else:
                since = (self._discovered_at or now) - DISCOVERY_MARGIN
                c = audit_chain_checkpoints.c
                query = select(c.chain_id).where(c.at >= since).distinct()
                names = set((await conn.execute(query)).scalars())
            known = set(
                (
                    await conn.execute(
                        select(usage_chains.c.chain_id).where(
                            usage_chains.c.chain_id.in_(sorted(names))
                        )
                    )
                ).scalars()
            )
        self._listed_all = True
        self._discovered_at = now
        new = sorted(names - known)
        if new:
            async with self.engine.begin() as conn:
                stmt = self._insert(usage_chains).on_conflict_do_nothing(
                    index_elements=["chain_id"]
                )
                await conn.execute(
                    stmt, [{"chain_id": name, "seq": 0, "updated_at": now} for name in new]
                )
        self._recent = names

    async def _chains(self, now: datetime) -> list[tuple[str, int]]:
        c = usage_chains.c
        query = (
            select(c.chain_id, c.seq)
            .where(or_(c.updated_at >= now - ACTIVE_FOR, c.chain_id.in_(sorted(self._recent))))
            .order_by(c.updated_at, c.chain_id)
        )
        async with self.engine.connect() as conn:
            return [(r.chain_id, r.seq) for r in (await conn.execute(query)).all()]

    # -- counting ------------------------------------------------------------------------
    def _epoch_seconds(self) -> ColumnElement[Any]:
        """The event's time in whole seconds since 1970, in SQL (the database counts)."""
        at = audit_events.c.at
        if self.engine.dialect.name == "postgresql":
            return cast(func.floor(extract("epoch", at)), BigInteger)
        return cast(func.strftime("%s", at), BigInteger)

    async def _roll_chain(self, chain_id: str, seq: int, budget: int, now: datetime) -> int:
        e = audit_events.c
        window = (
            select(e.seq)
            .where(e.chain_id == chain_id, e.seq > seq)
            .order_by(e.seq)
            .limit(budget)
            .subquery()
        )
        span = select(func.count(), func.max(window.c.seq))
        async with self.engine.connect() as conn:
            read, last = (await conn.execute(span)).one()
        if not read:
            return 0
        async with self.engine.begin() as conn:
            moved = await conn.execute(
                update(usage_chains)
                .where(usage_chains.c.chain_id == chain_id, usage_chains.c.seq == seq)
                .values(seq=last, updated_at=now)
            )
            if moved.rowcount != 1:  # another replica counted these meanwhile
                await conn.rollback()
                return 0
            for table, bucket, seconds in (
                (usage_minutes, "minute", 60),
                (usage_hours, "hour", 3600),
            ):
                for per_token in (True, False):
                    statement = self._count(table, bucket, seconds, chain_id, seq, last, per_token)
                    await conn.execute(statement)
        return int(read)

    def _count(
        self,
        table: Table,
        bucket: str,
        seconds: int,
        chain_id: str,
        lo: int,
        hi: int,
        per_token: bool,
    ) -> Any:
        """``INSERT … SELECT … GROUP BY … ON CONFLICT`` adding the events ``(lo, hi]`` of a
        chain to ``table``, per token or as the project's total (token ``*``): the database
        aggregates, nothing is carried through Python."""
        e = audit_events.c
        token = func.coalesce(e.token_id, "") if per_token else literal(PROJECT_TOTAL)
        keys = (
            (self._epoch_seconds() // seconds).label(bucket),
            func.coalesce(e.project_id, "").label("project_id"),
            token.label("token_id"),
            e.decision.label("decision"),
            func.coalesce(e.reason, "").label("reason"),
        )
        source = (
            select(*keys, func.count().label("count"))
            .where(
                e.chain_id == chain_id,
                e.seq > lo,
                e.seq <= hi,
                e.kind == "access",
                e.decision.is_not(None),
            )
            .group_by(*keys)
        )
        columns = [bucket, "project_id", "token_id", "decision", "reason", "count"]
        stmt = self._insert(table).from_select(columns, source)
        return stmt.on_conflict_do_update(
            index_elements=["project_id", "token_id", bucket, "decision", "reason"],
            set_={"count": table.c["count"] + stmt.excluded["count"]},
        )

    def _insert(self, table: Any) -> Any:
        dialect = postgresql if self.engine.dialect.name == "postgresql" else sqlite
        return dialect.insert(table)

    # -- bounds --------------------------------------------------------------------------
    async def prune(self, now: datetime) -> None:
        minute_floor = epoch_minute(now - timedelta(days=self.minute_days))
        hour_floor = epoch_minute(now - timedelta(days=self.hour_days)) // 60
        async with self.engine.begin() as conn:
            await conn.execute(delete(usage_minutes).where(usage_minutes.c.minute < minute_floor))
            await conn.execute(delete(usage_hours).where(usage_hours.c.hour < hour_floor))
            await conn.execute(
                delete(usage_chains).where(
                    usage_chains.c.updated_at < now - timedelta(days=self.hour_days),
                    usage_chains.c.chain_id != LEGACY_CHAIN,
                )
            )


def from_epoch_minute(minute: int) -> datetime:
    return datetime.fromtimestamp(minute * 60, UTC)
