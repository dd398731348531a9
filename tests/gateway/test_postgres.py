"""PostgreSQL through tokenward, with real clients (psql, psycopg 3, asyncpg, pgbench) against
the real server, on the SQLite and the PostgreSQL token store (docs/databases.md)."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta

import asyncpg
import psycopg
import pytest

from tests.conftest import two_replicas
from tests.gateway.pgsupport import (
    Database,
    Harness,
    PrivateServer,
    admin_exec,
    private_server,
    raw_connect,
    read_message,
    running_gateway,
    shared_database,
    startup,
)
from tokenward.audit.query import AuditFilter, list_events
from tokenward.gateway.pgwire import error_fields
from tokenward.service import issue_bootstrap_record
from tokenward.tokens.model import Reason

pytestmark = pytest.mark.postgres


@pytest.fixture(scope="session")
def database() -> Iterator[Database]:
    with shared_database() as db:
        yield db


@pytest.fixture
async def pg(services, admin, database) -> AsyncIterator[Harness]:
    async with running_gateway(services, admin, database) as harness:
        yield harness


def sqlstate(result: subprocess.CompletedProcess[str]) -> str:
    return result.stderr


# -- psql: sessions, scopes, audit ------------------------------------------------------------


async def test_psql_write_session_runs_statements_and_each_is_audited(pg: Harness):
    writer = await pg.token("db:appdb:write")
    result = await pg.psql(
        writer.secret,
        "CREATE TEMP TABLE notes (id int, body text)",
        "INSERT INTO notes VALUES (1, 'secret value'), (2, 'another')",
        "SELECT count(*) FROM items WHERE id <= 10",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "10"
    (connect,) = pg.sink.connections()
    assert connect.decision.allowed and connect.scope == "db:appdb:write"
    assert connect.detail is not None and connect.detail["session"] == "read_write"
    assert connect.decision.token is not None and connect.decision.token.id == writer.record.id
    queries = {e.method: e for e in pg.sink.queries()}
    insert = queries["INSERT"]
    assert insert.path == "INSERT INTO notes VALUES (?, ?), (?, ?)"  # values redacted
    assert insert.detail == {"protocol": "simple", "tag": "INSERT 0 2", "rows": 2,
                             "listener": "appdb"}  # fmt: skip
    assert queries["SELECT"].detail is not None and queries["SELECT"].detail["rows"] == 1
    assert all(e.request_id == connect.request_id for e in pg.sink.queries())
    assert "secret value" not in repr(pg.sink.access_events)
    # The audit log holds them, with the detail merged into its record.
    assert pg.services.audit is not None
    await pg.services.audit.flush()
    page = await list_events(pg.services.engine, AuditFilter(request_id=connect.request_id))
    stored = {e.values["method"]: e.values for e in page.events}
    assert stored["INSERT"]["detail"]["tag"] == "INSERT 0 2"
    assert stored["INSERT"]["resource"] == "INSERT INTO notes VALUES (?, ?), (?, ?)"
    assert stored["CONNECT"]["decision"] == "allow" and stored["CONNECT"]["source"] == "postgres"
    assert writer.secret not in repr(page.events)


async def test_psql_read_session_is_read_only_at_the_server(pg: Harness):
    reader = await pg.token("db:appdb:read")
    ok = await pg.psql(
        reader.secret,
        "SHOW default_transaction_read_only",
        "SELECT 1",
        options="'-c default_transaction_read_only=off'",  # dropped: never reaches the server
        dbname="appdb",  # the listener's name is accepted for the upstream database
    )
    assert ok.returncode == 0 and ok.stdout.split() == ["on", "1"], ok.stderr
    (connect,) = pg.sink.connections()
    assert connect.detail is not None
    assert connect.detail["session"] == "read_only" and connect.detail["user"] == "alice"
    write = await pg.psql(reader.secret, "INSERT INTO items VALUES (1000, 'x')")
    assert "cannot execute INSERT in a read-only transaction" in write.stderr
    event = next(e for e in pg.sink.queries() if e.method == "INSERT")
    assert event.detail is not None and event.detail["sqlstate"] == "25006"
    for attempt in (
        "SET default_transaction_read_only = off",
        "BEGIN READ WRITE",
        "START TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ WRITE",
        "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE",
        "SELECT set_config('default_transaction_read_only', 'off', false)",
    ):
        refused = await pg.psql(reader.secret, attempt)
        assert refused.returncode != 0 and "this token may only read" in refused.stderr, attempt
    denied = [e for e in pg.sink.queries() if not e.decision.allowed]
    assert len(denied) == 5
    assert {e.decision.reason for e in denied} == {Reason.INSUFFICIENT_SCOPE}
    assert {e.scope for e in denied} == {"db:appdb:write"}
    # RESET and DISCARD ALL go back to the startup value: read-only.
    reset = await pg.psql(
        reader.secret, "DISCARD ALL", "RESET ALL", "SHOW default_transaction_read_only"
    )
    assert reset.stdout.split()[-1] == "on", reset.stderr


async def test_a_read_session_made_read_write_by_other_means_is_closed(pg: Harness):
    reader = await pg.token("db:appdb:read")
    sneaky = "SELECT set_config('default_transaction_' || 'rea' || 'd_only', 'off', false)"
    result = await pg.psql(reader.secret, sneaky, "INSERT INTO items VALUES (1001, 'x')")
    assert result.returncode != 0
    assert "the session was made read-write and is closed" in result.stderr
    async with await psycopg.AsyncConnection.connect(
        pg.dsn((await pg.token("db:appdb:read")).secret)
    ) as conn:
        cur = await conn.execute("SELECT count(*) FROM items WHERE id = 1001")
        assert (await cur.fetchone()) == (0,)


# -- denials --------------------------------------------------------------------------------


async def test_denied_connections_get_an_error_response_that_says_why(pg: Harness):
    cases = []
    nothing = await pg.token("records:read")
    cases.append((nothing.secret, "28000", "lacks the scope", Reason.INSUFFICIENT_SCOPE))
    cases.append(("tw_live_" + "a" * 38, "28P01", "malformed", Reason.BAD_CHECKSUM))
    revoked = await pg.token("db:appdb:read")
    await pg.services.tokens.revoke_token(pg.admin.record, revoked.record.id, "test")
    cases.append((revoked.secret, "28P01", "revoked", Reason.REVOKED))
    limited = await pg.token("db:appdb:read", rate_limit=["1/minute"])
    assert (await pg.psql(limited.secret, "SELECT 1")).returncode == 0
    cases.append((limited.secret, "53300", "rate limit", Reason.RATE_LIMITED))
    for secret, code, text, reason in cases:
        async with asyncio.timeout(10):
            with pytest.raises(psycopg.OperationalError) as info:
                await psycopg.AsyncConnection.connect(pg.dsn(secret))
        assert text in str(info.value) and "tokenward" in str(info.value)
        event = pg.sink.connections()[-1]
        assert not event.decision.allowed and event.decision.reason is reason
        assert secret not in repr(event)
    # The SQLSTATE is the one asked for (asyncpg exposes it).
    with pytest.raises(asyncpg.InvalidPasswordError) as bad:  # 28P01
        await pg.asyncpg("tw_live_" + "a" * 38)
    assert bad.value.sqlstate == "28P01"
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError) as scope:  # 28000
        await pg.asyncpg(nothing.secret)
    assert "db:appdb:read" in str(scope.value)
    with pytest.raises(asyncpg.TooManyConnectionsError):  # 53300
        await pg.asyncpg(limited.secret)
    with pytest.raises(asyncpg.InvalidCatalogNameError):  # 3D000
        await asyncpg.connect(
            host="127.0.0.1", port=pg.port, user="a", password=nothing.secret, database="other"
        )


async def test_connections_per_token_are_limited(services, admin, database):
    async with running_gateway(services, admin, database, "max_connections_per_token = 2") as pg:
        token = await pg.token("db:appdb:read")
        held = [await pg.asyncpg(token.secret) for _ in range(2)]
        with pytest.raises(asyncpg.TooManyConnectionsError, match="max_connections_per_token"):
            await pg.asyncpg(token.secret)
        other = await pg.asyncpg((await pg.token("db:appdb:read")).secret)  # another token: fine
        await held.pop().close()
        held.append(await pg.asyncpg(token.secret))  # a slot came free
        for conn in (*held, other):
            assert await conn.fetchval("SELECT 1") == 1
            await conn.close()


# -- psycopg and asyncpg: the extended protocol ------------------------------------------------


async def test_psycopg_sync_and_async_with_parameters(pg: Harness):
    writer = await pg.token("db:appdb:write")

    def sync_client() -> list[tuple[int, str]]:
        with psycopg.connect(pg.dsn(writer.secret)) as conn:
            conn.execute("CREATE TEMP TABLE t (id int, name text)")
            conn.execute("INSERT INTO t VALUES (%s, %s)", (1, "hidden-name"))
            with conn.cursor() as cur:
                cur.executemany("INSERT INTO t VALUES (%s, %s)", [(2, "b"), (3, "c")])
            return conn.execute(
                "SELECT id, name FROM t WHERE id >= %s ORDER BY id", (2,)
            ).fetchall()

    assert await asyncio.to_thread(sync_client) == [(2, "b"), (3, "c")]
    async with await psycopg.AsyncConnection.connect(pg.dsn(writer.secret)) as conn:
        async with conn.transaction():
            cur = await conn.execute("SELECT name FROM items WHERE id = %s", (7,))
            assert await cur.fetchone() == ("item 7",)
        cur = await conn.execute("SELECT id FROM items WHERE id < %s", (6,))
        assert len(await cur.fetchall()) == 5
    await pg.settle()
    texts = [e.path for e in pg.sink.queries()]
    assert "INSERT INTO t VALUES ($1, $2)" in texts
    assert "hidden-name" not in repr(pg.sink.access_events)
    select = next(e for e in pg.sink.queries() if e.path == "SELECT id FROM items WHERE id < $1")
    assert select.detail is not None
    assert select.detail["protocol"] == "extended" and select.detail["rows"] == 5
    assert len(pg.sink.connections()) == 2


async def test_asyncpg_prepared_statements_transactions_and_cancel(pg: Harness):
    writer = await pg.token("db:appdb:write")
    conn = await pg.asyncpg(writer.secret)
    try:
        statement = await conn.prepare("SELECT name FROM items WHERE id = $1")
        for i in (1, 2, 3):
            assert await statement.fetchval(i) == f"item {i}"
        await conn.execute("CREATE TEMP TABLE t (id int)")
        await conn.executemany("INSERT INTO t VALUES ($1)", [(i,) for i in range(10)])
        async with conn.transaction():
            await conn.execute("DELETE FROM t WHERE id < 5")
        assert await conn.fetchval("SELECT count(*) FROM t") == 5
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.execute("INSERT INTO items VALUES (1, 'dup')")
        # asyncpg cancels a query that runs past its timeout with a CancelRequest: the
        # gateway relays it to this session's backend, and the session goes on.
        started = time.monotonic()
        with pytest.raises(asyncio.TimeoutError):
            await conn.fetchval("SELECT pg_sleep(20)", timeout=0.3)
        assert time.monotonic() - started < 5
        assert await conn.fetchval("SELECT 41 + 1") == 42
    finally:
        await conn.close()
    await pg.settle()
    prepared = [e for e in pg.sink.queries() if e.path == "SELECT name FROM items WHERE id = $1"]
    assert len(prepared) == 3 and all(e.detail and e.detail["rows"] == 1 for e in prepared)
    dup = next(e for e in pg.sink.queries() if e.detail and e.detail.get("sqlstate") == "23505")
    assert dup.path == "INSERT INTO items VALUES (?, ?)"
    cancelled = next(e for e in pg.sink.queries() if e.path == "SELECT pg_sleep($1)" or
                     (e.path or "").startswith("SELECT pg_sleep"))  # fmt: skip
    assert cancelled.detail is not None and cancelled.detail["sqlstate"] == "57014"


async def test_a_cancel_request_with_a_wrong_key_cancels_nothing(pg: Harness):
    conn = await pg.asyncpg((await pg.token("db:appdb:read")).secret)
    try:
        (session,) = pg.gateway.sessions
        query = asyncio.ensure_future(conn.fetchval("SELECT pg_sleep(0.6)"))
        await asyncio.sleep(0.1)
        _, writer = await raw_connect(pg.port)
        wrong = (session.client_key + 1) & 0x7FFFFFFF
        writer.write(struct.pack("!iiii", 16, 80877102, session.client_pid, wrong))
        await writer.drain()
        writer.close()
        assert await query is None  # pg_sleep returns void: ran to its end, not cancelled
    finally:
        await conn.close()


# -- revocation, quarantine, expiry -----------------------------------------------------------


async def _closed_within(conn: asyncpg.Connection, limit: float) -> float:
    started = time.perf_counter()
    while not conn.is_closed():
        if time.perf_counter() - started > limit:
            raise AssertionError(f"the session is still open after {limit} s")
        await asyncio.sleep(0.002)
    return time.perf_counter() - started


async def test_revocation_and_quarantine_end_live_sessions_at_once(pg: Harness):
    token = await pg.token("db:appdb:read")
    conns = [await pg.asyncpg(token.secret) for _ in range(3)]
    bystander = await pg.asyncpg((await pg.token("db:appdb:read")).secret)
    started = time.perf_counter()
    await pg.services.tokens.revoke_token(pg.admin.record, token.record.id, "leaked")
    returned = time.perf_counter() - started
    after = max([await _closed_within(c, 2.0) for c in conns])
    elapsed = time.perf_counter() - started
    print(
        f"\nrevocation -> sessions closed (same replica): {elapsed * 1000:.1f} ms from the "
        f"revoke call ({returned * 1000:.1f} ms in the call, {after * 1000:.1f} ms after it)"
    )
    assert elapsed < 0.5
    assert await bystander.fetchval("SELECT 1") == 1
    terminated = [e for e in pg.sink.connections() if e.detail and e.detail.get("terminated")]
    assert len(terminated) == 3 and {e.decision.reason for e in terminated} == {Reason.REVOKED}
    # Quarantine, with the client seeing 57P01 before the close.
    suspect = await pg.token("db:appdb:read")
    async with await psycopg.AsyncConnection.connect(pg.dsn(suspect.secret)) as conn:
        await pg.services.tokens.quarantine_token(None, suspect.record.id, "anomaly")
        await asyncio.sleep(0.2)
        with pytest.raises(psycopg.errors.AdminShutdown, match="quarantined"):
            await conn.execute("SELECT 1")
    await bystander.close()


async def test_an_expiring_token_ends_its_sessions_at_expiry(pg: Harness):
    now = pg.services.verifier.clock()
    token = await pg.token("db:appdb:read", expires_at=now + timedelta(seconds=1.5))
    conn = await pg.asyncpg(token.secret)
    assert await conn.fetchval("SELECT 1") == 1
    expires = token.record.expires_at
    assert expires is not None
    await asyncio.sleep(max(0.0, (expires - pg.services.verifier.clock()).total_seconds()))
    late = await _closed_within(conn, 3.0)
    print(f"\nexpiry -> session closed: {late * 1000:.0f} ms after expires_at")
    assert late < 1.5
    event = pg.sink.connections()[-1]
    assert event.decision.reason is Reason.EXPIRED and event.detail and event.detail["terminated"]


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
async def test_a_revocation_on_another_replica_ends_sessions_here(settings, database):
    async with two_replicas(settings) as (here, there):
        admin = issue_bootstrap_record(here.hasher, here.verifier.clock())
        await here.store.insert_token(admin.record, here.hasher.hash(admin.secret))
        async with running_gateway(here, admin, database) as pg:
            token = await pg.token("db:appdb:read")
            conn = await pg.asyncpg(token.secret)
            await asyncio.wait_for(there.fanout.subscribed.wait(), 5)
            await asyncio.wait_for(here.fanout.subscribed.wait(), 5)
            started = time.perf_counter()
            await there.tokens.revoke_token(admin.record, token.record.id, "leaked")
            returned = time.perf_counter() - started
            after = await _closed_within(conn, 5.0)
            elapsed = time.perf_counter() - started
            print(
                f"\nrevocation on another replica -> session closed: {elapsed * 1000:.1f} ms "
                f"from the revoke call ({returned * 1000:.1f} ms in it, {after * 1000:.1f} after)"
            )
            assert elapsed < 1.0


# -- limits and garbage ------------------------------------------------------------------------


async def test_idle_and_statement_timeouts(services, admin, database):
    async with running_gateway(
        services, admin, database, "idle_timeout = 0.5\nstatement_timeout = 0.5"
    ) as pg:
        token = await pg.token("db:appdb:read")
        conn = await pg.asyncpg(token.secret)
        with pytest.raises(asyncpg.QueryCanceledError, match="statement timeout"):
            await conn.fetchval("SELECT pg_sleep(5)")
        # a SET cannot lift it past tokenward: the gateway cancels the query itself
        await conn.execute("SET statement_timeout = 0")
        started = time.monotonic()
        with pytest.raises(asyncpg.QueryCanceledError):
            await conn.fetchval("SELECT pg_sleep(10)")
        assert time.monotonic() - started < 3.5
        await _closed_within(conn, 3.0)  # then idle for longer than idle_timeout

        def idle_client() -> None:
            with psycopg.connect(pg.dsn(token.secret)) as sync:
                time.sleep(1.3)
                with pytest.raises(psycopg.OperationalError, match="idle timeout"):
                    sync.execute("SELECT 1")

        await asyncio.to_thread(idle_client)


async def test_garbage_gets_an_error_and_a_close_and_no_one_else_notices(services, admin, database):
    async with running_gateway(services, admin, database, "max_message_bytes = 4096") as pg:
        token = await pg.token("db:appdb:read")
        bystander = await pg.asyncpg(token.secret)
        # Not the protocol at all (an HTTP request).
        reader, writer = await raw_connect(pg.port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        kind, body = await read_message(reader)
        assert kind == b"E" and error_fields(body)["C"] == "08P01"
        assert await reader.read() == b""
        writer.close()
        # GSSENCRequest: refused cleanly with 'N', and the client may go on.
        reader, writer = await raw_connect(pg.port)
        writer.write(struct.pack("!ii", 8, 80877104))
        assert await reader.readexactly(1) == b"N"
        writer.write(startup("alice", pg.database.name))
        kind, body = await read_message(reader)
        assert kind == b"R" and struct.unpack("!i", body)[0] == 3  # cleartext password
        # Garbage after the login: an unknown message type.
        writer.write(b"p" + struct.pack("!i", 4 + len(token.secret) + 1) + token.secret.encode())
        writer.write(b"\x00")
        while (await read_message(reader))[0] != b"Z":
            pass
        writer.write(b"\x01\x00\x00\x00\x04")
        kind, body = await read_message(reader)
        assert kind == b"E" and error_fields(body)["C"] == "08P01"
        assert await reader.read() == b""
        writer.close()
        # A message over the size bound.
        conn = await pg.asyncpg(token.secret)
        with pytest.raises(
            (asyncpg.ProgramLimitExceededError, asyncpg.ConnectionDoesNotExistError)
        ):
            await conn.fetchval("SELECT $1::text", "x" * 10_000)
        await _closed_within(conn, 2.0)
        assert await bystander.fetchval("SELECT count(*) FROM items") == 100
        await bystander.close()
        malformed = [e for e in pg.sink.connections() if e.decision.reason is Reason.MALFORMED]
        assert len(malformed) == 1


# -- transport: TLS, plain only on loopback ----------------------------------------------------


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_tls_with_the_api_certificate_and_plain_only_on_loopback(
    services, admin, database, tmp_path
):
    from tokenward.server import self_signed

    cert, key, _ = self_signed(tmp_path / "tls", "127.0.0.1")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    async with running_gateway(services, admin, database, ssl_context=context) as pg:
        token = await pg.token("db:appdb:read")
        result = await pg.psql(token.secret, "SELECT ssl FROM pg_stat_ssl LIMIT 0", "SELECT 1",
                               sslmode="verify-full", sslrootcert=str(cert))  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert pg.sink.connections()[-1].detail["tls"] is True  # type: ignore[index]
        # A client that is not on loopback must use TLS: plain is refused before any password.
        pg.gateway.plain_allowed = lambda ip: False  # type: ignore[method-assign]
        plain = await pg.psql(token.secret, "SELECT 1")
        assert plain.returncode != 0 and "only over TLS" in plain.stderr
        tls = await pg.psql(token.secret, "SELECT 1", sslmode="require")
        assert tls.returncode == 0, tls.stderr
    async with running_gateway(services, admin, database) as pg:  # no TLS configured: 'N'
        pg.gateway.plain_allowed = lambda ip: False  # type: ignore[method-assign]
        refused = await pg.psql(token.secret, "SELECT 1", sslmode="prefer")
        assert "TLS is not configured" in refused.stderr


# -- the upstream login: a server that asks for a password (SCRAM-SHA-256) ---------------------


@pytest.fixture(scope="session")
def scram_server() -> Iterator[PrivateServer]:
    with private_server() as server:
        if server is None:
            pytest.skip("the PostgreSQL server binaries are not installed")
        yield server


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_the_upstream_login_is_tokenwards_own_with_scram(
    services, admin, scram_server, monkeypatch
):
    password, tag = os.urandom(12).hex(), os.urandom(3).hex()
    role, name = f"tw_gateway_{tag}", f"app_{tag}"
    await admin_exec(
        [f"CREATE ROLE {role} LOGIN PASSWORD '{password}'", f"CREATE DATABASE {name} OWNER {role}"],
        port=scram_server.port, user="postgres", database="postgres",
        password=scram_server.superuser_password,
    )  # fmt: skip
    db = Database(name, role, password, "127.0.0.1", scram_server.port)
    monkeypatch.setenv("TOKENWARD_PG_APP_PASSWORD", password)
    extra = 'password_env = "TOKENWARD_PG_APP_PASSWORD"'
    async with running_gateway(services, admin, db, extra) as pg:
        token = await pg.token("db:appdb:write")
        result = await pg.psql(token.secret, "SELECT current_user")
        assert result.returncode == 0 and result.stdout.strip() == role, result.stderr
        again = await pg.psql(token.secret, "SELECT 2")  # the salted password is cached
        assert again.stdout.strip() == "2"
    monkeypatch.setenv("TOKENWARD_PG_APP_PASSWORD", "wrong")
    async with running_gateway(services, admin, db, extra) as pg:
        result = await pg.psql((await pg.token("db:appdb:write")).secret, "SELECT 1")
        assert "could not log in to the database upstream" in result.stderr
        event = pg.sink.connections()[-1]
        assert event.detail and "password authentication failed" in event.detail["upstream_error"]
        assert password not in repr(pg.sink.access_events)
    # TLS to the upstream: sslmode=require encrypts; verify-full also checks the certificate
    # (this server's is self-signed, so the login fails)
    monkeypatch.setenv("TOKENWARD_PG_APP_PASSWORD", password)
    upstream = f"postgresql://{role}@127.0.0.1:{scram_server.port}/{name}?sslmode=require"
    async with running_gateway(services, admin, db, extra, upstream=upstream) as pg:
        token = await pg.token("db:appdb:read")
        ssl_used = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        result = await pg.psql(token.secret, ssl_used)
        assert result.returncode == 0 and result.stdout.strip() == "t", result.stderr
    strict = upstream.replace("sslmode=require", "sslmode=verify-full")
    async with running_gateway(services, admin, db, extra, upstream=strict) as pg:
        result = await pg.psql((await pg.token("db:appdb:read")).secret, "SELECT 1")
        assert "could not log in" in result.stderr
        assert "CERTIFICATE_VERIFY_FAILED" in pg.sink.connections()[-1].detail["upstream_error"]  # type: ignore[index]
    async with running_gateway(services, admin, db) as pg:  # no password configured
        result = await pg.psql((await pg.token("db:appdb:write")).secret, "SELECT 1")
        assert "could not log in" in result.stderr
        assert "password_file or password_env" in pg.sink.connections()[-1].detail["upstream_error"]  # type: ignore[index]


# -- pgbench, and `tokenward serve --config` ----------------------------------------------------


def _pgbench(port: int, token: str, database: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(PGPASSWORD=token, PGSSLMODE="disable")
    return subprocess.run(
        ["pgbench", "-h", "127.0.0.1", "-p", str(port), "-U", "alice", *args, database],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.mark.slow
async def test_pgbench_initialises_and_runs_through_the_gateway(pg: Harness):
    writer = await pg.token("db:appdb:write")
    name = pg.database.name
    init = await asyncio.to_thread(_pgbench, pg.port, writer.secret, name, "-i", "-s", "1", "-q")
    assert init.returncode == 0, init.stderr  # COPY FROM STDIN, VACUUM, ALTER TABLE
    reader = await pg.token("db:appdb:read")
    for mode in ("prepared", "simple", "extended"):
        run = await asyncio.to_thread(
            _pgbench, pg.port, reader.secret, name, "-S", "-M", mode, "-c", "2", "-T", "1", "-n"
        )
        assert run.returncode == 0, run.stderr
        assert "number of failed transactions: 0" in run.stdout, run.stdout
    # a read-only token cannot run the TPC-B-like (writing) script: PostgreSQL refuses
    denied = await asyncio.to_thread(
        _pgbench, pg.port, reader.secret, name, "-c", "1", "-t", "1", "-n"
    )
    assert denied.returncode != 0 and "read-only transaction" in denied.stderr
    await pg.settle()
    selects = [e for e in pg.sink.queries() if (e.path or "").startswith("SELECT abalance FROM")]
    assert selects and all(e.decision.allowed for e in selects)
    texts = {e.path for e in selects}
    assert texts == {
        "SELECT abalance FROM pgbench_accounts WHERE aid = ?;",  # -M simple: value redacted
        "SELECT abalance FROM pgbench_accounts WHERE aid = $1;",  # prepared and extended
    }


@pytest.mark.slow
def test_serve_with_config_starts_the_postgres_listener(tmp_path, database):
    from tests.conftest import closed_port, serve_tokenward, tokenward_cmd

    # The API and the gateway bind port 0 and the banner names what they got; the listener's
    # address is a line of the policy file, so its port is one a socket held until now.
    with closed_port() as pg_port:
        pass
    config = tmp_path / "tokenward.toml"
    config.write_text(
        f'[[postgres]]\nname = "appdb"\nlisten = "127.0.0.1:{pg_port}"\n'
        f'upstream = "postgresql://{database.role}@127.0.0.1:{database.port}/{database.name}"\n'
        'password_env = "TOKENWARD_PG_APPDB_PASSWORD"\n'
        'read_scope = "db:appdb:read"\nwrite_scope = "db:appdb:write"\n'
    )
    env = {
        **os.environ,
        "TOKENWARD_DATA_DIR": str(tmp_path / "data"),
        "TOKENWARD_GATEWAY_CONFIG": str(config),
    }

    def run(*args: str, extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(tokenward_cmd(*args), env={**env, **(extra or {})},
                              capture_output=True, text=True, timeout=60)  # fmt: skip

    missing = run("serve", "--init")
    assert missing.returncode == 2 and "TOKENWARD_PG_APPDB_PASSWORD is not set" in missing.stderr
    env["TOKENWARD_PG_APPDB_PASSWORD"] = database.password
    admin = __import__("json").loads(run("init", "--json").stdout)["admin_token"]
    served = serve_tokenward(env=env, gateway=True)
    proc = served.proc
    try:
        deadline = time.monotonic() + 20
        while True:  # the listener starts with the gateway, after the banner
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", pg_port)) == 0:
                    break
            assert time.monotonic() < deadline, "the PostgreSQL listener did not start"
            time.sleep(0.05)
        cli = {"TOKENWARD_URL": served.url, "TOKENWARD_ADMIN_TOKEN": admin}
        assert run("project", "create", "shop", extra=cli).returncode == 0
        created = run("token", "create", "--project", "shop", "--scope", "db:appdb:read",
                      "--json", extra=cli)  # fmt: skip
        token = __import__("json").loads(created.stdout)["token"]
        psql_env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        psql_env["PGPASSWORD"] = token
        result = subprocess.run(
            ["psql", "-X", "-At", "-c", "SELECT count(*) FROM items",
             f"host=127.0.0.1 port={pg_port} dbname={database.name} user=alice"],
            env=psql_env, capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert result.returncode == 0 and result.stdout.strip() == "100", result.stderr
    finally:
        proc.terminate()
        proc.wait(20)
    assert f"postgres:  appdb on 127.0.0.1:{pg_port}" in "".join(served.lines)


# -- more of what docs/databases.md promises ---------------------------------------------------


async def test_listener_project_rate_limit_connection_count_and_uses(services, admin, database):
    extra = 'project = "shop"\nrate_limit = "3/minute"\nmax_connections = 2'
    async with running_gateway(services, admin, database, extra) as pg:
        other = await pg.token("db:appdb:read", project="other")
        with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError, match="another project"):
            await pg.asyncpg(other.secret)
        once = await pg.token("db:appdb:write", uses=1)
        held = [await pg.asyncpg(once.secret)]
        with pytest.raises(asyncpg.InvalidPasswordError, match="no uses left"):
            await pg.asyncpg(once.secret)
        token = await pg.token("db:appdb:read")
        held.append(await pg.asyncpg(token.secret))
        with pytest.raises(asyncpg.TooManyConnectionsError, match="max_connections"):
            await pg.asyncpg(token.secret)  # the listener is full (2)
        for conn in held:
            await conn.close()
        await pg.settle()
        held = [await pg.asyncpg(token.secret)]  # the listener's 3/minute: 2 used, 1 left
        with pytest.raises(asyncpg.TooManyConnectionsError, match="rate limit"):
            await pg.asyncpg(token.secret)
        await held[0].close()


@pytest.mark.parametrize("mode", ["full", "none"])
async def test_audit_statements_full_or_none(services, admin, database, mode):
    async with running_gateway(services, admin, database, f'audit_statements = "{mode}"') as pg:
        token = await pg.token("db:appdb:read")
        result = await pg.psql(token.secret, "SELECT name FROM items WHERE id = 3")
        assert result.stdout.strip() == "item 3"
        (event,) = pg.sink.queries()
        assert event.method == "SELECT"
        assert event.path == ("SELECT name FROM items WHERE id = 3" if mode == "full" else None)


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_store_that_cannot_answer_refuses_new_sessions_and_ends_none(
    services, admin, database, monkeypatch
):
    async with running_gateway(services, admin, database, recheck_interval=0.2) as pg:
        token = await pg.token("db:appdb:read")
        conn = await pg.asyncpg(token.secret)
        services.verifier.clear()  # nothing cached: every check asks the store

        async def down(*args: object) -> None:
            raise OSError("store down")

        monkeypatch.setattr(services.store, "find_by_hash", down)
        with pytest.raises(asyncpg.CannotConnectNowError, match="unavailable"):  # 57P03
            await pg.asyncpg((await pg.token("db:appdb:read")).secret)
        await asyncio.sleep(0.8)  # several re-checks, each unable to ask the store
        assert await conn.fetchval("SELECT 1") == 1
        await conn.close()


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_a_change_missed_by_the_cache_ends_sessions_at_the_next_recheck(
    services, admin, database
):
    async with running_gateway(services, admin, database, recheck_interval=0.3) as pg:
        token = await pg.token("db:appdb:read")
        conn = await pg.asyncpg(token.secret)
        # revoked in the store behind the verifier's back (as a replica whose fan-out
        # message was lost would see it): the periodic re-check finds it
        await services.store.revoke(token.record.id, "missed", services.verifier.clock())
        services.verifier.clear()
        await _closed_within(conn, 3.0)


async def test_replication_and_fast_path_calls_are_refused(pg: Harness):
    reader = await pg.token("db:appdb:read")
    replication = await pg.psql(reader.secret, "IDENTIFY_SYSTEM", replication="database")
    assert replication.returncode != 0 and "replication" in replication.stderr
    stream, writer = await raw_connect(pg.port)
    writer.write(startup("alice", pg.database.name))
    await read_message(stream)
    writer.write(b"p" + struct.pack("!i", 5 + len(reader.secret)) + reader.secret.encode() + b"\0")
    while (await read_message(stream))[0] != b"Z":
        pass
    # FunctionCall (fast path): set_config by OID would skip every text check
    writer.write(b"F" + struct.pack("!i", 4 + 4 + 2 + 2) + struct.pack("!ihh", 2078, 0, 0))
    kind, body = await read_message(stream)
    assert kind == b"E" and error_fields(body)["C"] == "42501"
    assert await stream.read() == b""
    writer.close()


async def test_a_project_allowlist_that_excludes_the_client_ends_its_sessions(pg: Harness):
    token = await pg.token("db:appdb:read")
    elsewhere = await pg.token("db:appdb:read", project="other")
    conn, other = await pg.asyncpg(token.secret), await pg.asyncpg(elsewhere.secret)
    await pg.services.tokens.set_project_ip_allowlist(pg.admin.record, "shop", ["10.0.0.0/8"])
    await _closed_within(conn, 2.0)
    assert pg.sink.connections()[-1].decision.reason is Reason.IP_NOT_ALLOWED
    assert await other.fetchval("SELECT 1") == 1  # another project's session goes on
    await other.close()


async def test_large_values_and_many_rows_pass_whole_both_ways(pg: Harness):
    writer = await pg.token("db:appdb:write")
    conn = await pg.asyncpg(writer.secret)
    try:
        big = "x" * 3_000_000 + "end"  # over the 256 KiB a server message is held whole
        assert await conn.fetchval("SELECT $1::text", big) == big  # 3 MB up and down
        rows = await conn.fetch("SELECT g, repeat('y', 500) FROM generate_series(1, 20000) g")
        assert len(rows) == 20000 and rows[-1][0] == 20000
        assert await conn.fetchval("SELECT length(repeat('z', 5000000))") == 5_000_000
        assert len(await conn.fetchval("SELECT repeat('z', 5000000)")) == 5_000_000
    finally:
        await conn.close()
    await pg.settle()
    many = next(e for e in pg.sink.queries() if (e.path or "").startswith("SELECT g,"))
    assert many.detail is not None and many.detail["rows"] == 20000


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_connections_that_never_log_in_are_bounded(services, admin, database):
    from tokenward.gateway.postgres import PENDING_LOGINS

    async with running_gateway(services, admin, database, "max_connections = 1") as pg:
        idle = [await raw_connect(pg.port) for _ in range(1 + PENDING_LOGINS)]
        await asyncio.sleep(0.1)
        reader, writer = await raw_connect(pg.port)
        kind, body = await read_message(reader)  # answered at once, without a login
        assert kind == b"E" and error_fields(body)["C"] == "53300"
        writer.close()
        for _, idle_writer in idle:
            idle_writer.close()
        await pg.settle()
        assert await (await pg.asyncpg((await pg.token("db:appdb:read")).secret)).close() is None


def test_plain_connections_from_other_addresses_only_when_allowed(services):
    from tokenward.gateway.postgres import PostgresGateway

    assert services.enforcement is not None
    strict = PostgresGateway(services.enforcement, [])
    assert strict.plain_allowed("127.0.0.1") and strict.plain_allowed("::1")
    assert not strict.plain_allowed("10.1.2.3")
    assert PostgresGateway(services.enforcement, [], allow_insecure=True).plain_allowed("10.1.2.3")


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
async def test_an_address_that_keeps_guessing_is_refused_before_any_lookup(pg: Harness):
    good = await pg.token("db:appdb:read")
    assert pg.services.enforcement is not None
    limit = int(pg.services.enforcement.failure_limit[0].split("/")[0])  # 20/minute
    for i in range(limit):
        with pytest.raises(asyncpg.InvalidPasswordError):
            await pg.asyncpg(f"tw_live_{i:0>38}")
    with pytest.raises(asyncpg.TooManyConnectionsError, match="too many failed"):  # 53300
        await pg.asyncpg(good.secret)
    assert pg.sink.connections()[-1].decision.reason is Reason.TOO_MANY_FAILURES


async def test_a_query_whose_event_cannot_be_written_ends_the_session(pg: Harness):
    """A query's event joins the audit batch without holding the answer back; once one
    cannot be written the session ends, and no later query runs unaudited."""
    assert pg.services.audit is not None
    token = await pg.token("db:appdb:read")
    async with await psycopg.AsyncConnection.connect(pg.dsn(token.secret)) as conn:
        assert await (await conn.execute("SELECT 1")).fetchone() == (1,)
        await pg.services.audit.close()  # from here on, every event fails
        with pytest.raises(psycopg.OperationalError):
            for _ in range(50):
                await conn.execute("SELECT 1")
                await asyncio.sleep(0.05)
        assert conn.closed
