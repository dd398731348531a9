"""The audit writer: every event on the bus becomes one durable, chained row.

Group commit: events of many concurrent requests wait in one bounded queue; a single
writer task takes everything queued (up to ``batch_size``) and appends it to the chain in
one transaction. In ``sync`` mode (the default) the request that produced an event waits
until that transaction has committed, so nothing is acknowledged before it is durable. In
``async`` mode the request goes on as soon as its event is queued: faster, but a crash (not
a clean shutdown, which flushes) can lose what was queued.

A full queue applies back-pressure (``put`` waits); nothing is ever dropped. A database that
stays down fails the waiting requests closed (503) after ``give_up_after`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import structlog
from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from tokenward.audit.records import (
    GENESIS,
    AuditRecord,
    ChainKeys,
    from_access,
    from_admin,
    from_security,
)
from tokenward.audit.tables import audit_events, audit_head
from tokenward.errors import Unavailable
from tokenward.events import AccessEvent, AdminEvent, SecurityEvent

log = structlog.get_logger("tokenward.audit")

_Item = tuple[AuditRecord, "asyncio.Future[None] | None"]


class AuditWriter:
    """An event sink that appends every event to the hash-chained audit table."""

    def __init__(
        self,
        engine: AsyncEngine,
        keys: ChainKeys,
        *,
        mode: str = "sync",
        queue_size: int = 10_000,
        batch_size: int = 500,
        give_up_after: float = 10.0,
        observe: Callable[[int, float], None] | None = None,
    ) -> None:
        if mode not in ("sync", "async"):
            raise ValueError("audit mode must be 'sync' or 'async'")
        self.engine = engine
        self.keys = keys
        self.mode = mode
        self.batch_size = batch_size
        self.give_up_after = give_up_after
        #: called with (events written, seconds the transaction took) after each batch
        self.observe = observe
        self._queue: asyncio.Queue[_Item] = asyncio.Queue(maxsize=queue_size)
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self.written = 0

    # -- the event sink -------------------------------------------------------------------
    async def access(self, event: AccessEvent) -> None:
        await self.submit(from_access(event))

    async def admin(self, event: AdminEvent) -> None:
        await self.submit(from_admin(event))

    async def security(self, event: SecurityEvent) -> None:
        await self.submit(from_security(event))

    @property
    def depth(self) -> int:
        """Events queued and not yet written."""
        return self._queue.qsize()

    async def submit(self, record: AuditRecord) -> None:
        """Queue ``record``; in sync mode, return only once it is committed."""
        if self._closed:
            raise Unavailable("audit_unavailable", "the audit log is shutting down")
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="tokenward-audit-writer")
        future: asyncio.Future[None] | None = None
        if self.mode == "sync":
            future = asyncio.get_running_loop().create_future()
        await self._queue.put((record, future))  # waits while the queue is full
        if future is not None:
            # Shielded: a client that hangs up does not un-write its event.
            await asyncio.shield(future)

    async def flush(self) -> None:
        """Wait until everything queued so far is written."""
        if self._task is not None and not self._task.done():
            await self._queue.join()

    async def close(self) -> None:
        """Refuse new events, write everything queued, stop the writer task."""
        self._closed = True
        await self.flush()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    # -- the writer task ------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self.batch_size:
                try:
                    batch.append(self._queue.get_nowait())
                except asyncio.QueueEmpty:
                    break
            try:
                await self._write_with_retry([record for record, _ in batch])
            except Exception as exc:
                error = Unavailable("audit_unavailable", "the audit log cannot be written")
                for _, future in batch:
                    if future is not None and not future.done():
                        future.set_exception(error)
                log.error("audit_write_failed", events=len(batch), error=type(exc).__name__)
            else:
                for _, future in batch:
                    if future is not None and not future.done():
                        future.set_result(None)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _write_with_retry(self, records: list[AuditRecord]) -> None:
        started = time.monotonic()
        delay = 0.05
        while True:
            try:
                await self.append(records)
                return
            except (SQLAlchemyError, OSError, TimeoutError) as exc:
                waited = time.monotonic() - started
                # In async mode nobody waits for an answer: keep trying (the full queue
                # pushes back on new requests meanwhile) rather than lose events.
                if self.mode == "sync" and waited > self.give_up_after:
                    raise
                log.warning("audit_write_retry", error=type(exc).__name__, waited=round(waited, 2))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def append(self, records: list[AuditRecord]) -> None:
        """Append ``records`` to the chain in one transaction (the group commit)."""
        started = time.perf_counter()
        async with self.engine.begin() as conn:
            seq, prev = await _lock_head(conn)
            key_id = self.keys.current_id
            rows: list[dict[str, Any]] = []
            for record in records:
                seq += 1
                values = record.values()
                digest = self.keys.hash(key_id, prev, values)
                rows.append(
                    {**values, "seq": seq, "key_id": key_id, "prev_hash": prev, "hash": digest}
                )
                prev = digest
            await conn.execute(insert(audit_events), rows)
            await conn.execute(
                update(audit_head).where(audit_head.c.id == 1).values(seq=seq, hash=prev)
            )
        self.written += len(records)
        if self.observe is not None:
            self.observe(len(records), time.perf_counter() - started)


async def _lock_head(conn: AsyncConnection) -> tuple[int, str]:
    """Lock the chain head for this transaction and read it (creating it on first use)."""
    for _ in range(3):
        # A no-op update takes the row lock (PostgreSQL) or the write lock (SQLite) first,
        # so two writers, in one process or many, never append from the same head.
        result = await conn.execute(
            update(audit_head).where(audit_head.c.id == 1).values(seq=audit_head.c.seq)
        )
        if result.rowcount == 1:
            row = (await conn.execute(select(audit_head.c.seq, audit_head.c.hash))).one()
            return int(row.seq), str(row.hash)
        last = (
            await conn.execute(
                select(audit_events.c.seq, audit_events.c.hash)
                .order_by(audit_events.c.seq.desc())
                .limit(1)
            )
        ).first()
        seq, digest = (int(last.seq), str(last.hash)) if last else (0, GENESIS)
        try:
            async with conn.begin_nested():
                await conn.execute(insert(audit_head).values(id=1, seq=seq, hash=digest))
        except IntegrityError:
            continue  # another writer created it first: lock theirs
    raise RuntimeError("could not lock the audit chain head")
