"""The audit writer: every event on the bus becomes one durable, chained row.

Group commit: events of many concurrent requests wait in one bounded queue; a single
writer task takes everything queued and appends it to the chain in transactions of up to
``batch_size`` events. In ``sync`` mode (the default) the request that produced an event waits
until that transaction has committed, so nothing is acknowledged before it is durable. In
``async`` mode the request goes on as soon as its event is queued: faster, but a crash (not
a clean shutdown, which flushes) can lose what was queued.

A full queue applies back-pressure (a new event waits for room); nothing is ever dropped.
A database that stays down fails the waiting requests closed (503) after ``give_up_after``
seconds; a response that is already a 503 (a denial: a dependency is down) waits at most
``DENIAL_WAIT`` seconds for its events (the request side: :mod:`.durable`).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy.ext.asyncio import AsyncEngine

from tokenward.audit.durable import DENIAL_WAIT as DENIAL_WAIT
from tokenward.audit.durable import UNAVAILABLE_BODY as UNAVAILABLE_BODY
from tokenward.audit.durable import DurableResponseMiddleware as DurableResponseMiddleware
from tokenward.audit.durable import pending_of_request
from tokenward.audit.records import (
    GENESIS,
    HASHED_FIELDS,
    AuditRecord,
    ChainKeys,
    Row,
    access_row,
    canonical_row,
    from_admin,
    from_security,
    iso,
    plain,
)
from tokenward.audit.sinks import (
    INSERT_COLUMNS,
    Permanent,
    Prepared,
    Sink,
    SQLiteSink,
    failed,
    log,
    open_sink,
)
from tokenward.errors import Unavailable
from tokenward.events import AccessEvent, AdminEvent, SecurityEvent

#: Seconds between two checkpoints of a writer's chain (while it writes; and one at close).
CHECKPOINT_EVERY = 5.0

#: Seconds a request waits (in sync mode) for its events before it is answered 503
#: ``audit_unavailable``; every attempt to write, and every pause between attempts, fits in it.
GIVE_UP_AFTER = 10.0


class _Batch:
    """The events queued between two commits, and one future for all of them.

    One future per batch, not per event: a request remembers ``(batch, row)`` and, once the
    batch's future is settled, looks its row up in ``failed`` (rows that could not be
    written on their own, see :meth:`AuditWriter._write_rows`).
    """

    __slots__ = ("failed", "future", "rows", "waiters", "watchdog")

    def __init__(self, future: asyncio.Future[None]) -> None:
        self.future = future
        self.rows: list[Row] = []
        #: one future per waiting request, woken when the batch is settled (cheaper than a
        #: shield around ``future``, and a cancelled waiter leaves the batch alone)
        self.waiters: list[asyncio.Future[None]] = []
        self.failed: dict[int, BaseException] = {}  # id(row) → why it was not written
        #: fails the batch if the writer has not settled it in time (see ``_expire``)
        self.watchdog: asyncio.TimerHandle | None = None

    async def wait(self) -> None:
        """Until the batch is settled (then see :meth:`error_for`)."""
        if not self.future.done():
            waiter = asyncio.get_running_loop().create_future()
            self.waiters.append(waiter)
            await waiter

    def wake(self) -> None:
        for waiter in self.waiters:
            if not waiter.done():
                waiter.set_result(None)
        self.waiters.clear()

    def error_for(self, row: Row) -> BaseException | None:
        """``None`` once ``row`` is durable; the reason it never will be otherwise."""
        future = self.future
        if not future.done():
            return Unavailable("audit_unavailable", "the audit log cannot be written")
        if future.cancelled():
            return asyncio.CancelledError()
        return future.exception() or self.failed.get(id(row))


class AuditWriter:
    """An event sink that appends every event to a hash chain of its own (``chain_id``,
    drawn when it is made; decision 0021), and checkpoints that chain now and then.

    One writer task on the request loop takes whatever is queued and commits it as one
    batch, then settles the batch's one future. No threads: a writer thread would fight the
    request loop for the interpreter lock on every hand-over (measured: several times the
    cost), while a task only costs the loop the work itself. Per event, the hot path builds
    one tuple and appends it to a list; hashing and encoding happen in the writer, once.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        keys: ChainKeys,
        *,
        mode: str = "sync",
        queue_size: int = 10_000,
        batch_size: int = 500,
        give_up_after: float | None = None,
        linger: float = 0.0,
        observe: Callable[[int, float], None] | None = None,
        checkpoint_every: float = CHECKPOINT_EVERY,
        sqlite_synchronous: str = "NORMAL",
    ) -> None:
        if mode not in ("sync", "async"):
            raise ValueError("audit mode must be 'sync' or 'async'")
        if sqlite_synchronous not in ("NORMAL", "FULL"):
            raise ValueError("the audit log's SQLite synchronous setting is NORMAL or FULL")
        self.engine = engine
        self.keys = keys
        self.mode = mode
        self.queue_size = queue_size
        self.batch_size = batch_size
        self.give_up_after = GIVE_UP_AFTER if give_up_after is None else give_up_after
        self.linger = linger
        #: called with (events written, seconds the transaction took) after each batch
        self.observe = observe
        self.checkpoint_every = checkpoint_every
        self.sqlite_synchronous = sqlite_synchronous
        self._new_chain()
        self.written = 0
        self._closed = False
        self._stopping = False
        self._inflight = 0  # queued or being written
        #: set whenever the queue has room (back-pressure without asyncio.Semaphore, whose
        #: ``locked()`` scans its waiters on every acquire)
        self._space: asyncio.Event | None = None
        self._idle: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._wakeup: asyncio.Event | None = None
        self._batch: _Batch | None = None  # the batch new events join

    def _new_chain(self) -> None:
        """A chain of this writer's own: no other process ever writes its ``chain_id``."""
        self._pid = os.getpid()
        self.chain_id = secrets.token_hex(8)
        self.writer_name = f"{socket.gethostname()[:100]} pid {self._pid}"
        #: the chain's head as committed, (seq, hash); read from the database on connect
        self.head: tuple[int, str] | None = None
        self._mark = _Mark()

    # -- the event sink -------------------------------------------------------------------
    async def access(self, event: AccessEvent) -> None:
        await self.submit_row(access_row(event))

    async def admin(self, event: AdminEvent) -> None:
        await self.submit(from_admin(event))

    async def security(self, event: SecurityEvent) -> None:
        await self.submit(from_security(event))

    @property
    def depth(self) -> int:
        """Events queued and not yet written."""
        return self._inflight

    async def submit(self, record: AuditRecord) -> None:
        await self.submit_row(record.row())

    def access_nowait(self, event: AccessEvent) -> bool:
        """Queue an access event's row without a coroutine, when nothing needs waiting for
        here: inside an HTTP request (its answer waits, see :mod:`.durable`) or in async
        mode, with room in the queue. ``False``: the bus awaits :meth:`access` instead."""
        if self._closed or self._inflight >= self.queue_size:
            return False
        pending = pending_of_request()
        if pending is None and self.mode == "sync":
            return False
        row = access_row(event)
        batch = self._enqueue(row)
        if pending is not None and self.mode == "sync":
            pending.append((batch, row))
        return True

    async def submit_row(self, row: Row) -> None:
        """Queue ``row``; in sync mode, make sure it is committed before an answer.

        Inside an HTTP request the wait happens once, just before the response starts (so
        the request's work overlaps with the write); elsewhere it happens here.
        """
        if self._closed:
            raise Unavailable("audit_unavailable", "the audit log is shutting down")
        task = self._task
        if task is None or task.done():
            self._start()
        while self._inflight >= self.queue_size:  # back-pressure: wait while the queue is full
            space = self._space
            assert space is not None
            space.clear()
            await space.wait()
        batch = self._enqueue(row)
        if self.mode == "async":
            return
        pending = pending_of_request()
        if pending is not None:
            pending.append((batch, row))
            return
        await batch.wait()  # a caller that is cancelled does not un-write its event
        error = batch.error_for(row)
        if error is not None:
            raise error

    def enqueue_nowait(self, row: Row) -> _Batch | None:
        """Queue ``row`` if there is room (``None``: the queue is full, or closed); the batch
        it joined, whose ``future`` settles once it is written (or has failed)."""
        if self._closed or self._inflight >= self.queue_size:
            return None
        return self._enqueue(row)

    def _enqueue(self, row: Row) -> _Batch:
        task = self._task
        if task is None or task.done():
            self._start()
        self._inflight += 1
        batch = self._batch
        if batch is None:
            loop = asyncio.get_running_loop()
            batch = self._batch = _Batch(loop.create_future())
            if self.mode == "sync":  # one timer per batch: nobody waits past the promise
                batch.watchdog = loop.call_later(self.give_up_after + 5.0, _expire, batch)
            assert self._wakeup is not None and self._idle is not None
            self._idle.clear()
            self._wakeup.set()
        batch.rows.append(row)
        return batch

    async def flush(self) -> None:
        """Wait until everything queued so far is written (or has failed)."""
        idle = self._idle
        while idle is not None and self._inflight:
            idle.clear()  # set again by the batch that brings the count to zero
            await idle.wait()

    async def close(self) -> None:
        """Refuse new events, write everything queued, stop the writer task."""
        self._closed = True
        await self.flush()
        task = self._task
        self._stopping = True
        if self._wakeup is not None:
            self._wakeup.set()
        if task is not None and not task.done():
            await task
        self._task = None

    # -- the request-loop side ------------------------------------------------------------
    def _start(self) -> None:
        if os.getpid() != self._pid:  # a forked worker: never the parent's chain
            self._new_chain()
        self._space = asyncio.Event()
        self._space.set()
        self._idle = asyncio.Event()
        if self._inflight == 0:
            self._idle.set()
        self._wakeup = asyncio.Event()
        if self._batch is not None:  # queued while no writer ran: the new one takes them
            self._wakeup.set()
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name="tokenward-audit-writer")

    def _settle(self, batch: _Batch, error: BaseException | None) -> None:
        """Settle the batch's future and free its queue slots."""
        assert self._space is not None and self._idle is not None
        if batch.watchdog is not None:
            batch.watchdog.cancel()
        if not batch.future.done():
            if error is None:
                batch.future.set_result(None)
            else:
                batch.future.set_exception(error)
                batch.future.exception()  # marked seen: in async mode nobody awaits it
        batch.wake()
        self._inflight -= len(batch.rows)
        self._space.set()
        if self._inflight == 0:
            self._idle.set()

    # -- the writer task ------------------------------------------------------------------
    async def _run(self) -> None:
        """Take the current batch whenever there is one, write it, settle it.

        SQLite: the driver called directly, on the request loop, never waiting on a lock. A
        commit in WAL mode with ``synchronous=NORMAL`` writes to the log without an fsync:
        well under a millisecond for a batch. Doing it right here costs the loop that much
        and spares every event two hand-overs between threads. The write lock is only ever
        *tried* (``busy_timeout=0``); when another process holds it, this task sleeps and
        tries again, so the loop never blocks on it.

        PostgreSQL: a connection of the writer's own, on the request loop (no threads:
        asyncpg waits on sockets, so the loop serves requests between round trips).
        """
        assert self._wakeup is not None
        sink = open_sink(self)
        try:
            while True:
                await self._wakeup.wait()
                self._wakeup.clear()
                # Let the loop turn once (or linger longer): the events of requests that are
                # ready to run join this commit.
                await asyncio.sleep(self.linger)
                batch, self._batch = self._batch, None
                if batch is not None:
                    await self._write_batch(sink, batch)
                if self._stopping and self._batch is None:
                    if self.needs_closing:  # a clean close: the chain's final checkpoint
                        await sink.checkpoint(closed=True)
                    return
        except BaseException as exc:
            # The writer is going away (cancelled, or a bug): nobody may wait on events
            # that no writer will take. The next event starts a new writer.
            orphan, self._batch = self._batch, None
            if orphan is not None:
                self._settle(orphan, failed(len(orphan.rows), exc))
            raise
        finally:
            await sink.close()

    async def _write_batch(self, sink: Sink, batch: _Batch) -> None:
        """Write ``batch`` in chunks of ``batch_size``; a chunk that cannot be written fails
        its own events only (the others are durable and their requests are answered)."""
        rows = batch.rows
        try:
            for start in range(0, len(rows), self.batch_size):
                chunk = rows[start : start + self.batch_size]
                try:
                    await self._write_rows(sink, batch, chunk)
                except Exception as exc:
                    error = exc if isinstance(exc, Unavailable) else failed(len(chunk), exc)
                    for row in chunk:
                        batch.failed.setdefault(id(row), error)
        except BaseException as exc:  # cancelled mid-write: what is unsettled has failed
            self._settle(batch, failed(len(rows), exc))
            raise
        self._settle(batch, None)

    async def _write_rows(self, sink: Sink, batch: _Batch, rows: list[Row]) -> None:
        """Write ``rows`` in one transaction. A row that cannot even be encoded fails on its
        own before any I/O; when the database refuses the data, the rows go one by one, so
        that one bad event does not take the others down (its request alone gets a 503)."""
        sqlite = isinstance(sink, SQLiteSink)
        prepared: list[_Prepared] = []
        kept: list[Row] = []
        for row in rows:
            try:
                prepared.append(prepare(row, sqlite=sqlite))
            except Exception as exc:
                batch.failed[id(row)] = failed(1, exc)
            else:
                kept.append(row)
        await self._write_prepared(sink, batch, kept, prepared)

    async def _write_prepared(
        self, sink: Sink, batch: _Batch, rows: list[Row], prepared: list[_Prepared]
    ) -> None:
        if not prepared:
            return
        try:
            await sink.write(prepared)
        except Permanent as exc:
            if len(prepared) == 1:
                batch.failed[id(rows[0])] = failed(1, exc.__cause__ or exc)
                return
            for row, item in zip(rows, prepared, strict=True):
                await self._write_prepared(sink, batch, [row], [item])
            return
        self.written += len(prepared)

    async def append(self, records: list[AuditRecord]) -> None:
        """Append ``records`` now, in order, and wait until they are durable (tools, tests,
        imports; in async mode, until they are written)."""
        if self.mode == "async":
            for record in records:
                await self.submit(record)
            await self.flush()
            return
        await asyncio.gather(*(self.submit(record) for record in records))

    def seal(
        self, prepared: list[_Prepared], seq: int, prev: str
    ) -> tuple[list[tuple[Any, ...]], tuple[int, str]]:
        """Number and chain ``prepared`` rows after ``(seq, prev)`` in this writer's chain:
        the table rows, and the new head. One HMAC per row; nothing here can fail on the
        data. The hashed text is ``[chain_id, seq, *fields]`` (see :func:`chained`)."""
        key_id = self.keys.current_id
        mac = self.keys.mac(key_id).hexdigest
        chain = self.chain_id
        lead = b'["' + chain.encode() + b'",'
        out: list[tuple[Any, ...]] = []
        prev_bytes = prev.encode()
        for canonical, stored in prepared:
            seq += 1
            digest = mac(prev_bytes + b"\x00" + lead + str(seq).encode() + b"," + canonical[1:])
            out.append((chain, seq, *stored, key_id, prev, digest))
            prev = digest
            prev_bytes = digest.encode()
        return out, (seq, prev)

    # -- the chain's head and checkpoints ---------------------------------------------------
    def resync(self, head: Any, mark: Any) -> None:
        """Take the chain's head and last checkpoint as the database holds them (on each
        connect: only this writer writes them, so what is read is what it last committed)."""
        self.head = (int(head[0]), str(head[1])) if head is not None else (0, GENESIS)
        if mark is None:
            self._mark = _Mark()
        else:
            self._mark = _Mark(int(mark[0]), str(mark[1]), int(mark[2]), time.monotonic())
            self._mark.closed = bool(mark[3])

    def checkpoint_due(self) -> bool:
        """Whether the chain has moved since its last checkpoint, ``checkpoint_every``
        seconds ago (the first checkpoint comes with the chain's first batch)."""
        head, mark = self.head, self._mark
        if head is None or head[0] == mark.seq:
            return False
        return mark.n == 0 or time.monotonic() - mark.time >= self.checkpoint_every

    def make_checkpoint(
        self, witness: list[tuple[Any, ...]], *, closed: bool, now: datetime
    ) -> dict[str, Any]:
        """The next checkpoint of this chain: its head, and the newest checkpoint of each
        other chain among ``witness`` rows (chain, n, seq, hash), under the chain key."""
        head, mark = self.head, self._mark
        assert head is not None
        seen: dict[str, list[Any]] = {}
        for chain, n, seq, digest in witness:
            if chain != self.chain_id and (chain not in seen or int(n) > seen[chain][0]):
                seen[chain] = [int(n), int(seq), str(digest)]
        key_id = self.keys.current_id
        values: dict[str, Any] = {
            "chain_id": self.chain_id,
            "n": mark.n + 1,
            "at": now,
            "seq": head[0],
            "hash": head[1],
            "closed": closed,
            "writer": self.writer_name,
            "witness": seen,
            "key_id": key_id,
            "prev_mac": mark.mac,
        }
        values["mac"] = self.keys.checkpoint_mac(key_id, values)
        return values

    def checkpoint_written(self, values: dict[str, Any]) -> None:
        self._mark = _Mark(values["n"], values["mac"], values["seq"], time.monotonic())
        self._mark.closed = bool(values["closed"])

    @property
    def needs_closing(self) -> bool:
        """Whether the chain holds events and has no closing checkpoint yet."""
        return self.head is not None and self.head[0] > 0 and not self._mark.closed


