"""Helpers of the PostgreSQL gateway tests: a database and role of the test session's own on
the shared server, a gateway on port 0 in front of it, clients, and a private server (initdb)
that asks for a password, for the upstream login's SCRAM path."""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import secrets
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.engine import make_url

from tests.conftest import PG_ADMIN_URL
from tokenward.app import Services
from tokenward.events import AccessEvent
from tokenward.gateway import parse_policy
from tokenward.gateway.postgres import PostgresGateway
from tokenward.service import Issued, TokenSpec

PG = make_url(PG_ADMIN_URL)
PG_HOST, PG_PORT = PG.host or "127.0.0.1", PG.port or 5432


@dataclass(frozen=True)
class Database:
    name: str
    role: str
    password: str
    host: str = PG_HOST
    port: int = PG_PORT


async def admin_exec(statements: list[str], *, database: str | None = None, **connect) -> None:
    import asyncpg

    params = {
        "host": PG_HOST,
        "port": PG_PORT,
        "user": PG.username,
        "database": database or PG.database,
        **connect,
    }
    conn = await asyncpg.connect(**params)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


@contextlib.contextmanager
def shared_database() -> Iterator[Database]:
    """A database owned by a login role of its own (random password), on the shared server."""
    tag = f"{os.getpid()}_{secrets.token_hex(3)}"
    db = Database(f"tw_pgw_{tag}", f"tw_gw_{tag}", secrets.token_urlsafe(18))
    asyncio.run(
        admin_exec(
            [
                f"CREATE ROLE {db.role} LOGIN PASSWORD '{db.password}'",
                f'CREATE DATABASE "{db.name}" OWNER {db.role}',
            ]
        )
    )
    asyncio.run(
        admin_exec(
            [
                "CREATE TABLE items (id int PRIMARY KEY, name text NOT NULL)",
                "INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 100) g",
            ],
            database=db.name,
            user=db.role,
        )
    )
    try:
        yield db
    finally:
        asyncio.run(
            admin_exec(
                [f'DROP DATABASE IF EXISTS "{db.name}" WITH (FORCE)', f"DROP ROLE {db.role}"]
            )
        )


class Sink:
    def __init__(self) -> None:
        self.access_events: list[AccessEvent] = []

    async def access(self, event: AccessEvent) -> None:
        if event.source == "postgres":
            self.access_events.append(event)

    async def admin(self, event: object) -> None:
        pass

    async def security(self, event: object) -> None:
        pass

    def connections(self) -> list[AccessEvent]:
        return [e for e in self.access_events if e.method == "CONNECT"]

    def queries(self) -> list[AccessEvent]:
        return [e for e in self.access_events if e.method != "CONNECT"]


@dataclass
class Harness:
    services: Services
    admin: Issued
    database: Database
    gateway: PostgresGateway
    sink: Sink
    port: int
    tokens: dict[str, Issued] = field(default_factory=dict)

    async def token(self, *scopes: str, project: str = "shop", **fields: object) -> Issued:
        if await self.services.store.get_project(project) is None:
            await self.services.tokens.create_project(self.admin.record, project)
        spec = TokenSpec(project=project, scopes=list(scopes), **fields)  # type: ignore[arg-type]
        return await self.services.tokens.create_token(self.admin.record, spec)

    def dsn(self, token: str, **extra: str) -> str:
        parts = {
            "host": "127.0.0.1",
            "port": str(self.port),
            "dbname": self.database.name,
            "user": "alice",
            "password": token,
            "sslmode": "disable",
            "connect_timeout": "10",
            **extra,
        }
        return " ".join(f"{k}={v}" for k, v in parts.items())

    async def asyncpg(self, token: str, **kw: object):  # type: ignore[no-untyped-def]
        import asyncpg

        return await asyncpg.connect(
            host="127.0.0.1",
            port=self.port,
            user="alice",
            password=token,
            database=self.database.name,
            ssl=False,
            **kw,
        )

    async def settle(self) -> None:
        """Wait until every session has ended (and its audit events are submitted)."""
        for _ in range(1000):
            if not self.gateway._handlers:
                return
            await asyncio.sleep(0.005)
        raise AssertionError("sessions are still open")

    async def psql(self, token: str, *sql: str, **extra: str) -> subprocess.CompletedProcess[str]:
        args = ["psql", "-X", "-At", "-v", "ON_ERROR_STOP=1"]
        for statement in sql:
            args += ["-c", statement]
        dsn = self.dsn(token, **extra)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["PGPASSWORD"] = token
        dsn = " ".join(p for p in dsn.split(" ") if not p.startswith("password="))
        result = await asyncio.to_thread(
            subprocess.run, [*args, dsn], env=env, capture_output=True, text=True, timeout=30
        )
        await self.settle()
        return result


