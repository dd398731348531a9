"""``tokenward migrate`` as a step of its own, ``serve --no-migrate`` that refuses a schema
behind, on SQLite and PostgreSQL; and the layout of compose.yaml started natively: PostgreSQL,
Redis, a migration, three replicas and nginx with deploy/nginx.conf."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from tests.conftest import (
    PG_ADMIN_URL,
    REDIS_URL,
    ROOT,
    _pg_exec,
    serve_tokenward,
    start_on_some_port,
    tokenward_cmd,
)
from tokenward.store.engine import create_engine, migrate, schema_status

pytestmark = pytest.mark.slow
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
REPLICAS = ["tokenward-1", "tokenward-2", "tokenward-3"]


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database of this test alone, with no schema at all."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'tokenward.db'}"
        return
    name = f"tw_migrate_{os.getpid()}_{secrets.token_hex(3)}"
    asyncio.run(_pg_exec(PG_ADMIN_URL, f'CREATE DATABASE "{name}"'))
    yield make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    asyncio.run(_pg_exec(PG_ADMIN_URL, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def _env(tmp_path: Path, database_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENWARD_")}
    env.update(NO_COLOR="1", COLUMNS="200", TOKENWARD_DATA_DIR=str(tmp_path))
    (tmp_path / "database_url").write_text(database_url + "\n")  # as a mounted secret
    (tmp_path / "secret_key").write_text(secrets.token_hex(32) + "\n")
    env.update(
        TOKENWARD_DATABASE_URL_FILE=str(tmp_path / "database_url"),
        TOKENWARD_SECRET_KEY_FILE=str(tmp_path / "secret_key"),
        **extra,
    )
    return env


def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        tokenward_cmd(*args), env=env, capture_output=True, text=True, timeout=120
    )


async def _status(url: str, statement: str | None = None) -> tuple[tuple[str, ...], ...]:
    engine = create_engine(url)
    try:
        if statement is not None:
            async with engine.begin() as conn:
                await conn.execute(text(statement))
        status = await schema_status(engine)
        return status.pending, status.unknown
    finally:
        await engine.dispose()


def test_schema_status_follows_the_migrations(empty_database):
    pending, unknown = asyncio.run(_status(empty_database))
    assert "0001" in pending and len(pending) >= 8 and unknown == ()

    async def migrated() -> None:
        engine = create_engine(empty_database)
        await migrate(engine)
        await engine.dispose()

    asyncio.run(migrated())
    assert asyncio.run(_status(empty_database)) == ((), ())
    # one head set back to the revision before it: that one is pending again
    back = "UPDATE alembic_version SET version_num = '0007_token_grants' "
    back += "WHERE version_num = '0008_audit_chains'"
    assert asyncio.run(_status(empty_database, back)) == (("0008_audit_chains",), ())
    # a revision this version does not know: a newer one migrated it, nothing is pending
    ahead = "UPDATE alembic_version SET version_num = '9999_from_the_future' "
    ahead += "WHERE version_num = '0007_token_grants'"
    assert asyncio.run(_status(empty_database, ahead)) == ((), ("9999_from_the_future",))


def test_migrate_then_serve_no_migrate(empty_database, tmp_path):
    env = _env(tmp_path, empty_database)
    refused = _run(env, "serve", "--no-migrate", "--port", "0")
    assert refused.returncode == 2, refused.stderr
    assert "Traceback" not in refused.stderr and "listening on" not in refused.stdout
    (line,) = refused.stderr.strip().splitlines()
    assert line.startswith("error: the database schema is behind this version: ")
    assert "run 'tokenward migrate' first" in line

    first = _run(env, "migrate", "--json")
    assert first.returncode == 0, first.stderr
    applied = json.loads(first.stdout)
    assert "0001" in applied["applied"] and applied["pending"] == []
    again = _run(env, "migrate")
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith("the database schema is up to date"), again.stdout

    init = _run(env, "init", "--json")
    assert init.returncode == 0, init.stderr
    admin = json.loads(init.stdout)["admin_token"]
    served = serve_tokenward("--no-migrate", env=env)
    try:
        ready = httpx.get(f"{served.url}/readyz", timeout=10)
        assert ready.status_code == 200, ready.text
        answer = httpx.post(
            f"{served.url}/v1/verify",
            json={"token": admin},
            headers={"Authorization": f"Bearer {admin}"},
            timeout=10,
        )
        assert answer.json()["valid"] is True, answer.text
    finally:
        served.proc.terminate()
        served.proc.wait(timeout=40)


def test_migrate_names_a_database_it_cannot_reach(tmp_path, dead_port):
    env = _env(tmp_path, f"postgresql+asyncpg://tw:hunter2-pw@127.0.0.1:{dead_port}/x")
    result = _run(env, "migrate")
    assert result.returncode == 3, result.stderr
    assert "Traceback" not in result.stderr
    assert "hunter2-pw" not in result.stderr + result.stdout
    assert result.stderr.startswith("error: cannot use the database postgresql+asyncpg://tw:***@")


# -- the compose layout, natively ----------------------------------------------------------
@contextlib.contextmanager
def nginx_from_deploy_conf(tmp_path: Path, ports: list[int]) -> Iterator[int]:
    """nginx running deploy/nginx.conf, the compose names replaced by the replicas' ports."""
    site_text = (ROOT / "deploy" / "nginx.conf").read_text()
    for name, port in zip(REPLICAS, ports, strict=True):
        assert f"server {name}:8080 " in site_text
        site_text = site_text.replace(f"server {name}:8080 ", f"server 127.0.0.1:{port} ")
    assert "listen 8080;" in site_text
    (tmp_path / "nginx.conf").write_text(
        "daemon off; master_process off; worker_processes 1;"
        f" pid {tmp_path}/nginx.pid; error_log {tmp_path}/error.log warn;"
        " events { worker_connections 256; }"
        f" http {{ access_log off; client_body_temp_path {tmp_path}/body;"
        f" proxy_temp_path {tmp_path}/proxy; include {tmp_path}/site.conf; }}"
    )
    stderr_path = tmp_path / "nginx.stderr"

    def start(port: int) -> subprocess.Popen[bytes]:
        (tmp_path / "site.conf").write_text(
            site_text.replace("listen 8080;", f"listen 127.0.0.1:{port};")
        )
        with stderr_path.open("wb") as stderr:
            return subprocess.Popen(
                [NGINX, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"), "-e", "stderr"],
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )

    proc, port = start_on_some_port(start, lambda: stderr_path.read_text(errors="replace"))
    try:
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def _chains(url: str, token_id: str) -> set[str]:
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(
                text("SELECT DISTINCT chain_id FROM audit_events WHERE token_id = :t"),
                {"t": token_id},
            )
            return {str(r[0]) for r in rows}
    finally:
        await engine.dispose()


@pytest.fixture
def fresh_pg() -> Iterator[str]:
    name = f"tw_layout_{os.getpid()}_{secrets.token_hex(3)}"
    asyncio.run(_pg_exec(PG_ADMIN_URL, f'CREATE DATABASE "{name}"'))
    yield make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    asyncio.run(_pg_exec(PG_ADMIN_URL, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.mark.skipif(not Path(NGINX).exists(), reason="nginx is not installed")
def test_the_compose_layout_natively(tmp_path, fresh_pg):
    """What compose.yaml starts, in its order, as processes: migrate, then three replicas
    with --no-migrate (secrets from files), then nginx with deploy/nginx.conf. Every replica
    answers through nginx (an audit chain each) and a revocation reaches them all."""
    (tmp_path / "redis_url").write_text(REDIS_URL + "\n")
    env = _env(
        tmp_path,
        fresh_pg,
        TOKENWARD_REDIS_URL_FILE=str(tmp_path / "redis_url"),
        TOKENWARD_REDIS_PREFIX=f"twtest-{secrets.token_hex(4)}:",
        TOKENWARD_TRUSTED_PROXIES="127.0.0.1/32",
        TOKENWARD_CACHE_TTL="300",  # far above the fan-out bound: only fan-out can explain it
    )
    assert _run(env, "migrate").returncode == 0
    init = _run(env, "init", "--json")
    admin = json.loads(init.stdout)["admin_token"]
    replicas = [serve_tokenward("--no-migrate", env=env) for _ in REPLICAS]
    try:
        with nginx_from_deploy_conf(tmp_path, [r.port for r in replicas]) as port:
            base = f"http://127.0.0.1:{port}"
            with httpx.Client(
                base_url=base, headers={"Authorization": f"Bearer {admin}"}, timeout=10
            ) as client:
                project = f"p{secrets.token_hex(3)}"
                assert client.post("/v1/projects", json={"name": project}).status_code in (200, 201)
                created = client.post(
                    "/v1/tokens", json={"project": project, "scopes": ["records:read"]}
                ).json()
                verify = {"token": created["token"], "scope": "records:read"}
                reasons = {
                    client.post("/v1/verify", json=verify).json()["reason"] for _ in "x" * 30
                }
                assert reasons == {"ok"}
                assert len(asyncio.run(_chains(fresh_pg, created["id"]))) == 3
                revoked = client.post(f"/v1/tokens/{created['id']}/revoke", json={"reason": "t"})
                assert revoked.status_code == 200, revoked.text
                # every replica had it cached for 300 s: the fan-out clears it on all three
                for _ in range(50):
                    seen = [
                        client.post("/v1/verify", json=verify).json()["reason"] for _ in "x" * 9
                    ]
                    if set(seen) == {"revoked"}:
                        break
                assert set(seen) == {"revoked"}, seen
    finally:
        for replica in replicas:
            replica.proc.terminate()
        for replica in replicas:
            replica.proc.wait(timeout=40)