class _Mark:
    """This writer's last checkpoint: its number, MAC, the head it recorded, and when."""

    __slots__ = ("closed", "mac", "n", "seq", "time")

    def __init__(self, n: int = 0, mac: str = GENESIS, seq: int = 0, at: float = 0.0) -> None:
        self.n, self.mac, self.seq, self.time = n, mac, seq, at
        self.closed = False


_Prepared = Prepared
_INT64 = range(-(2**63), 2**63)


def prepare(row: Row, *, sqlite: bool) -> _Prepared:
    """Encode ``row`` for the chain and the table; raise if it cannot be stored as it is."""
    at = iso(row[1])
    canonical = canonical_row(row, at)  # raises for a lone surrogate, a non-JSON value
    latency = row[_LATENCY]
    if latency is not None and latency not in _INT64:
        raise ValueError("latency_us does not fit a 64-bit integer")
    detail = row[_DETAIL]
    if plain(detail):
        text = orjson.dumps(detail).decode()
    else:
        text = _JSON(detail)
        text.encode()  # a lone surrogate would only fail in the driver, for the whole batch
    # Stored: "at" as the column type stores it, the detail as JSON text.
    when = row[1]
    if sqlite:
        stored_at: Any = at[:10] + " " + at[11:26]
    else:
        stored_at = when if when.tzinfo is UTC else when.astimezone(UTC)
    return canonical, (row[0], stored_at, *row[2:_DETAIL], text)


_DETAIL = HASHED_FIELDS.index("detail")
_LATENCY = HASHED_FIELDS.index("latency_us")
assert ("chain_id", "seq", *HASHED_FIELDS, "key_id", "prev_hash", "hash") == INSERT_COLUMNS
_JSON = json.JSONEncoder(separators=(",", ":")).encode


def _expire(batch: _Batch) -> None:
    """A batch the writer has not settled ``give_up_after`` (and some) seconds on: its
    requests are answered 503 now. The writer settles it for good when it is done."""
    batch.watchdog = None
    if not batch.future.done():
        log.error("audit_write_overdue", events=len(batch.rows))
        batch.future.set_exception(
            Unavailable("audit_unavailable", "the audit log cannot be written")
        )
        batch.future.exception()
        batch.wake()
