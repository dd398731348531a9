"""Engines and migrations for SQLite (embedded default) and PostgreSQL (scale-out)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

MIGRATIONS = Path(__file__).parent / "migrations"


#: Bounds on every wait for PostgreSQL, in seconds (see docs/operations.md). A database that
#: hangs (a silent network, a frozen proxy) must end in an error the caller can answer 503
#: with, never in a request that waits forever.
CONNECT_TIMEOUT = 5.0  # opening a connection (TCP, TLS, authentication)
STATEMENT_TIMEOUT = 15.0  # one statement's round trip (an export or a verify reads pages)
POOL_TIMEOUT = 10.0  # waiting for a pooled connection while all are in use


def create_engine(
    url: str,
    *,
    pool_size: int = 10,
    connect_timeout: float | None = None,
    statement_timeout: float | None = None,
    pool_timeout: float | None = None,
    bounded: bool = True,
) -> AsyncEngine:
    """An async engine for ``url`` (``sqlite+aiosqlite:///…`` or ``postgresql+asyncpg://…``).

    SQL parameters are hidden from error messages (``hide_parameters``): they are request
    data, and an error's text reaches logs.

    On PostgreSQL every wait is bounded (the module's ``*_TIMEOUT`` unless given): opening a
    connection, each statement (the driver's ``command_timeout``, measured at the client, so
    it holds for a network that went silent too), and a pool checkout. A wait that runs out
    raises ``TimeoutError`` (or SQLAlchemy's ``TimeoutError`` for the pool). Maintenance
    commands run next to the database (``audit verify``, ``audit prune``) pass
    ``bounded=False``: one statement of theirs may rightly take minutes. SQLite waits on
    another process's write lock for at most its busy timeout (30 s); reads never wait on it.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        engine = create_async_engine(url, connect_args={"timeout": 30}, hide_parameters=True)

        @event.listens_for(engine.sync_engine, "connect")
        def _pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    if statement_timeout is None and bounded:
        statement_timeout = STATEMENT_TIMEOUT
    return create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        pool_timeout=POOL_TIMEOUT if pool_timeout is None else pool_timeout,
        hide_parameters=True,
        connect_args={
            "timeout": CONNECT_TIMEOUT if connect_timeout is None else connect_timeout,
            "command_timeout": statement_timeout,
        },
    )


def _config(connection: Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def _upgrade(connection: Connection) -> None:
    # alembic logs through the root logger: which of its lines show is logs.py's choice
    if connection.dialect.name == "postgresql":
        # Replicas starting together must not race each other through the migrations.
        connection.execute(text("SELECT pg_advisory_xact_lock(7261120001)"))
    command.upgrade(_config(connection), "heads")


@dataclass(frozen=True, slots=True)
class SchemaStatus:
    """Where a database's schema stands against this version's migrations."""

    #: revisions of this version the database lacks, oldest first (``tokenward migrate``)
    pending: tuple[str, ...]
    #: revisions in the database this version does not know (a newer version migrated it)
    unknown: tuple[str, ...]

    @property
    def behind(self) -> bool:
        return bool(self.pending)


def _status(connection: Connection) -> SchemaStatus:
    script = ScriptDirectory.from_config(_config(connection))
    current = set(MigrationContext.configure(connection).get_current_heads())
    known = [rev.revision for rev in reversed(list(script.walk_revisions()))]
    unknown = tuple(sorted(current.difference(known)))
    if unknown:
        # A newer version migrated it: its migrations include every one of this version
        # (revisions are only ever added), though their ancestry is not known here.
        return SchemaStatus(pending=(), unknown=unknown)
    applied: set[str] = set()
    for head in current:
        applied.update(rev.revision for rev in script.iterate_revisions(head, "base") if rev)
    return SchemaStatus(pending=tuple(r for r in known if r not in applied), unknown=())


class SchemaBehind(Exception):
    """The database lacks migrations of this version, and this process does not migrate."""

    def __init__(self, status: SchemaStatus) -> None:
        self.status = status
        shown = ", ".join(status.pending[:3]) + (", …" if len(status.pending) > 3 else "")
        count = len(status.pending)
        super().__init__(
            f"the database schema is behind this version: {count} "
            f"migration{'s are' if count > 1 else ' is'} pending ({shown}); run "
            "'tokenward migrate' first (this server does not migrate: --no-migrate)"
        )


async def require_current_schema(engine: AsyncEngine) -> SchemaStatus:
    """The schema's status; raises :class:`SchemaBehind` when migrations are pending."""
    status = await schema_status(engine)
    if status.behind:
        raise SchemaBehind(status)
    return status


async def schema_status(engine: AsyncEngine) -> SchemaStatus:
    """The migrations this version has and the database lacks (and the reverse); read-only."""
    async with engine.connect() as conn:
        return await conn.run_sync(_status)


async def migrate(engine: AsyncEngine) -> None:
    """Apply every pending Alembic migration (run on start).

    On PostgreSQL the migrations run on a connection of their own, without the statement
    timeout of request paths: rebuilding an index of a large table may take minutes.
    """
    if engine.dialect.name != "postgresql":
        async with engine.begin() as conn:
            await conn.run_sync(_upgrade)
        return
    own = create_async_engine(
        engine.url,
        poolclass=NullPool,
        hide_parameters=True,
        connect_args={"timeout": CONNECT_TIMEOUT},
    )
    try:
        async with own.begin() as conn:
            await conn.run_sync(_upgrade)
    finally:
        await own.dispose()


def sqlite_url(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"
