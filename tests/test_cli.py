"""The CLI end to end: a real `tokenward serve` on SQLite and on PostgreSQL, driven by the CLI
as subprocesses, the way the README walkthrough uses it.

Each CLI call is a fresh Python process, so the two backends run side by side and independent
calls run in parallel to keep the file quick.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

from tests.conftest import closed_port, serve_tokenward, tokenward_cmd
from tokenward.store.engine import create_engine, migrate
from tokenward.store.tables import metadata
from tokenward.tokens.format import parse_token

pytestmark = pytest.mark.slow


@dataclass
class Server:
    kind: str
    url: str
    data_dir: Path
    env: dict[str, str]  # the server's environment, without the admin token
    admin_token: str
    admin_id: str
    proc: subprocess.Popen[str]

    def cli_env(self, **extra: str) -> dict[str, str]:
        return {
            **self.env,
            "TOKENWARD_URL": self.url,
            "TOKENWARD_ADMIN_TOKEN": self.admin_token,
            **extra,
        }


def base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENWARD_")}
    env["PYTHONUNBUFFERED"] = "1"
    env["NO_COLOR"] = "1"
    env["COLUMNS"] = "200"
    return env


def run_many(*calls: tuple[dict[str, str], list[str]]) -> list[subprocess.CompletedProcess[str]]:
    """Run CLI calls in parallel; each is (env, args)."""
    procs = [
        subprocess.Popen(
            tokenward_cmd(*args),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for env, args in calls
    ]
    results = []
    for proc, (_env, args) in zip(procs, calls, strict=True):
        out, err = proc.communicate(timeout=60)
        results.append(subprocess.CompletedProcess(args, proc.returncode, out, err))
    return results


def ok_json(result: subprocess.CompletedProcess[str]):
    assert result.returncode == 0, (result.args, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    return json.loads(result.stdout)


async def _reset_postgres(url: str) -> None:
    engine = create_engine(url)
    try:
        await migrate(engine)
        names = ", ".join(f'"{t.name}"' for t in metadata.sorted_tables)
        async with engine.begin() as conn:
            await conn.execute(text(f"TRUNCATE {names} CASCADE"))
    finally:
        await engine.dispose()


@pytest.fixture(scope="module")
def servers(tmp_path_factory, pg_database):
    """A running server per backend, each initialised with `tokenward init --json`."""
    asyncio.run(_reset_postgres(pg_database))
    setups = []
    for kind in ("sqlite", "postgresql"):
        data_dir = tmp_path_factory.mktemp(f"cli-{kind}") / "data"
        env = base_env()
        env["TOKENWARD_CACHE_TTL"] = "1"
        if kind == "postgresql":
            env["TOKENWARD_DATABASE_URL"] = pg_database
        setups.append((kind, data_dir, env))
    inits = run_many(*[(env, ["init", "--data-dir", str(d), "--json"]) for _k, d, env in setups])
    started = []
    for (kind, data_dir, env), init in zip(setups, inits, strict=True):
        info = ok_json(init)
        assert info["initialized"] is True
        served = serve_tokenward("--data-dir", str(data_dir), env=env, stderr=subprocess.PIPE)
        proc = served.proc
        started.append(
            Server(
                kind,
                served.url,
                data_dir,
                env,
                info["admin_token"],
                info["admin_token_id"],
                proc,
            )
        )
    try:
        yield {s.kind: s for s in started}
    finally:
        for server in started:
            server.proc.terminate()
        for server in started:
            try:
                server.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.proc.kill()
                server.proc.wait()
            stderr = server.proc.stderr.read() if server.proc.stderr else ""
            server.proc.stderr and server.proc.stderr.close()
            assert "Traceback" not in stderr, stderr
            assert server.admin_token not in stderr


def verify(server: Server, token: str, **fields: str) -> dict:
    response = httpx.post(
        f"{server.url}/v1/verify",
        json={"token": token, **fields},
        headers={"Authorization": f"Bearer {server.admin_token}"},
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_cli_end_to_end(servers):
    both = [servers["sqlite"], servers["postgresql"]]
    for server in both:
        assert server.data_dir.stat().st_mode & 0o777 == 0o700
        assert (server.data_dir / "secret.key").stat().st_mode & 0o777 == 0o600
        parse_token(server.admin_token)

    created = run_many(*[(s.cli_env(), ["project", "create", "shop", "--json"]) for s in both])
    for result in created:
        assert ok_json(result)["name"] == "shop"

    create_args = [
        "token",
        "create",
        "--project",
        "shop",
        "--scope",
        "records:read",
        "--scope",
        "functions:invoke:*",
        "--ttl",
        "90d",
        "--ip",
        "127.0.0.0/8",
        "--ip",
        "2001:db8::/32",
        "--rate",
        "100/minute",
        "--rate",
        "1000/hour",
        "--uses",
        "50",
        "--principal",
        "svc-store",
        "--name",
        "storefront",
        "--meta",
        "team=web",
        "--meta",
        "tier=gold",
        "--json",
    ]
    sqlite = servers["sqlite"]
    results = run_many(
        *[(s.cli_env(), create_args) for s in both],
        (sqlite.cli_env(), ["project", "list", "--json"]),
    )
    tokens = {}
    for server, result in zip(both, results[:2], strict=True):
        body = ok_json(result)
        parse_token(body["token"])
        assert body["scopes"] == ["records:read", "functions:invoke:*"]
        assert body["ip_allowlist"] == ["127.0.0.0/8", "2001:db8::/32"]
        assert body["rate_limit"] == "100/minute;1000/hour"
        assert body["remaining_uses"] == 50 and body["principal"] == "svc-store"
        assert body["name"] == "storefront" and body["metadata"] == {"team": "web", "tier": "gold"}
        assert body["expires_at"] and body["project"] == "shop"
        tokens[server.kind] = body
    for result in results[2:]:
        assert [p["name"] for p in ok_json(result)] == ["shop"]

    for server in both:
        token = tokens[server.kind]
        ok = verify(server, token["token"], scope="records:read", ip="127.0.0.1")
        assert ok["valid"] is True and ok["principal"] == "svc-store"
        assert ok["remaining_uses"] == 49
        denied = verify(server, token["token"], scope="records:write", ip="127.0.0.1")
        assert denied["reason"] == "insufficient_scope"

    results = run_many(
        *[(s.cli_env(), ["token", "list", "--project", "shop", "--json"]) for s in both],
        (sqlite.cli_env(), ["token", "show", tokens["sqlite"]["id"], "--json"]),
        (sqlite.cli_env(), ["token", "list", "--project", "shop"]),  # the human table
    )
    for server, listed in zip(both, results[:2], strict=True):
        token = tokens[server.kind]
        items = ok_json(listed)
        assert [t["id"] for t in items] == [token["id"]] and items[0]["state"] == "active"
        assert token["token"] not in listed.stdout + listed.stderr
    shown, table = results[2:]
    assert ok_json(shown)["id"] == tokens["sqlite"]["id"]
    assert table.returncode == 0 and tokens["sqlite"]["id"] in table.stdout
    assert tokens["sqlite"]["token"] not in shown.stdout + table.stdout

    rotated = run_many(
        *[
            (s.cli_env(), ["token", "rotate", tokens[s.kind]["id"], "--grace", "1h", "--json"])
            for s in both
        ]
    )
    successors = {}
    for server, result in zip(both, rotated, strict=True):
        body = ok_json(result)
        assert body["rotated_from"] == tokens[server.kind]["id"]
        assert body["previous"]["grace_until"]
        successors[server.kind] = body
        assert verify(server, tokens[server.kind]["token"], ip="127.0.0.1")["valid"] is True
        assert verify(server, body["token"], ip="127.0.0.1")["valid"] is True

    results = run_many(
        *[
            (
                s.cli_env(),
                ["token", "revoke", successors[s.kind]["id"], "--reason", "leaked", "--json"],
            )
            for s in both
        ],
        (sqlite.cli_env(), ["token", "show", "tok_doesnotexist000"]),
    )
    for server, revoked in zip(both, results[:2], strict=True):
        body = ok_json(revoked)
        assert body["state"] == "revoked" and body["revoked_reason"] == "leaked"
        after = verify(server, successors[server.kind]["token"], ip="127.0.0.1")
        assert after["valid"] is False and after["reason"] == "revoked"
    unknown = results[2]
    assert unknown.returncode == 1
    assert "no such token" in unknown.stderr and "Traceback" not in unknown.stderr


def test_cli_errors_and_init_again(servers, tmp_path):
    server = servers["sqlite"]
    env = server.cli_env()
    missing = {k: v for k, v in env.items() if k != "TOKENWARD_ADMIN_TOKEN"}
    bad_ca = {**env, "TOKENWARD_CA_CERT": str(tmp_path / "nope.pem")}
    with closed_port() as nothing_there:
        down = {**env, "TOKENWARD_URL": f"http://127.0.0.1:{nothing_there}"}
        again, *errors = run_many(
            (server.env, ["init", "--data-dir", str(server.data_dir), "--json"]),
            (missing, ["project", "list"]),
            (down, ["project", "list"]),
            (bad_ca, ["project", "list", "--json"]),
        )
    info = ok_json(again)
    assert info["initialized"] is False and "admin_token" not in info
    assert info["admin_token_id"] == server.admin_id
    assert "tw_live_" not in again.stdout + again.stderr
    no_token, no_server, no_ca = errors
    assert no_token.returncode == 2 and "TOKENWARD_ADMIN_TOKEN" in no_token.stderr
    assert no_server.returncode == 3 and "cannot reach the server" in no_server.stderr
    assert no_ca.returncode == 2 and json.loads(no_ca.stderr)["error"] == "bad_ca_cert"
    for result in errors:
        assert "Traceback" not in result.stderr and result.stdout == ""

    reset = ok_json(
        run_many((server.env, ["init", "--data-dir", str(server.data_dir), "--reset", "--json"]))[0]
    )
    assert reset["initialized"] is True and reset["admin_token"] != server.admin_token
    assert (server.data_dir / "secret.key").stat().st_mode & 0o777 == 0o600
    new = {"Authorization": f"Bearer {reset['admin_token']}"}
    old = {"Authorization": f"Bearer {server.admin_token}"}
    assert httpx.get(f"{server.url}/v1/projects", headers=new).status_code == 200
    # The old one is revoked; the server's cache (1 s here) may hold it no longer than that.
    import time

    deadline = time.monotonic() + 3
    while httpx.get(f"{server.url}/v1/projects", headers=old).status_code != 401:
        assert time.monotonic() < deadline, "the old admin token still works"
        time.sleep(0.1)
    shown = httpx.get(f"{server.url}/v1/tokens/{server.admin_id}", headers=new).json()
    assert shown["state"] == "revoked"
    server.admin_token = reset["admin_token"]


def test_fingerprints_print_as_they_are():
    """':CD:' in a certificate fingerprint is not an emoji code (it printed as a disc)."""
    from tokenward.cli import err, out

    for console in (out, err):
        with console.capture() as captured:
            console.print("SHA-256 fingerprint: 9D:CD:86:AB:01", highlight=False)
        assert "9D:CD:86:AB:01" in captured.get()
