"""Shared fixtures: every store-backed test runs on SQLite and on PostgreSQL (real servers).

PostgreSQL: each test session creates its own database on the server named by
``TOKENWARD_TEST_PG_URL`` (default: the local server, user ``postgres``, database ``test``)
and drops it at the end, so parallel runs never see each other's rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from tokenward.app import Services, create_asgi, open_services
from tokenward.logs import access_log
from tokenward.service import Issued, issue_bootstrap_record
from tokenward.settings import Settings
from tokenward.store.tables import metadata

PG_ADMIN_URL = os.environ.get(
    "TOKENWARD_TEST_PG_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("TOKENWARD_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """No TOKENWARD_* variable of the developer's shell leaks into a test."""
    for key in list(os.environ):
        if key.startswith("TOKENWARD_") and not key.startswith("TOKENWARD_TEST_"):
            monkeypatch.delenv(key)


@pytest.fixture(autouse=True)
def _quiet_access_log(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """In-process apps write no access log (the tests that start a server read its log);
    what a test turned on is written before the test ends, into its captured output."""
    monkeypatch.setattr(access_log, "enabled", False)
    yield
    access_log.flush()


async def _pg_exec(url: str, statement: str) -> None:
    import asyncpg

    u = make_url(url)
    conn = await asyncpg.connect(
        host=u.host, port=u.port or 5432, user=u.username, password=u.password, database=u.database
    )
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session; its async URL."""
    name = f"tw_test_{os.getpid()}_{secrets.token_hex(3)}"
    asyncio.run(_pg_exec(PG_ADMIN_URL, f'CREATE DATABASE "{name}"'))
    url = make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    yield url
    asyncio.run(_pg_exec(PG_ADMIN_URL, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'tokenward.db'}"
    return str(request.getfixturevalue("pg_database"))


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path, database_url=database_url, secret_key=secrets.token_hex(32))


@contextlib.asynccontextmanager
async def two_replicas(settings: Settings) -> AsyncIterator[tuple[Services, Services]]:
    """Two replicas (services) on ``settings``' database, which starts empty."""
    a = await open_services(settings)
    await truncate_all(a)
    b = await open_services(settings)
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


async def truncate_all(services: Services) -> None:
    if services.engine.dialect.name != "postgresql":
        return
    names = ", ".join(f'"{t.name}"' for t in metadata.sorted_tables)
    async with services.engine.begin() as conn:
        await conn.execute(text(f"TRUNCATE {names} CASCADE"))


@pytest.fixture
async def services(settings: Settings) -> AsyncIterator[Services]:
    svc = await open_services(settings)
    await truncate_all(svc)
    try:
        yield svc
    finally:
        await svc.close()


@pytest.fixture
async def admin(services: Services) -> Issued:
    """A global admin credential (scope ``*``), as ``tokenward init`` makes."""
    issued = issue_bootstrap_record(services.hasher, services.verifier.clock())
    await services.store.insert_token(issued.record, services.hasher.hash(issued.secret))
    return issued


@pytest.fixture
async def api(services: Services, admin: Issued) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client on the app, authenticated as the global admin."""
    app = create_asgi(services=services)  # what `tokenward serve` runs
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 50000))
    async with httpx.AsyncClient(
        transport=transport,
        base_url="http://tokenward.test",
        headers={"Authorization": f"Bearer {admin.secret}"},
    ) as client:
        yield client


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(
    port: int, timeout: float = 20.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


def tokenward_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "tokenward", *args]


@pytest.fixture
def issuer() -> Iterator[object]:
    """A real OIDC issuer serving discovery and JWKS on a free loopback port."""
    from tests.oidc_issuer import Issuer

    server = Issuer()
    yield server
    server.close()


class EventRecorder:
    """Subscribes to the event bus and keeps what it sees."""

    def __init__(self) -> None:
        self.access_events: list[object] = []
        self.admin_events: list[object] = []
        self.security_events: list[object] = []

    async def access(self, event: object) -> None:
        self.access_events.append(event)

    async def admin(self, event: object) -> None:
        self.admin_events.append(event)

    async def security(self, event: object) -> None:
        self.security_events.append(event)


@pytest.fixture
def events(services: Services) -> EventRecorder:
    recorder = EventRecorder()
    services.events.subscribe(recorder)
    return recorder


class LiveServer:
    def __init__(self, url: str, admin_token: str) -> None:
        from tokenward.client import AdminClient

        self.url = url
        self.admin_token = admin_token
        self.admin = AdminClient(url, admin_token)


@pytest.fixture
def live_overrides() -> dict[str, object]:
    """Settings for the ``live`` server; a test module overrides this fixture to change them."""
    return {}


@pytest.fixture
async def live(tmp_path: Path, live_overrides: dict[str, object]) -> AsyncIterator[LiveServer]:
    """A real tokenward server on a free loopback port (SQLite), with a project 'shop'."""
    import threading

    import uvicorn

    from tokenward.bootstrap import initialize

    port = free_port()
    settings = Settings(
        data_dir=tmp_path,
        secret_key=secrets.token_hex(32),
        port=port,
        usage_flush_seconds=60,
        **live_overrides,
    )
    result = await initialize(settings)
    config = uvicorn.Config(create_asgi(settings), host="127.0.0.1", port=port, log_level="error")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    await asyncio.to_thread(wait_for_port, port)
    live = LiveServer(f"http://127.0.0.1:{port}", result.admin_token or "")
    live.admin.create_project("shop")
    yield live
    live.admin.__exit__()
    server.should_exit = True
    await asyncio.to_thread(thread.join, 10)
