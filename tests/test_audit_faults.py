"""A server under load that is killed (SIGKILL), or whose PostgreSQL restarts, loses no
acknowledged audit event: every request answered 200 has its event, written once, and every
chain verifies (DESIGN.md invariant 4; the SIGTERM case is in test_observability.py)."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

from tests.conftest import PG_ADMIN_URL, _pg_exec, port_of, serve_tokenward, tokenward_cmd
from tests.gateway.pgsupport import _bin
from tokenward.audit.chain import verify_chain
from tokenward.audit.records import ChainKeys
from tokenward.settings import Settings, load_hasher
from tokenward.store.engine import create_engine
from tokenward.tokens.format import generate_token


def _env(data_dir: Path, database_url: str | None) -> dict[str, str]:
    env = {**os.environ, "TOKENWARD_DATA_DIR": str(data_dir), "TOKENWARD_ANOMALY_ENABLED": "0"}
    if database_url is not None:
        env["TOKENWARD_DATABASE_URL"] = database_url
    return env


def _init(env: dict[str, str]) -> str:
    out = subprocess.run(
        tokenward_cmd("init", "--json"), env=env, capture_output=True, check=True, timeout=60
    )
    return str(json.loads(out.stdout)["admin_token"])


class Load:
    """Concurrent ``POST /v1/verify`` calls, each with its own request id; ``acked`` holds the
    ids answered 200 (answers 503 while the database is away are not acknowledgements)."""

    def __init__(self, port: int, admin: str) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.headers = {"Authorization": f"Bearer {admin}"}
        self.acked: list[str] = []
        self.refused = 0
        self.stop = asyncio.Event()

    async def run(self, workers: int = 16) -> None:
        async with httpx.AsyncClient(
            base_url=self.base, headers=self.headers, timeout=15
        ) as client:

            async def worker(n: int) -> None:
                i = 0
                while not self.stop.is_set():
                    request_id = f"load-{n}-{i}"
                    i += 1
                    try:
                        response = await client.post(
                            "/v1/verify",
                            json={"token": generate_token("live")},
                            headers={"X-Request-ID": request_id},
                        )
                    except httpx.HTTPError:
                        if self.stop.is_set():
                            return
                        await asyncio.sleep(0.05)
                        continue
                    if response.status_code == 200:
                        self.acked.append(request_id)
                    else:
                        self.refused += 1
                        await asyncio.sleep(0.01)

            await asyncio.gather(*(worker(n) for n in range(workers)))

    async def until(self, count: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.acked) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert len(self.acked) >= count, f"only {len(self.acked)} requests answered"


async def _check(data_dir: Path, database_url: str | None, acked: list[str]) -> None:
    settings = Settings(data_dir=data_dir, database_url=database_url)
    engine = create_engine(settings.resolved_database_url)
    try:
        async with engine.connect() as conn:
            rows = (
                await conn.execute(
                    text("SELECT request_id FROM audit_events WHERE source = 'verify_api'")
                )
            ).all()
        written = Counter(r[0] for r in rows)
        lost = set(acked) - set(written)
        assert not lost, f"{len(lost)} acknowledged events lost"
        twice = [r for r, n in written.items() if n > 1]
        assert not twice, f"{len(twice)} events written twice"
        report = await verify_chain(engine, ChainKeys.from_hasher(load_hasher(settings)))
        assert report.ok, report.public()
    finally:
        await engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest) -> Iterator[str | None]:
    if request.param == "sqlite":
        yield None
        return
    from sqlalchemy.engine import make_url

    name = f"tw_kill_{secrets.token_hex(4)}"
    asyncio.run(_pg_exec(PG_ADMIN_URL, f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        asyncio.run(_pg_exec(PG_ADMIN_URL, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def test_sigkill_under_load_loses_no_acknowledged_event(tmp_path, store_url):
    env = _env(tmp_path, store_url)
    admin = _init(env)
    served = serve_tokenward(env=env)  # port 0, read back from the banner
    server = served.proc
    load = Load(served.port, admin)

    async def scenario() -> None:
        running = asyncio.create_task(load.run())
        await load.until(300)
        server.send_signal(signal.SIGKILL)
        await asyncio.sleep(0.5)
        load.stop.set()
        await running

    try:
        asyncio.run(scenario())
        server.wait(timeout=10)
    finally:
        if server.poll() is None:
            server.kill()
    assert server.returncode == -signal.SIGKILL
    # The killed writer's chain is open (no closing checkpoint) and still verifies.
    asyncio.run(_check(tmp_path, store_url, load.acked))


class OwnPostgres:
    """A PostgreSQL server of this test's own, to restart under load."""

    def __init__(self) -> None:
        # Not under pytest's own temporary folder, which only its owner may enter.
        self.root = Path(tempfile.mkdtemp(prefix="tw-own-pg-"))
        self.data = self.root / "data"
        if os.geteuid() == 0:  # initdb refuses to run as root
            shutil.chown(self.root, "postgres")
        self._as_postgres(
            _bin("initdb") or "initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-N"
        )
        # pg_ctl cannot be handed a socket nor report the port it bound: a port found free is
        # tried, and another one if something took it meanwhile.
        for attempt in range(8):
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                self.port = port_of(probe)
            try:
                self.ctl("start")
                break
            except subprocess.CalledProcessError:
                if attempt == 7:
                    raise

    def _as_postgres(self, *args: str) -> None:
        command = list(args) if os.geteuid() != 0 else ["runuser", "-u", "postgres", "--", *args]
        # The server's output goes to its log file: a pipe would be held open by it.
        subprocess.run(
            command,
            check=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=120,
        )

    def ctl(self, action: str, *extra: str) -> None:
        options = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.data}"
        log = str(self.root / "server.log")
        self._as_postgres(
            _bin("pg_ctl") or "pg_ctl",
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            log,
            "-w",
            *extra,
            action,
        )

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"


@pytest.fixture
def own_postgres() -> Iterator[OwnPostgres]:
    if _bin("initdb") is None or _bin("pg_ctl") is None:
        pytest.skip("initdb and pg_ctl are needed to run a PostgreSQL of the test's own")
    server = OwnPostgres()
    try:
        yield server
    finally:
        try:
            server.ctl("stop", "-m", "immediate")
        finally:
            shutil.rmtree(server.root, ignore_errors=True)


def test_postgres_restart_under_load_loses_no_acknowledged_event(tmp_path, own_postgres):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    env = _env(data_dir, own_postgres.url)
    admin = _init(env)
    served = serve_tokenward(env=env)  # port 0, read back from the banner
    server = served.proc
    load = Load(served.port, admin)

    async def scenario() -> None:
        running = asyncio.create_task(load.run())
        await load.until(200)
        before = len(load.acked)
        await asyncio.to_thread(own_postgres.ctl, "restart", "-m", "fast")
        await load.until(before + 200)  # answered again after the restart
        load.stop.set()
        await running
        print(f"{len(load.acked)} answered 200, {load.refused} refused across the restart")

    try:
        asyncio.run(scenario())
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
    asyncio.run(_check(data_dir, own_postgres.url, load.acked))
