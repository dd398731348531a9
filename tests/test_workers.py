"""``tokenward serve --workers N``: N processes on the same port, each a replica of its own.

Counts stay exact across workers (rate limits in Redis, uses in the database), a revocation
reaches every worker, a worker that dies is replaced, and SIGTERM stops them all. The embedded
default (SQLite, no Redis) refuses more than one worker and says why.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from sqlalchemy.engine import make_url

from tests.conftest import PG_ADMIN_URL, REDIS_URL, _pg_exec, tokenward_cmd
from tokenward.bootstrap import initialize
from tokenward.settings import Settings


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENWARD_")}
    env.update(TOKENWARD_DATA_DIR=str(tmp_path), **extra)
    return env


@pytest.mark.parametrize("workers", ["2", "auto"])
def test_the_embedded_default_refuses_several_workers(tmp_path: Path, workers: str) -> None:
    if workers == "auto" and len(os.sched_getaffinity(0)) < 2:
        pytest.skip("auto is one worker on a single core")
    subprocess.run(tokenward_cmd("init"), env=_env(tmp_path), capture_output=True, check=True)
    result = subprocess.run(
        tokenward_cmd("serve", "--port", "0", "--workers", workers),
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "needs PostgreSQL (TOKENWARD_DATABASE_URL) and Redis" in result.stderr
    assert "Traceback" not in result.stderr
    assert "listening on" not in result.stdout


@pytest.mark.parametrize("workers", ["0", "65", "many"])
def test_a_bad_worker_count_is_one_line(tmp_path: Path, workers: str) -> None:
    result = subprocess.run(
        tokenward_cmd("serve", "--port", "0", "--init", "--workers", workers),
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "TOKENWARD_WORKERS: must be auto or a number from 1 to 64" in result.stderr
    assert "Traceback" not in result.stderr


class Workers:
    def __init__(self, proc: subprocess.Popen[str], url: str, admin: str, log: Path) -> None:
        self.proc = proc
        self.url = url
        self.admin = admin
        self.log = log  # the server's stderr

    def children(self) -> set[int]:
        path = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        return {int(p) for p in path.read_text().split()}

    def post(self, path: str, body: dict[str, object]) -> httpx.Response:
        # A new connection each time, so the kernel may hand it to any worker.
        return httpx.post(
            self.url + path,
            json=body,
            headers={"Authorization": f"Bearer {self.admin}"},
            timeout=10,
        )


@pytest.fixture
def fresh_pg() -> Iterator[str]:
    """A PostgreSQL database of this test alone (the workers' server initializes it)."""
    name = f"tw_workers_{os.getpid()}_{secrets.token_hex(3)}"
    asyncio.run(_pg_exec(PG_ADMIN_URL, f'CREATE DATABASE "{name}"'))
    yield make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    asyncio.run(_pg_exec(PG_ADMIN_URL, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def workers(tmp_path: Path, fresh_pg: str) -> Iterator[Workers]:
    pg_database = fresh_pg
    env = _env(
        tmp_path,
        TOKENWARD_DATABASE_URL=pg_database,
        TOKENWARD_REDIS_URL=REDIS_URL,
        TOKENWARD_REDIS_PREFIX=f"twtest-{secrets.token_hex(4)}:",
        TOKENWARD_CACHE_TTL="300",  # far above the fan-out bound: only fan-out can explain it
    )
    settings = Settings(data_dir=tmp_path, database_url=pg_database)
    result = asyncio.run(initialize(settings))
    log = tmp_path / "server.log"
    with log.open("w") as stderr:
        proc = subprocess.Popen(
            tokenward_cmd("serve", "--port", "0", "--workers", "2"),
            env=env,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r"listening on (http://\S+)", line)
        assert match, line + log.read_text()
        server = Workers(proc, match.group(1), result.admin_token or "", log)
        deadline = time.monotonic() + 30
        while True:  # both workers up and answering
            try:
                if httpx.get(server.url + "/readyz", timeout=2).status_code == 200 and (
                    len(server.children()) == 2
                ):
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the workers did not start"
            time.sleep(0.1)
        yield server
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(40)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()


def _make_token(server: Workers, **spec: object) -> dict[str, str]:
    r = server.post("/v1/projects", {"name": f"p{secrets.token_hex(3)}"})
    assert r.status_code in (200, 201), r.text
    project = r.json()["name"]
    r = server.post("/v1/tokens", {"project": project, "scopes": ["records:read"], **spec})
    assert r.status_code in (200, 201), r.text
    return r.json()


def _verify_reasons(server: Workers, token: str, count: int) -> list[str]:
    def one(_: int) -> str:
        r = server.post("/v1/verify", {"token": token, "scope": "records:read"})
        return str(r.json()["reason"])

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, range(count)))


@pytest.mark.slow
def test_rate_limits_are_exact_across_workers(workers: Workers, fresh_pg: str) -> None:
    created = _make_token(workers, rate_limit="10/minute")
    reasons = _verify_reasons(workers, created["token"], 30)
    assert reasons.count("ok") == 10, reasons
    assert reasons.count("rate_limited") == 20, reasons
    # Both workers answer: each writes an audit chain of its own. (The kernel hands each new
    # connection to one of them; more requests are sent until both have had some.)
    other = _make_token(workers)
    for _ in range(10):
        chains = asyncio.run(_verify_chains(fresh_pg, created["id"], other["id"]))
        if len(chains) == 2:
            break
        _verify_reasons(workers, other["token"], 20)
    assert len(chains) == 2, chains


async def _verify_chains(url: str, *token_ids: str) -> set[str]:
    import asyncpg

    u = make_url(url)
    conn = await asyncpg.connect(
        host=u.host, port=u.port or 5432, user=u.username, database=u.database
    )
    try:
        rows = await conn.fetch(
            "SELECT DISTINCT chain_id FROM audit_events WHERE token_id = ANY($1) AND source = $2",
            list(token_ids),
            "verify_api",
        )
    finally:
        await conn.close()
    return {str(r[0]) for r in rows}


@pytest.mark.slow
def test_a_revocation_reaches_every_worker(workers: Workers) -> None:
    created = _make_token(workers)
    assert set(_verify_reasons(workers, created["token"], 16)) == {"ok"}  # cached by both
    r = workers.post(f"/v1/tokens/{created['id']}/revoke", {"reason": "leaked"})
    assert r.status_code == 200, r.text
    time.sleep(0.5)  # the fan-out bound, measured in tests/test_fanout.py (milliseconds)
    assert set(_verify_reasons(workers, created["token"], 24)) == {"revoked"}


@pytest.mark.slow
def test_a_dead_worker_is_replaced_and_sigterm_stops_all(workers: Workers) -> None:
    before = workers.children()
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while True:
        now = workers.children()
        if len(now) == 2 and victim not in now:
            break
        assert time.monotonic() < deadline, f"no replacement worker: {now}"
        time.sleep(0.1)
    assert httpx.get(workers.url + "/healthz", timeout=5).status_code == 200
    workers.proc.send_signal(signal.SIGTERM)
    assert workers.proc.wait(40) == 0
    for pid in now:
        assert not Path(f"/proc/{pid}").exists() or _zombie(pid)
    lines = workers.log.read_text().splitlines()
    exits = [json.loads(ln) for ln in lines if '"worker_exited"' in ln]
    assert [e["pid"] for e in exits] == [victim]


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True
