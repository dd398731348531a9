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
import json
import queue
import sqlite3
import time
from collections.abc import Callable
from contextvars import ContextVar
from datetime import UTC
from typing import Any

import structlog
from sqlalchemy import insert, select, update
from sqlalchemy.exc import DataError, IntegrityError, ProgrammingError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from starlette.types import ASGIApp, Message, Receive, Scope, Send

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

_Item = tuple[AuditRecord, "asyncio.Future[None]"]
_STOP: Any = object()
#: errors that retrying cannot fix (the data, not the database, is at fault)
_PERMANENT_SQL = (DataError, IntegrityError, ProgrammingError)
_PERMANENT_SQLITE = (sqlite3.DataError, sqlite3.IntegrityError, sqlite3.ProgrammingError)


def _permanent(exc: SQLAlchemyError) -> bool:
    """Data, constraint or statement errors (SQLSTATE classes 22, 23, 42): not worth a retry."""
    if isinstance(exc, _PERMANENT_SQL):
        return True
    orig = getattr(exc, "orig", None)
    state = getattr(orig, "sqlstate", None) or getattr(orig, "pgcode", None)
    return isinstance(state, str) and state[:2] in ("22", "23", "42")


#: Durability futures of the events of the HTTP request being handled (set by
#: :class:`DurableResponseMiddleware`); ``None`` outside a request.
_pending: ContextVar[list[asyncio.Future[None]] | None] = ContextVar(
    "tokenward_audit_pending", default=None
)


