"""Where the audit writer appends: its own chain, on SQLite or on PostgreSQL.

Each writer owns one chain (decision 0021): it alone writes the rows of its ``chain_id``, so
it keeps the chain's head in memory and shares no row, and no lock, with another writer. The
head is read back from the database whenever the writer (re)connects: a primary-key lookup
of its own newest row, which also tells a commit whose answer was lost from one that never
happened. Now and then (``AuditWriter.checkpoint_every`` seconds) and when it closes, the
writer records a checkpoint of its chain, after the batch that reached it.

SQLite, on top: the write-ahead log is checkpointed by the writer itself, between two of its
batches, on a worker thread while the writer waits, so the checkpoint finds a log that does
not grow under it and the next commit starts the log over (see :class:`SQLiteSink`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import structlog
from sqlalchemy.exc import DataError, IntegrityError, ProgrammingError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from tokenward.audit.records import iso
from tokenward.audit.tables import audit_chain_checkpoints, audit_events
from tokenward.errors import Unavailable

if TYPE_CHECKING:
    from tokenward.audit.writer import AuditWriter

log = structlog.get_logger("tokenward.audit")

#: A row made ready to store, all but its place in the chain: its canonical (hashed) text,
#: and its stored values from ``id`` to ``detail``.
Prepared = tuple[bytes, tuple[Any, ...]]

#: errors that retrying cannot fix (the data, not the database, is at fault)
_PERMANENT_SQL = (DataError, IntegrityError, ProgrammingError)
_PERMANENT_SQLITE = (sqlite3.DataError, sqlite3.IntegrityError, sqlite3.ProgrammingError)

INSERT_COLUMNS = tuple(c.name for c in audit_events.c)
_CHECKPOINT_COLUMNS = tuple(c.name for c in audit_chain_checkpoints.c)

#: The latest checkpoints of the chains written lately: what a new checkpoint witnesses.
WITNESS_SQL = (
    "SELECT chain_id, n, seq, hash FROM audit_chain_checkpoints ORDER BY at DESC LIMIT 256"
)


def permanent(exc: BaseException) -> bool:
    """Data, constraint or statement errors (SQLSTATE classes 22, 23, 42): not worth a retry."""
    if isinstance(exc, _PERMANENT_SQL):
        return True
    orig = getattr(exc, "orig", None)
    state = (
        getattr(exc, "sqlstate", None)
        or getattr(orig, "sqlstate", None)
        or getattr(orig, "pgcode", None)
    )
    return isinstance(state, str) and state[:2] in ("22", "23", "42")


class Permanent(Exception):
    """The data, not the database, is at fault: a retry cannot help."""


def failed(events: int, exc: BaseException) -> Unavailable:
    log.error("audit_write_failed", events=events, error=type(exc).__name__)
    return Unavailable("audit_unavailable", "the audit log cannot be written")


def _checkpoint_params(values: dict[str, Any], *, sqlite: bool) -> tuple[Any, ...]:
    out = []
    for name in _CHECKPOINT_COLUMNS:
        value = values[name]
        if name == "witness":
            value = json.dumps(value, sort_keys=True, separators=(",", ":"))
        elif name == "at" and sqlite:
            text = iso(value)
            value = text[:10] + " " + text[11:26]
        elif name == "closed" and sqlite:
            value = int(value)
        out.append(value)
    return tuple(out)


class Sink:
    """Where the writer task appends batches (one per database kind)."""

    async def write(self, rows: list[Prepared]) -> None:
        raise NotImplementedError

    async def checkpoint(self, *, closed: bool) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        return None


def open_sink(writer: AuditWriter) -> Sink:
    if writer.engine.dialect.name == "sqlite":
        return SQLiteSink(writer)
    return PostgresSink(writer, writer.engine)


class SQLiteSink(Sink):
    """Appends on the loop; checkpoints the write-ahead log between batches, on a thread.

    SQLite's automatic checkpoint would run inside whichever commit crosses the log's size
    threshold: copying the log into the database and syncing it, on the request loop
    (measured: 74 µs per commit of 32 events without it, 322 µs with it, and a stall of up
    to 17 ms when it runs). The writer's link turns it off. After ``CHECKPOINT_ROWS`` events
    or ``CHECKPOINT_COMMITS`` commits, whichever comes first, the writer checkpoints on a
    worker thread (SQLite releases the interpreter lock while it does I/O) and does not
    append until that is done: a checkpoint racing a writer that never pauses never reaches
    the end of the log, and a log the checkpoint has not reached the end of is never started
    over (measured: 3 GB in 120 s). When a reader keeps the checkpoint from the end and the
    log is over ``WAL_RESTART_BYTES``, a ``TRUNCATE`` checkpoint waits up to
    ``RESTART_WAIT_MS`` for the readers. The log is cut back to ``journal_size_limit``
    whenever it starts over.
    """

    CHECKPOINT_ROWS = 4000
    CHECKPOINT_COMMITS = 200
    WAL_RESTART_BYTES = 16 * 1024 * 1024
    RESTART_WAIT_MS = 200

    def __init__(self, writer: AuditWriter) -> None:
        self.writer = writer
        self.path = writer.engine.url.database or ""
        self.appender = SQLiteAppender(self.path, writer)
        self.commits = 0
        self.rows = 0
        self.wal_task: asyncio.Task[None] | None = None

    async def _wal_settled(self) -> None:
        task, self.wal_task = self.wal_task, None
        if task is not None:
            with contextlib.suppress(Exception):
                await task

    async def write(self, rows: list[Prepared]) -> None:
        writer = self.writer
        await self._wal_settled()  # nothing is added to the log while it is checkpointed
        started = time.monotonic()
        delay = 0.002
        while True:
            try:
                t0 = time.perf_counter()
                self.appender.append(rows)
                if writer.observe is not None:
                    writer.observe(len(rows), time.perf_counter() - t0)
                break
            except _PERMANENT_SQLITE as exc:
                raise Permanent() from exc
            except (sqlite3.Error, OSError) as exc:
                busy = isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc)
                if not busy:
                    self.appender.reset()
                waited = time.monotonic() - started
                # In async mode nobody waits for an answer: keep trying (the full queue
                # pushes back on new requests meanwhile) rather than lose events.
                if writer.mode == "sync" and waited >= writer.give_up_after:
                    raise failed(len(rows), exc) from exc
                if not busy:
                    log.warning("audit_write_retry", error=type(exc).__name__)
                if writer.mode == "sync":  # the last pause ends with the promise
                    delay = min(delay, writer.give_up_after - waited)
                await asyncio.sleep(delay)
                # Another process's write lock is held for milliseconds: retry soon. A
                # failing database is given more time between tries.
                delay = min(delay * 2, 0.02 if busy else 1.0)
        if writer.checkpoint_due():
            await self.checkpoint(closed=False)
        self.commits += 1
        self.rows += len(rows)
        if self.rows >= self.CHECKPOINT_ROWS or self.commits >= self.CHECKPOINT_COMMITS:
            self.rows = self.commits = 0
            self.wal_task = asyncio.create_task(asyncio.to_thread(self.appender.checkpoint_wal))

    async def checkpoint(self, *, closed: bool) -> None:
        await self._wal_settled()
        try:
            self.appender.checkpoint(closed=closed)
        except sqlite3.Error as exc:  # busy, or failing: the next batch tries again
            log.warning("audit_checkpoint_failed", error=type(exc).__name__)

    async def close(self) -> None:
        await self._wal_settled()
        self.appender.close()


class SQLiteAppender:
    """The group commit on a plain sqlite3 link of the writer's own.

    ``BEGIN IMMEDIATE`` takes the database's write lock (SQLite has one per database; the
    chain rows of other writers are not touched). One prepared single-row INSERT, run for
    every row (``executemany``): SQLite compiles it once.
    """

    def __init__(self, path: str, writer: AuditWriter) -> None:
        self.path = path
        self.writer = writer
        self.db: sqlite3.Connection | None = None
        #: the chain position a commit that failed would have reached (it may have landed)
        self.uncertain: int | None = None

    def connect(self) -> sqlite3.Connection:
        if self.db is None:
            db = sqlite3.connect(
                self.path, timeout=0, isolation_level=None, check_same_thread=False
            )
            db.execute("PRAGMA busy_timeout=0")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA synchronous={self.writer.sqlite_synchronous}")
            db.execute("PRAGMA wal_autocheckpoint=0")  # see SQLiteSink
            db.execute("PRAGMA journal_size_limit=67108864")
            chain = self.writer.chain_id
            self.writer.resync(
                db.execute(
                    "SELECT seq, hash FROM audit_events WHERE chain_id = ? "
                    "ORDER BY seq DESC LIMIT 1",
                    (chain,),
                ).fetchone(),
                db.execute(
                    "SELECT n, mac, seq, closed FROM audit_chain_checkpoints "
                    "WHERE chain_id = ? ORDER BY n DESC LIMIT 1",
                    (chain,),
                ).fetchone(),
            )
            self.db = db
        return self.db

    def reset(self) -> None:
        self.close()

    def close(self) -> None:
        db, self.db = self.db, None
        if db is not None:
            with contextlib.suppress(sqlite3.Error):
                db.close()

    def append(self, rows: list[Prepared]) -> None:
        db = self.connect()
        writer = self.writer
        head = writer.head
        assert head is not None
        if self.uncertain is not None:
            landed, self.uncertain = head[0] >= self.uncertain, None
            if landed:  # the commit that "failed" was durable: written once, not twice
                return
        sealed, new_head = writer.seal(rows, *head)
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(_SQLITE_INSERT, sealed)
            self.uncertain = new_head[0]
            db.execute("COMMIT")
            self.uncertain = None
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        writer.head = new_head

    def checkpoint(self, *, closed: bool) -> None:
        db = self.connect()
        db.execute("BEGIN IMMEDIATE")
        try:
            witness = db.execute(WITNESS_SQL).fetchall()
            values = self.writer.make_checkpoint(witness, closed=closed, now=datetime.now(UTC))
            db.execute(_SQLITE_CHECKPOINT, _checkpoint_params(values, sqlite=True))
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        self.writer.checkpoint_written(values)

    def checkpoint_wal(self) -> None:
        """Copy the log into the database (on a worker thread, while the writer waits)."""
        db = self.db
        if db is None:
            return
        try:
            busy, frames, copied = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            if busy or copied < frames:  # a reader holds an older snapshot
                wal = self.path + "-wal"
                if os.path.exists(wal) and os.path.getsize(wal) > SQLiteSink.WAL_RESTART_BYTES:
                    db.execute(f"PRAGMA busy_timeout={SQLiteSink.RESTART_WAIT_MS:d}")
                    try:
                        db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
                    finally:
                        db.execute("PRAGMA busy_timeout=0")
        except sqlite3.Error as exc:  # busy, or gone: the next round tries again
            log.debug("audit_checkpoint_skipped", error=type(exc).__name__)


_SQLITE_INSERT = (
    f"INSERT INTO audit_events ({', '.join(INSERT_COLUMNS)}) "  # noqa: S608 (no input)
    f"VALUES ({', '.join('?' * len(INSERT_COLUMNS))})"
)
_SQLITE_CHECKPOINT = (
    f"INSERT INTO audit_chain_checkpoints ({', '.join(_CHECKPOINT_COLUMNS)}) "  # noqa: S608
    f"VALUES ({', '.join('?' * len(_CHECKPOINT_COLUMNS))})"
)


class PostgresSink(Sink):
    """PostgreSQL through the driver's own connection, one round trip per batch.

    The sealed rows go with one prepared single-row statement, all rows pipelined in one
    round trip (``executemany``, which the driver makes atomic: one implicit transaction,
    committed at its end). No head row to lock or move: the writer knows its chain's head.
    Measured against a multi-row ``INSERT`` through SQLAlchemy, whose text (a placeholder per
    value) was built, sent and parsed anew for each batch: 23 µs of CPU per event instead of
    45. (COPY cost about as much CPU but two more round trips.)
    """

    def __init__(self, writer: AuditWriter, engine: AsyncEngine) -> None:
        self.writer = writer
        self.engine = engine
        self.conn: AsyncConnection | None = None  # owns the driver connection below
        self.raw: Any = None
        self._closing: set[asyncio.Task[None]] = set()
        #: the chain position a batch whose answer never came back would have reached
        self.uncertain: int | None = None

    async def _connect(self) -> Any:
        conn = await self.engine.connect()
        try:
            raw = (await conn.get_raw_connection()).driver_connection
            if raw is None:
                raise RuntimeError("no driver connection")
            # Bounded server-side too: a lock held elsewhere (a migration) is not waited on
            # past the promise, and a transaction cut off mid-way ends.
            limit = max(1, int(self.writer.give_up_after * 1000))
            await raw.execute(
                f"SET lock_timeout = {limit:d}; SET idle_in_transaction_session_timeout = 30000;"
                " SET application_name = 'tokenward-audit-writer'"
            )
            chain = self.writer.chain_id
            self.writer.resync(
                await raw.fetchrow(_PG_HEAD, chain), await raw.fetchrow(_PG_MARK, chain)
            )
        except BaseException:
            with contextlib.suppress(Exception):
                await conn.close()
            raise
        self.conn, self.raw = conn, raw
        return raw

    def _left(self, started: float) -> float:
        writer = self.writer
        if writer.mode != "sync":
            return 30.0
        return max(writer.give_up_after - (time.monotonic() - started), 0.05)

    async def write(self, rows: list[Prepared]) -> None:
        writer = self.writer
        started = time.monotonic()
        delay = 0.05
        while True:
            sent = False
            try:
                # Every attempt is bounded, so a database that hangs (a lock, a silent
                # network) fails the waiting requests within ``give_up_after`` too.
                async with asyncio.timeout(self._left(started)):
                    raw = self.raw if self.raw is not None else await self._connect()
                    head = writer.head
                    assert head is not None
                    if self.uncertain is not None:
                        landed, self.uncertain = head[0] >= self.uncertain, None
                        if landed:  # it was committed after all: written once, not twice
                            break
                    t0 = time.perf_counter()
                    sealed, new_head = writer.seal(rows, *head)
                    sent = True
                    await raw.executemany(_PG_INSERT, sealed)
                writer.head = new_head
                if writer.observe is not None:
                    writer.observe(len(rows), time.perf_counter() - t0)
                break
            except Exception as exc:
                # Closed in the background: against a database that does not answer, the
                # driver gives a close seconds of its own, which are not the requests' to wait.
                self._discard()
                if permanent(exc):
                    raise Permanent() from exc
                if sent:
                    self.uncertain = new_head[0]
                waited = time.monotonic() - started
                if writer.mode == "sync" and waited >= writer.give_up_after:
                    raise failed(len(rows), exc) from exc
                log.warning("audit_write_retry", error=type(exc).__name__, waited=round(waited, 2))
                # The last pause ends with the promise (then one more, short, attempt).
                if writer.mode == "sync":
                    delay = min(delay, writer.give_up_after - waited)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        if writer.checkpoint_due():
            await self.checkpoint(closed=False)

    async def checkpoint(self, *, closed: bool) -> None:
        writer = self.writer
        try:
            async with asyncio.timeout(max(writer.give_up_after, 1.0)):
                raw = self.raw if self.raw is not None else await self._connect()
                witness = await raw.fetch(WITNESS_SQL)
                values = writer.make_checkpoint(
                    [tuple(r) for r in witness], closed=closed, now=datetime.now(UTC)
                )
                await raw.execute(_PG_CHECKPOINT, *_checkpoint_params(values, sqlite=False))
        except Exception as exc:  # the next batch tries again
            self._discard()
            log.warning("audit_checkpoint_failed", error=type(exc).__name__)
            return
        writer.checkpoint_written(values)

    async def _drop(self) -> None:
        conn, self.conn, self.raw = self.conn, None, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.invalidate()  # the driver connection's state is unknown: not reused
            with contextlib.suppress(Exception):
                await conn.close()

    def _discard(self) -> None:
        task = asyncio.create_task(self._drop())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        await self._drop()  # not back to the pool: the session carries the settings above
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


_PG_HEAD = "SELECT seq, hash FROM audit_events WHERE chain_id = $1 ORDER BY seq DESC LIMIT 1"
_PG_MARK = (
    "SELECT n, mac, seq, closed FROM audit_chain_checkpoints WHERE chain_id = $1 "
    "ORDER BY n DESC LIMIT 1"
)
_PG_INSERT = (
    f"INSERT INTO audit_events ({', '.join(INSERT_COLUMNS)}) "  # noqa: S608 (no input)
    f"VALUES ({', '.join(f'${n + 1}' for n in range(len(INSERT_COLUMNS)))})"
)
_PG_CHECKPOINT = (
    f"INSERT INTO audit_chain_checkpoints ({', '.join(_CHECKPOINT_COLUMNS)}) "  # noqa: S608
    f"VALUES ({', '.join(f'${n + 1}' for n in range(len(_CHECKPOINT_COLUMNS)))})"
)
