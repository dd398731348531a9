"""Shared fixtures: every store-backed test runs on SQLite and on PostgreSQL (real servers).

PostgreSQL: each test session creates its own database on the server named by
``TOKENWARD_TEST_PG_URL`` (default: the local server, user ``postgres``, database ``test``)
and drops it at the end, so parallel runs never see each other's rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import queue
import re
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


def listening_socket(host: str = "127.0.0.1") -> socket.socket:
    """A socket listening on a port the kernel chose (port 0, read back).

    A server handed it (uvicorn ``server.run(sockets=[sock])``, aiohttp ``SockSite``,
    ``asyncio.start_server(sock=)``) owns the port from the first instant: nothing else can
    take it between choosing and binding, as it could with a port found free and released.
    """
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.bind((host, 0))
    sock.listen(128)
    return sock


def port_of(sock: socket.socket) -> int:
    return int(sock.getsockname()[1])


@contextlib.contextmanager
def closed_port() -> Iterator[int]:
    """A loopback port where a connection is refused for as long as the block runs: bound by
    this socket, never listened on (so refused), and no other process can bind it meanwhile."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield port_of(sock)


@pytest.fixture
def dead_port() -> Iterator[int]:
    """A loopback port that refuses connections for the whole test (see :func:`closed_port`)."""
    with closed_port() as port:
        yield port


def _listening_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as fh:
            for line in fh.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(fields[9])  # 0A: LISTEN
    return inodes


def owns_listener(pid: int, port: int) -> bool:
    """Whether process ``pid`` itself listens on ``port`` (Linux ``/proc``), so that a test
    never mistakes another program that got the port for the server it started."""
    inodes = _listening_inodes(port)
    if not inodes:
        return False
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    return True
    return False


ADDRESS_IN_USE = ("address already in use", "eaddrinuse")


def start_on_some_port(
    start: Callable[[int], subprocess.Popen[bytes]],
    log: Callable[[], str],
    attempts: int = 8,
    timeout: float = 15.0,
) -> tuple[subprocess.Popen[bytes], int]:
    """Start a program that must be given a port number in its configuration and cannot
    report the one it bound, nor take a socket we bound (nginx, Caddy 2.6, redis-server).

    The port is a guess (bound to 0, read back, released), so another process may take it
    first: when the program then exits saying the address is in use (``log()`` reads what it
    wrote), it is started again on a new guess. It counts as up only once that very process
    listens on the port (never a stranger who got there first).
    """
    for _ in range(attempts):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = port_of(probe)
        proc = start(port)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            if owns_listener(proc.pid, port):
                return proc, port
            time.sleep(0.02)
        else:
            proc.kill()
            proc.wait()
            raise TimeoutError(f"the program never listened on {port}: {log()}")
        said = log()
        if not any(words in said.lower() for words in ADDRESS_IN_USE):
            raise RuntimeError(f"the program exited with {proc.returncode}: {said}")
    raise RuntimeError(f"no free port in {attempts} attempts")


def tokenward_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "tokenward", *args]


@dataclass
class Served:
    """A ``tokenward serve`` process, and what it printed up to the end of its banner."""

    proc: subprocess.Popen[str]
    url: str
    port: int
    gateway_port: int | None
    printed: str
    lines: list[str] = field(default_factory=list)  # all of stdout, as it is read
    reader: threading.Thread | None = None

    def stdout(self, timeout: float = 20) -> str:
        """All it printed, once it has exited."""
        self.proc.wait(timeout)
        if self.reader is not None:
            self.reader.join(timeout)
        return "".join(self.lines)

    def stop(self, timeout: float = 10) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.reader is not None:
            self.reader.join(timeout)


def serve_tokenward(
    *args: str,
    env: dict[str, str] | None = None,
    stderr: Any = subprocess.DEVNULL,
    timeout: float = 60.0,
    gateway: bool | None = None,
) -> Served:
    """``tokenward serve ARGS --port 0`` (and ``--gateway-port 0`` with ``--config``): the
    server binds port 0 itself, before it prints its banner, and the banner names the port
    it got; it is read from there, so no port is ever chosen by the test and bound later."""
    command = tokenward_cmd("serve", *args, "--port", "0")
    gateway = "--config" in args if gateway is None else gateway
    if gateway:
        command += ["--gateway-port", "0"]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=stderr, text=True)
    assert proc.stdout is not None
    stdout = proc.stdout
    lines: list[str] = []
    read: queue.Queue[str | None] = queue.Queue()

    def drain() -> None:  # all along: the server never blocks on a full pipe
        with stdout:
            for line in stdout:
                lines.append(line)
                read.put(line)
        read.put(None)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    last = "  authz:" if gateway else "  CLI:"
    printed: list[str] = []
    deadline = time.monotonic() + timeout
    while not (printed and printed[-1].startswith(last)):
        try:
            line = read.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            proc.kill()
            raise TimeoutError(f"no banner within {timeout} s: {''.join(printed)}") from None
        if line is None:
            proc.wait()
            raise RuntimeError(f"serve exited with {proc.returncode}: {''.join(printed)}")
        printed.append(line)
    text = "".join(printed)
    url = re.search(r"tokenward listening on (\S+)", text)
    assert url is not None, text
    found = re.search(r"gateway: +\S+:(\d+) ", text)
    return Served(
        proc,
        url.group(1),
        int(url.group(1).rsplit(":", 1)[1]),
        int(found.group(1)) if found else None,
        text,
        lines,
        reader,
    )


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
        from tokenward_client import AdminClient

        self.url = url
        self.admin_token = admin_token
        self.admin = AdminClient(url, admin_token)


@pytest.fixture
def live_overrides() -> dict[str, object]:
    """Settings for the ``live`` server; a test module overrides this fixture to change them."""
    return {}


@pytest.fixture
async def live(tmp_path: Path, live_overrides: dict[str, object]) -> AsyncIterator[LiveServer]:
    """A real tokenward server on a loopback port of its own (SQLite), with a project 'shop'."""
    import uvicorn

    from tokenward.bootstrap import initialize

    sock = listening_socket()
    port = port_of(sock)
    settings = Settings(
        data_dir=tmp_path,
        secret_key=secrets.token_hex(32),
        port=port,
        usage_flush_seconds=60,
        **live_overrides,
    )
    result = await initialize(settings)
    config = uvicorn.Config(create_asgi(settings), log_level="error")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    live = LiveServer(f"http://127.0.0.1:{port}", result.admin_token or "")
    live.admin.create_project("shop")
    yield live
    live.admin.__exit__()
    server.should_exit = True
    await asyncio.to_thread(thread.join, 10)
    sock.close()
