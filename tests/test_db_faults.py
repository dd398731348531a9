"""A database that hangs, refuses or fails mid-request: every request path answers, in time.

PostgreSQL is reached through :class:`tests.dbfault.FaultProxy`, which a test freezes (the
connections stay open and nothing comes back: a silent network) or makes refuse. The bounds
are set small here; the defaults are in ``store/engine.py``, ``verify.py`` and
``audit/writer.py`` (docs/operations.md lists them).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from sqlalchemy.exc import OperationalError
from structlog.testing import capture_logs

from tests.conftest import truncate_all
from tests.dbfault import FaultProxy
from tokenward.app import Services, create_asgi, open_services
from tokenward.service import Issued, TokenSpec, issue_bootstrap_record
from tokenward.settings import Settings
from tokenward.tokens.model import Reason

BOUND = 0.5  # every database wait, in these tests
SLACK = 0.4  # scheduling, the fast answers around the wait


@pytest.fixture
def small_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    import tokenward.audit.durable as durable
    import tokenward.audit.writer as writer
    import tokenward.store.engine as engine
    import tokenward.verify as verify

    for module, name, value in (
        (engine, "CONNECT_TIMEOUT", BOUND),
        (engine, "STATEMENT_TIMEOUT", BOUND),
        (engine, "POOL_TIMEOUT", BOUND),
        (verify, "STORE_TIMEOUT", BOUND),
        (writer, "GIVE_UP_AFTER", 2 * BOUND),
        (durable, "DENIAL_WAIT", BOUND),
    ):
        monkeypatch.setattr(module, name, value, raising=False)


@pytest.fixture
def proxy() -> Iterator[FaultProxy]:
    server = FaultProxy()
    yield server
    server.refuse()  # frozen connections are closed, so nothing waits on them at teardown
    server.close()


async def _services(url: str, tmp_path, **overrides: object) -> Services:
    settings = Settings(
        data_dir=tmp_path,
        database_url=url,
        secret_key=secrets.token_hex(32),
        anomaly_enabled=False,
        **overrides,
    )
    return await open_services(settings)


@contextlib.asynccontextmanager
async def _client(services: Services, admin: Issued) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_asgi(services=services), client=("127.0.0.1", 1))
    async with httpx.AsyncClient(
        transport=transport,
        base_url="http://tokenward.test",
        headers={"Authorization": f"Bearer {admin.secret}"},
    ) as client:
        yield client


async def _setup(services: Services) -> tuple[Issued, Issued]:
    await truncate_all(services)
    admin = issue_bootstrap_record(services.hasher, services.verifier.clock())
    await services.store.insert_token(admin.record, services.hasher.hash(admin.secret))
    await services.tokens.create_project(admin.record, "app")
    token = await services.tokens.create_token(
        admin.record, TokenSpec(project="app", scopes=["records:read"])
    )
    return admin, token


async def _close(services: Services) -> None:
    if services.audit is not None:
        services.audit.mode = "sync"  # async mode retries forever: give up, it is a test
    with contextlib.suppress(Exception):
        await asyncio.wait_for(services.close(), 10)


async def _timed(awaitable: object, limit: float = 20.0) -> tuple[object, float]:
    started = time.monotonic()
    result = await asyncio.wait_for(awaitable, limit)  # type: ignore[arg-type]
    return result, time.monotonic() - started


# -- a database that hangs -------------------------------------------------------------------


async def test_hung_database_denies_a_cache_miss_within_the_bound(
    small_bounds, proxy, pg_database, tmp_path
):
    services = await _services(proxy.url(pg_database), tmp_path)
    try:
        _admin, token = await _setup(services)
        services.verifier.clear()
        proxy.freeze()
        decision, took = await _timed(services.verifier.verify(token.secret))
        assert decision.reason is Reason.UNAVAILABLE and not decision.allowed  # type: ignore[attr-defined]
        assert took < BOUND + SLACK
        # The pool does not stay stuck behind the frozen connection: the next one is bounded too.
        decision, took = await _timed(services.verifier.verify(token.secret))
        assert decision.reason is Reason.UNAVAILABLE  # type: ignore[attr-defined]
        assert took < BOUND + SLACK
    finally:
        proxy.refuse()
        await _close(services)


async def test_hung_database_makes_readyz_answer_503_within_the_bound(
    small_bounds, proxy, pg_database, tmp_path
):
    services = await _services(proxy.url(pg_database), tmp_path)
    try:
        admin, _token = await _setup(services)
        async with _client(services, admin) as client:
            assert (await client.get("/readyz")).status_code == 200
            proxy.freeze()
            response, took = await _timed(client.get("/readyz"))
            assert response.status_code == 503  # type: ignore[attr-defined]
            assert response.json()["checks"]["database"] == "unavailable"  # type: ignore[attr-defined]
            assert took < BOUND + SLACK
    finally:
        proxy.refuse()
        await _close(services)


async def test_hung_database_answers_admin_calls_503_unavailable(
    small_bounds, proxy, pg_database, tmp_path
):
    # audit_mode=async: the answer is the route's own, not the audit log's (see below).
    services = await _services(proxy.url(pg_database), tmp_path, audit_mode="async")
    try:
        admin, _token = await _setup(services)
        async with _client(services, admin) as client:
            assert (await client.get("/v1/tokens")).status_code == 200  # the admin is cached
            proxy.freeze()
            with capture_logs() as logs:
                response, took = await _timed(client.get("/v1/tokens"))
            assert response.status_code == 503, response.text  # type: ignore[attr-defined]
            assert response.json()["error"] == "unavailable"  # type: ignore[attr-defined]
            assert response.headers["Retry-After"].isdigit()  # type: ignore[attr-defined]
            assert took < 3 * BOUND + SLACK  # a pre-ping, a connect, a statement at most
            lines = [e for e in logs if e["event"] == "database_unavailable"]
            assert len(lines) == 1 and "SELECT" not in repr(lines[0])
    finally:
        proxy.refuse()
        await _close(services)


async def test_hung_database_with_a_durable_audit_log_answers_503_in_time(
    small_bounds, proxy, pg_database, tmp_path
):
    """Store and audit log down together (one database): every call gets a 503 within the
    audit bound, and a denial within the shorter wait for a response that is already 503."""
    services = await _services(proxy.url(pg_database), tmp_path)
    try:
        admin, token = await _setup(services)
        async with _client(services, admin) as client:
            assert (await client.get("/v1/tokens")).status_code == 200
            body = {"token": token.secret}
            assert (await client.post("/v1/verify", json=body)).status_code == 200  # cached
            proxy.freeze()
            # Allowed from the cache: held until the writer gives up (a frozen connection is
            # closed in the background; a connect cut off by the last attempt's bound may
            # unwind for up to one connect bound more).
            response, took = await _timed(client.post("/v1/verify", json=body))
            assert response.status_code == 503  # type: ignore[attr-defined]
            assert response.json()["error"] == "audit_unavailable"  # type: ignore[attr-defined]
            assert took < 2 * BOUND + BOUND + SLACK
            # A verification the cache cannot answer: denied, and its event is not durable.
            services.verifier.clear()
            response, took = await _timed(client.post("/v1/verify", json={"token": token.secret}))
            assert response.status_code == 503  # type: ignore[attr-defined]
            assert response.json()["error"] == "audit_unavailable"  # type: ignore[attr-defined]
            assert took < BOUND + BOUND + SLACK  # store bound, then the denial's wait
    finally:
        proxy.refuse()
        await _close(services)


# -- a database that refuses connections ----------------------------------------------------


async def test_refused_database_answers_within_the_audit_bound(
    small_bounds, proxy, pg_database, tmp_path
):
    services = await _services(proxy.url(pg_database), tmp_path)
    try:
        admin, token = await _setup(services)
        async with _client(services, admin) as client:
            body = {"token": token.secret}
            assert (await client.post("/v1/verify", json=body)).status_code == 200  # cached
            proxy.refuse()
            # Allowed from the cache: held until the audit writer gives up, not longer.
            response, took = await _timed(client.post("/v1/verify", json=body))
            assert response.status_code == 503  # type: ignore[attr-defined]
            assert response.json()["error"] == "audit_unavailable"  # type: ignore[attr-defined]
            assert took < 2 * BOUND + SLACK
            # A cache miss is denied at once, and answered within the denial's wait.
            services.verifier.clear()
            response, took = await _timed(client.post("/v1/verify", json=body))
            assert response.status_code == 503  # type: ignore[attr-defined]
            assert response.json()["error"] == "audit_unavailable"  # type: ignore[attr-defined]
            assert took < BOUND + SLACK
    finally:
        await _close(services)


async def test_database_not_accepting_connections_is_503_unavailable(
    small_bounds, pg_database, tmp_path
):
    """The QA case: ALTER DATABASE … ALLOW_CONNECTIONS false, existing sessions ended."""
    from sqlalchemy.engine import make_url

    from tests.conftest import PG_ADMIN_URL, _pg_exec

    name = f"dbfault_{secrets.token_hex(4)}"
    await _pg_exec(PG_ADMIN_URL, f'CREATE DATABASE "{name}"')
    url = make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    services = await _services(url, tmp_path, audit_mode="async")
    try:
        admin, _token = await _setup(services)
        async with _client(services, admin) as client:
            assert (await client.get("/v1/tokens")).status_code == 200
            await _pg_exec(PG_ADMIN_URL, f'ALTER DATABASE "{name}" WITH ALLOW_CONNECTIONS false')
            await _pg_exec(
                PG_ADMIN_URL,
                f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'",
            )
            response, took = await _timed(client.get("/v1/tokens"))
            assert response.status_code == 503, response.text  # type: ignore[attr-defined]
            assert response.json()["error"] == "unavailable"  # type: ignore[attr-defined]
            assert "Retry-After" in response.headers  # type: ignore[attr-defined]
            assert took < 2 * BOUND + SLACK
            # The connection (keep-alive) is still good for the next request.
            assert (await client.get("/healthz")).status_code == 200
    finally:
        await _close(services)
        await _pg_exec(PG_ADMIN_URL, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# -- an error nobody handled (both databases) -----------------------------------------------


async def test_database_error_and_unexpected_error_are_answered_not_raised(services, api):
    """A handler that re-raised would make the in-process client raise here (as a server
    logs a traceback and may break the connection)."""
    real = services.tokens.list_tokens

    async def operational(*_args: object, **_kwargs: object) -> object:
        raise OperationalError("SELECT secret FROM tokens", {}, ConnectionResetError("gone"))

    async def broken(*_args: object, **_kwargs: object) -> object:
        raise RuntimeError("a bug")

    try:
        services.tokens.list_tokens = operational
        with capture_logs() as logs:
            response = await api.get("/v1/tokens")
        assert response.status_code == 503
        assert response.json()["error"] == "unavailable"
        assert response.headers["Retry-After"].isdigit()
        assert "SELECT" not in response.text and "SELECT" not in repr(logs)

        services.tokens.list_tokens = broken
        with capture_logs() as logs:
            response = await api.get("/v1/tokens")
        assert response.status_code == 500
        assert response.json() == {
            "error": "internal_error",
            "message": "an unexpected error occurred",
        }
        assert [e["event"] for e in logs].count("unhandled_error") == 1
    finally:
        services.tokens.list_tokens = real
    assert (await api.get("/v1/tokens")).status_code == 200


def test_sqlite_errors_are_classified_by_their_code():
    import sqlite3

    from tokenward.api.errors import is_unavailable_error

    def wrapped(message: str, code: int) -> OperationalError:
        orig = sqlite3.OperationalError(message)
        orig.sqlite_errorcode = code  # type: ignore[attr-defined]
        return OperationalError("SELECT 1", {}, orig)

    assert is_unavailable_error(wrapped("database is locked", 5))
    assert is_unavailable_error(wrapped("unable to open database file", 14))
    assert not is_unavailable_error(wrapped("no such table: x", 1))