class AuditWriter:
    """An event sink that appends every event to the hash-chained audit table.

    One writer task on the request loop takes whatever is queued and commits it as one
    batch, then resolves the batch's futures. No threads: a writer thread would fight the
    request loop for the interpreter lock on every hand-over (measured: several times the
    cost), while a task only costs the loop the work itself.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        keys: ChainKeys,
        *,
        mode: str = "sync",
        queue_size: int = 10_000,
        batch_size: int = 500,
        give_up_after: float = 10.0,
        linger: float = 0.0,
        observe: Callable[[int, float], None] | None = None,
    ) -> None:
        if mode not in ("sync", "async"):
            raise ValueError("audit mode must be 'sync' or 'async'")
        self.engine = engine
        self.keys = keys
        self.mode = mode
        self.queue_size = queue_size
        self.batch_size = batch_size
        self.give_up_after = give_up_after
        self.linger = linger
        #: called with (events written, seconds the transaction took) after each batch
        self.observe = observe
        self.written = 0
        self._closed = False
        self._inflight = 0  # queued or being written
        #: set whenever the queue has room (back-pressure without asyncio.Semaphore, whose
        #: ``locked()`` scans its waiters on every acquire)
        self._space: asyncio.Event | None = None
        self._idle: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # the request loop
        self._task: asyncio.Task[None] | None = None
        self._wakeup: asyncio.Event | None = None
        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()

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
        return self._inflight

    async def submit(self, record: AuditRecord) -> None:
        """Queue ``record``; in sync mode, make sure it is committed before an answer.

        Inside an HTTP request the wait happens once, just before the response starts (so
        the request's work overlaps with the write); elsewhere it happens here.
        """
        if self._closed:
            raise Unavailable("audit_unavailable", "the audit log is shutting down")
        await self._start()
        assert self._space is not None and self._idle is not None
        while self._inflight >= self.queue_size:  # back-pressure: wait while the queue is full
            self._space.clear()
            await self._space.wait()
        self._inflight += 1
        self._idle.clear()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._queue.put((record, future))
        if self._wakeup is not None:
            self._wakeup.set()
        if self.mode == "async":
            return
        pending = _pending.get()
        if pending is not None:
            pending.append(future)
        else:
            # Shielded: a caller that is cancelled does not un-write its event.
            await asyncio.shield(future)

    async def flush(self) -> None:
        """Wait until everything queued so far is written."""
        if self._idle is not None:
            while self._inflight:
                await self._idle.wait()

    async def close(self) -> None:
        """Refuse new events, write everything queued, stop the writer thread."""
        self._closed = True
        await self.flush()
        task = self._task
        self._queue.put(_STOP)
        if self._wakeup is not None:
            self._wakeup.set()
        if task is not None:
            await task
        self._task = None

    # -- the request-loop side ------------------------------------------------------------
    async def _start(self) -> None:
        if self._task is not None and not self._task.done():
            return
        self._loop = asyncio.get_running_loop()
        self._space = asyncio.Event()
        self._space.set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._wakeup = asyncio.Event()
        run = self._sqlite_run() if self.engine.dialect.name == "sqlite" else self._driver_run()
        self._task = asyncio.create_task(run, name="tokenward-audit-writer")

    def _done(self, batch: list[_Item], error: BaseException | None) -> None:
        """On the request loop: resolve the batch's futures and free its queue slots."""
        assert self._space is not None and self._idle is not None
        for _, future in batch:
            if not future.done():
                if error is None:
                    future.set_result(None)
                else:
                    future.set_exception(error)
                    if self.mode == "async":
                        future.exception()  # nobody awaits it: mark it seen
        self._inflight -= len(batch)
        self._space.set()
        if self._inflight == 0:
            self._idle.set()

    # -- the writer task ------------------------------------------------------------------
    async def _sqlite_run(self) -> None:
        """SQLite: the driver called directly, on the request loop, never waiting on a lock.

        A commit in WAL mode with ``synchronous=NORMAL`` writes to the log without an
        fsync: well under a millisecond for a batch. Doing it right here costs the loop
        that much and spares every event two hand-overs between threads. The write lock is
        only ever *tried* (``busy_timeout=0``); when another process holds it, this task
        sleeps and tries again, so the loop never blocks on it.
        """
        assert self._wakeup is not None
        writer = _SQLiteAppender(self.engine.url.database or "", self.keys)
        try:
            while True:
                await self._wakeup.wait()
                self._wakeup.clear()
                # Let the loop turn once (or linger longer): the events of requests that are
                # ready to run join this commit.
                await asyncio.sleep(self.linger)
                while True:
                    batch, stop = self._take_ready()
                    if batch:
                        await self._write_sqlite(writer, batch)
                    if stop:
                        return
                    if not batch:
                        break
        finally:
            writer.close()

    async def _driver_run(self) -> None:
        """PostgreSQL: a connection of the writer's own, on the request loop (no threads:
        asyncpg waits on sockets, so the loop serves requests between round trips)."""
        assert self._wakeup is not None
        conn: AsyncConnection | None = None
        try:
            while True:
                await self._wakeup.wait()
                self._wakeup.clear()
                await asyncio.sleep(self.linger)
                while True:
                    batch, stop = self._take_ready()
                    if batch:
                        conn = await self._write_driver_batch(conn, batch)
                    if stop:
                        return
                    if not batch:
                        break
        finally:
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()

    async def _write_driver_batch(
        self, conn: AsyncConnection | None, batch: list[_Item]
    ) -> AsyncConnection | None:
        try:
            conn = await self._write_with_retry(self.engine, conn, [r for r, _ in batch])
        except SQLAlchemyError as exc:
            if not _permanent(exc):
                self._done(batch, _failed(len(batch), exc))
                return None
            # One bad event must not take the others down: write them one by one.
            if len(batch) == 1:
                self._done(batch, _failed(1, exc))
                return None
            for item in batch:
                conn = await self._write_driver_batch(conn, [item])
            return conn
        except Exception as exc:
            self._done(batch, _failed(len(batch), exc))
            return None
        self._done(batch, None)
        return conn

    def _take_ready(self) -> tuple[list[_Item], bool]:
        batch: list[_Item] = []
        while len(batch) < self.batch_size:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                return batch, True
            batch.append(item)
        return batch, False

    async def _write_sqlite(self, writer: _SQLiteAppender, batch: list[_Item]) -> None:
        try:
            await self._write_sqlite_batch(writer, batch)
        except _PERMANENT_SQLITE as exc:
            # One bad event must not take the others down: write them one by one.
            if len(batch) == 1:
                self._done(batch, _failed(1, exc))
                return
            for item in batch:
                await self._write_sqlite(writer, [item])

    async def _write_sqlite_batch(self, writer: _SQLiteAppender, batch: list[_Item]) -> None:
        records = [r for r, _ in batch]
        started = time.monotonic()
        delay = 0.002
        error: BaseException | None = None
        while True:
            try:
                t0 = time.perf_counter()
                writer.append(records)
                self.written += len(records)
                if self.observe is not None:
                    self.observe(len(records), time.perf_counter() - t0)
                break
            except _PERMANENT_SQLITE:
                raise
            except (sqlite3.Error, OSError) as exc:
                busy = isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc)
                if not busy:
                    writer.reset()
                waited = time.monotonic() - started
                if self.mode == "sync" and waited > self.give_up_after:
                    error = _failed(len(batch), exc)
                    break
                if not busy:
                    log.warning("audit_write_retry", error=type(exc).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
        self._done(batch, error)

    async def _write_with_retry(
        self, engine: AsyncEngine, conn: AsyncConnection | None, records: list[AuditRecord]
    ) -> AsyncConnection:
        """Append ``records``, retrying a failing database; the connection to use next."""
        started = time.monotonic()
        delay = 0.05
        while True:
            try:
                if conn is None:
                    conn = await engine.connect()
                await self._append_on(conn, records)
                return conn
            except (SQLAlchemyError, OSError, TimeoutError) as exc:
                if isinstance(exc, SQLAlchemyError) and _permanent(exc):
                    if conn is not None:
                        with contextlib.suppress(Exception):
                            await conn.close()
                    raise
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await conn.close()
                conn = None
                waited = time.monotonic() - started
                # In async mode nobody waits for an answer: keep trying (the full queue
                # pushes back on new requests meanwhile) rather than lose events.
                if self.mode == "sync" and waited > self.give_up_after:
                    raise
                log.warning("audit_write_retry", error=type(exc).__name__, waited=round(waited, 2))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def append(self, records: list[AuditRecord]) -> None:
        """Append ``records`` now, on the caller's loop (tools, tests, imports)."""
        async with self.engine.connect() as conn:
            await self._append_on(conn, records)

    async def _append_on(self, conn: AsyncConnection, records: list[AuditRecord]) -> None:
        """Append ``records`` to the chain in one transaction (the group commit)."""
        started = time.perf_counter()
        async with conn.begin():
            seq, prev = await _lock_head(conn)
            key_id = self.keys.current_id
            rows: list[tuple[Any, ...]] = []
            for record in records:
                seq += 1
                values = record.values()
                digest = self.keys.hash(key_id, prev, values)
                values.update(seq=seq, key_id=key_id, prev_hash=prev, hash=digest)
                rows.append(tuple(values[name] for name in _INSERT_COLUMNS))
                prev = digest
            await _insert_rows(conn, rows, (seq, prev))
        self.written += len(records)
        if self.observe is not None:
            self.observe(len(records), time.perf_counter() - started)


_INSERT_COLUMNS = tuple(c.name for c in audit_events.c)
_JSON = json.JSONEncoder(separators=(",", ":")).encode


def _failed(events: int, exc: BaseException) -> Unavailable:
    log.error("audit_write_failed", events=events, error=type(exc).__name__)
    return Unavailable("audit_unavailable", "the audit log cannot be written")


class _SQLiteAppender:
    """The same group commit as :meth:`AuditWriter._append_on`, on a plain sqlite3 link.

    ``BEGIN IMMEDIATE`` takes the database's write lock first, which serialises appends
    from several processes just as the head-row lock does on PostgreSQL.
    """

    def __init__(self, path: str, keys: ChainKeys) -> None:
        self.path = path
        self.keys = keys
        self.db: sqlite3.Connection | None = None

    def connect(self) -> sqlite3.Connection:
        if self.db is None:
            db = sqlite3.connect(
                self.path, timeout=0, isolation_level=None, check_same_thread=False
            )
            db.execute("PRAGMA busy_timeout=0")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            self.db = db
        return self.db

    def reset(self) -> None:
        self.close()

    def close(self) -> None:
        db, self.db = self.db, None
        if db is not None:
            with contextlib.suppress(sqlite3.Error):
                db.close()

    def append(self, records: list[AuditRecord]) -> None:
        db = self.connect()
        db.execute("BEGIN IMMEDIATE")
        try:
            head = db.execute("SELECT seq, hash FROM audit_head WHERE id = 1").fetchone()
            if head is None:
                head = db.execute(
                    "SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1"
                ).fetchone() or (0, GENESIS)
                db.execute("INSERT INTO audit_head (id, seq, hash) VALUES (1, ?, ?)", head)
            seq, prev = int(head[0]), str(head[1])
            key_id = self.keys.current_id
            rows: list[tuple[Any, ...]] = []
            for record in records:
                seq += 1
                values = record.values()
                digest = self.keys.hash(key_id, prev, values)
                values.update(seq=seq, key_id=key_id, prev_hash=prev, hash=digest)
                rows.append(tuple(values[name] for name in _INSERT_COLUMNS))
                prev = digest
            for sql, params in _insert_statements(rows, sqlite=True):
                db.execute(sql, params)
            db.execute("UPDATE audit_head SET seq = ?, hash = ? WHERE id = 1", (seq, prev))
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise


#: rows per INSERT statement (columns x rows stays under every driver's parameter limit)
_ROWS_PER_STATEMENT = 1000


def _insert_statements(
    rows: list[tuple[Any, ...]], *, sqlite: bool
) -> list[tuple[str, tuple[Any, ...]]]:
    """Multi-row INSERTs for ``rows`` (the hot spot of auditing under load).

    One statement for up to a thousand rows, not one execution per row. Values are
    converted the way the table's types would (UTC times, JSON text).
    """
    at = _INSERT_COLUMNS.index("at")
    detail = _INSERT_COLUMNS.index("detail")
    width = len(_INSERT_COLUMNS)
    names = ", ".join(_INSERT_COLUMNS)
    statements = []
    for start in range(0, len(rows), _ROWS_PER_STATEMENT):
        chunk = rows[start : start + _ROWS_PER_STATEMENT]
        params: list[Any] = []
        for row in chunk:
            values = list(row)
            when = values[at].astimezone(UTC)
            if sqlite:
                values[at] = when.replace(tzinfo=None).isoformat(" ", "microseconds")
            else:
                values[at] = when
            values[detail] = _JSON(values[detail])
            params.extend(values)
        if sqlite:
            group = "(" + ", ".join("?" * width) + ")"
            marks = ", ".join(group for _ in chunk)
        else:
            marks = ", ".join(
                "(" + ", ".join(f"${r * width + c + 1}" for c in range(width)) + ")"
                for r in range(len(chunk))
            )
        sql = f"INSERT INTO audit_events ({names}) VALUES {marks}"  # noqa: S608 (no input)
        statements.append((sql, tuple(params)))
    return statements


async def _insert_rows(
    conn: AsyncConnection, rows: list[tuple[Any, ...]], head: tuple[int, str]
) -> None:
    """Insert ``rows`` and move the chain head to ``head`` (on PostgreSQL in one round trip:
    the head update rides along with the last insert)."""
    sqlite = conn.dialect.name == "sqlite"
    statements = _insert_statements(rows, sqlite=sqlite)
    if sqlite:
        for sql, params in statements:
            await conn.exec_driver_sql(sql, params)
        await conn.execute(
            update(audit_head).where(audit_head.c.id == 1).values(seq=head[0], hash=head[1])
        )
        return
    for sql, params in statements[:-1]:
        await conn.exec_driver_sql(sql, params)
    sql, params = statements[-1]
    n = len(params)
    await conn.exec_driver_sql(
        f"WITH appended AS ({sql} RETURNING 1) "  # noqa: S608 (no input in the text)
        f"UPDATE audit_head SET seq = ${n + 1}, hash = ${n + 2} WHERE id = 1",
        (*params, head[0], head[1]),
    )


async def _lock_head(conn: AsyncConnection) -> tuple[int, str]:
    """Lock the chain head for this transaction and read it (creating it on first use)."""
    for _ in range(3):
        # A no-op update takes the row lock (PostgreSQL) or the write lock (SQLite) first,
        # so two writers, in one process or many, never append from the same head.
        row = (
            await conn.execute(
                update(audit_head)
                .where(audit_head.c.id == 1)
                .values(seq=audit_head.c.seq)
                .returning(audit_head.c.seq, audit_head.c.hash)
            )
        ).first()
        if row is not None:
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


class DurableResponseMiddleware:
    """Holds each response until the audit events of its request are durable.

    Events are queued as the request runs; the one wait happens as the response is about
    to start. Should the audit log fail, the response is replaced by a 503 (fail closed):
    nothing is acknowledged that the audit log does not hold.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        pending: list[asyncio.Future[None]] = []
        token = _pending.set(pending)
        failed = False

        async def durable_send(message: Message) -> None:
            nonlocal failed
            if failed:
                return
            if message["type"] == "http.response.start" and pending:
                waiting = list(pending)
                pending.clear()
                # Batches commit in queue order, so once the last event is settled so are
                # all the earlier ones: one wait, then a look at each.
                with contextlib.suppress(Exception):
                    await asyncio.shield(waiting[-1])
                if any(not f.done() or f.cancelled() or f.exception() is not None for f in waiting):
                    failed = True
                    await _unavailable(send)
                    return
            await send(message)

        try:
            await self.app(scope, receive, durable_send)
        finally:
            _pending.reset(token)
            if pending:  # events of a request that sent no response: still wait for them
                await asyncio.shield(asyncio.gather(*pending, return_exceptions=True))


async def _unavailable(send: Send) -> None:
    body = json.dumps(
        {"error": "audit_unavailable", "message": "the audit log cannot be written"}
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 503,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"no-store"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