def policy_text(database: Database, extra: str = "", *, upstream: str | None = None) -> str:
    upstream = (
        upstream or f"postgresql://{database.role}@{database.host}:{database.port}/{database.name}"
    )
    return f"""
[[postgres]]
name = "appdb"
listen = "127.0.0.1:0"
upstream = "{upstream}"
read_scope = "db:appdb:read"
write_scope = "db:appdb:write"
{extra}
"""


@contextlib.asynccontextmanager
async def running_gateway(
    services: Services,
    admin: Issued,
    database: Database,
    extra: str = "",
    *,
    upstream: str | None = None,
    **options: object,
) -> AsyncIterator[Harness]:
    policy = parse_policy(policy_text(database, extra, upstream=upstream), "test.toml")
    assert services.enforcement is not None
    gateway = PostgresGateway(services.enforcement, policy.postgres, **options)  # type: ignore[arg-type]
    sink = Sink()
    services.events.subscribe(sink)
    await gateway.start()
    try:
        yield Harness(services, admin, database, gateway, sink, gateway.ports["appdb"])
    finally:
        await gateway.aclose()
        services.events.subscribers.remove(sink)


async def raw_connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def read_message(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    header = await asyncio.wait_for(reader.readexactly(5), 5)
    length = struct.unpack("!i", header[1:])[0]
    return header[:1], await reader.readexactly(length - 4)


def startup(user: str, database: str) -> bytes:
    body = struct.pack("!i", 196608)
    body += f"user\x00{user}\x00database\x00{database}\x00\x00".encode()
    return struct.pack("!i", len(body) + 4) + body


# -- a private server that asks for a password -----------------------------------------------


def _bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return found[-1] if found else shutil.which(name)


@dataclass(frozen=True)
class PrivateServer:
    port: int
    superuser_password: str


@contextlib.contextmanager
def private_server() -> Iterator[PrivateServer | None]:
    """A throwaway PostgreSQL (initdb + pg_ctl) with SCRAM-SHA-256 on loopback, or ``None``
    when the server binaries are not installed. As root, it runs as the ``postgres`` user."""
    initdb, pg_ctl = _bin("initdb"), _bin("pg_ctl")
    if initdb is None or pg_ctl is None:
        yield None
        return
    base = Path(tempfile.mkdtemp(prefix="tw_pg_"))
    prefix: list[str] = []
    if os.geteuid() == 0:
        prefix = ["runuser", "-u", "postgres", "--"]
        shutil.chown(base, "postgres", "postgres")
    password = secrets.token_urlsafe(18)
    pwfile = base / "pw"
    pwfile.write_text(password)
    if prefix:
        shutil.chown(pwfile, "postgres", "postgres")
    from tokenward.server import self_signed

    cert, key, _ = self_signed(base / "tls", "127.0.0.1")
    os.chmod(key, 0o600)
    if prefix:
        for path in (base / "tls", cert, key):
            shutil.chown(path, "postgres", "postgres")
    data = base / "data"
    subprocess.run(
        [*prefix, initdb, "-D", str(data), "-U", "postgres", "-A", "scram-sha-256",
         f"--pwfile={pwfile}", "-E", "UTF8", "--no-sync"],
        check=True, capture_output=True,
    )  # fmt: skip
    port = 0
    try:
        for _ in range(10):  # a port taken between the probe and the bind: try another
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            result = subprocess.run(
                [*prefix, pg_ctl, "-D", str(data), "-l", str(base / "log"), "-w", "-t", "30",
                 "-o", f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off "
                 f"-c ssl=on -c ssl_cert_file={cert} -c ssl_key_file={key}",
                 "start"],
                capture_output=True, text=True,
            )  # fmt: skip
            if result.returncode == 0:
                break
            log = (base / "log").read_text() if (base / "log").exists() else ""
            if "Address already in use" not in log:
                raise RuntimeError(f"pg_ctl start failed: {result.stderr}{log}")
            time.sleep(0.1)
        yield PrivateServer(port, password)
    finally:
        subprocess.run([*prefix, pg_ctl, "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)  # fmt: skip
        shutil.rmtree(base, ignore_errors=True)
