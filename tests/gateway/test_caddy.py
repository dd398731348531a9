"""docs/proxies/Caddyfile, as documented, with a real Caddy in front of a real backend."""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, start_on_some_port
from tests.gateway.support import POLICY, make_token, use_policy, uvicorn_server
from tokenward.app import create_asgi

CADDY = shutil.which("caddy") or "/usr/bin/caddy"
pytestmark = pytest.mark.skipif(not Path(CADDY).exists(), reason="caddy is not installed")

# Prepended to the documented site block: loopback only, no admin endpoint, no certificates,
# nothing stored outside the test's directory.
GLOBAL_OPTIONS = """{{
	admin off
	auto_https off
	default_bind 127.0.0.1
	storage file_system {tmp}/storage
}}
"""


def caddyfile(tokenward_port: int, backend_port: int, caddy_port: int) -> str:
    text = (ROOT / "docs" / "proxies" / "Caddyfile").read_text()
    for documented, actual in (
        ("127.0.0.1:8080", f"127.0.0.1:{tokenward_port}"),
        ("127.0.0.1:9001", f"127.0.0.1:{backend_port}"),
        ("\n:8000 {", f"\n:{caddy_port} {{"),
    ):
        assert documented in text
        text = text.replace(documented, actual)
    return text


@contextlib.contextmanager
def caddy(tmp_path: Path, site: Callable[[int], str]) -> Iterator[int]:
    """Caddy with ``site(port)`` as its site; yields the port it listens on.

    Caddy 2.6 cannot take a socket bound for it (``fd/N`` addresses came later) nor report
    the port it bound, so the port is a guess, retried on "address already in use"."""
    config = tmp_path / "Caddyfile"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path / "home"),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
        "XDG_DATA_HOME": str(tmp_path / "data"),
    }
    log = tmp_path / "caddy.log"

    def start(port: int) -> subprocess.Popen[bytes]:
        config.write_text(GLOBAL_OPTIONS.format(tmp=tmp_path) + site(port))
        with log.open("wb") as stderr:
            return subprocess.Popen(
                [CADDY, "run", "--config", str(config), "--adapter", "caddyfile"],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )

    proc, port = start_on_some_port(start, lambda: log.read_text(errors="replace"))
    try:
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(params=["sqlite"])
def database_url(request, tmp_path):
    # Caddy is what is under test here; one store is enough.
    return f"sqlite+aiosqlite:///{tmp_path / 'tokenward.db'}"


async def test_caddy_forward_auth_in_front_of_a_backend(
    services, admin, tmp_path, backend_port, dead_port
):
    sink = use_policy(
        services,
        POLICY.format(port=backend_port, dead_port=dead_port),
        trusted_proxies="127.0.0.1/32",
        auth_failure_limit="100/minute",
    )
    good = await make_token(services, admin, principal="storefront", rate_limit=["3/minute"])
    writer = await make_token(services, admin, principal="importer", scopes=["records:write"])
    walled = await make_token(services, admin, ip_allowlist=["10.0.0.0/8"])
    app = create_asgi(services=services)
    async with uvicorn_server(app) as tokenward_port:
        site = functools.partial(caddyfile, tokenward_port, backend_port)
        with caddy(tmp_path, site) as caddy_port:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{caddy_port}") as c:
                auth = {"Authorization": f"Bearer {good.secret}"}
                spoofed = {
                    "X-Tokenward-Principal": "root",
                    "X-Tokenward-Scopes": "*",
                    "X-Tokenward-Error": "none",
                }
                r = await c.get("/records/7?x=1", headers={**auth, **spoofed})
                assert r.status_code == 200, r.text
                seen = r.json()
                assert seen["path"] == "/records/7" and seen["query"] == "x=1"
                assert "authorization" not in seen["headers"]
                assert "x-tokenward-error" not in seen["headers"]
                assert seen["headers"]["x-tokenward-principal"] == "storefront"
                assert seen["headers"]["x-tokenward-token-id"] == good.record.id
                assert seen["headers"]["x-tokenward-scopes"] == "records:read"
                assert seen["headers"]["x-tokenward-project"] == "shop"
                assert seen["headers"]["x-tokenward-environment"] == "live"

                # Backends on CGI/WSGI read "_" as "-": X_Tokenward_Principal would arrive as
                # HTTP_X_TOKENWARD_PRINCIPAL. Caddy drops every header with an underscore.
                underscored = {
                    "X_Tokenward_Principal": "admin",
                    "X_Tokenward_Scopes": "admin:*",
                    "X-Tokenward_Token-Id": "tok_other",
                    "x_TOKENWARD-project": "other",
                    "X_Forwarded_For": "10.1.1.1",
                    "X_Real_IP": "10.1.1.1",
                }
                r = await c.get("/records/7", headers={**auth, **underscored})
                assert r.status_code == 200, r.text
                seen = r.json()["headers"]
                assert [name for name in seen if "_" in name] == []
                assert seen["x-tokenward-principal"] == "storefront"
                assert seen["x-tokenward-scopes"] == "records:read"
                assert seen["x-forwarded-for"] == "127.0.0.1"

                # Two Authorization headers: refused, whichever one a server would pick.
                r = await c.get(
                    "/records/7",
                    headers=[
                        ("Authorization", f"Bearer {writer.secret}"),
                        ("Authorization", f"Bearer {good.secret}"),
                    ],
                )
                assert r.status_code == 401 and r.json()["error"] == "duplicate_authorization"
                assert good.secret not in r.text and writer.secret not in r.text

                # The body reaches the backend although Caddy asked tokenward first.
                r = await c.post(
                    "/records/7",
                    headers={"Authorization": f"Bearer {writer.secret}"},
                    content=b"x" * 100_000,
                )
                assert r.status_code == 200, r.text
                assert r.json()["method"] == "POST" and r.json()["body_bytes"] == 100_000

                r = await c.get("/records/7", headers={"Authorization": "Bearer tw_live_x"})
                assert r.status_code == 401 and r.json()["error"] == "invalid_token"
                assert 'error="invalid_token"' in r.headers["www-authenticate"]
                r = await c.get("/records/7")
                assert r.status_code == 401 and r.json()["error"] == "missing_credential"
                assert r.headers["www-authenticate"] == 'Bearer realm="tokenward"'

                r = await c.post("/records/7", headers=auth, content=b"{}")
                assert r.status_code == 403 and r.json()["error"] == "insufficient_scope"
                assert 'scope="records:write"' in r.headers["www-authenticate"]
                r = await c.get("/elsewhere", headers=auth)
                assert r.status_code == 403 and r.json()["error"] == "no_route"

                # The client cannot name another request to be checked in place of its own:
                # Caddy sets X-Forwarded-Method/-Uri, and the configuration drops nginx's
                # X-Original-* (which tokenward would prefer).
                r = await c.get("/elsewhere", headers={**auth, "X-Original-URI": "/records/7"})
                assert r.status_code == 403 and r.json()["error"] == "no_route"
                r = await c.post(
                    "/records/7",
                    headers={**auth, "X-Original-Method": "GET", "X-Original-URI": "/records/7"},
                    content=b"{}",
                )
                assert r.status_code == 403 and r.json()["error"] == "insufficient_scope"
                r = await c.post(
                    "/records/7",
                    headers={**auth, "X-Forwarded-Method": "GET", "X-Forwarded-Uri": "/records/7"},
                    content=b"{}",
                )
                assert r.status_code == 403 and r.json()["error"] == "insufficient_scope"

                # Caddy overwrites X-Forwarded-For: the client cannot claim an address.
                r = await c.get(
                    "/records/1",
                    headers={
                        "Authorization": f"Bearer {walled.secret}",
                        "X-Forwarded-For": "10.1.1.1",
                    },
                )
                assert r.status_code == 403 and r.json()["error"] == "ip_not_allowed"

                codes = [(await c.get("/records/1", headers=auth)).status_code for _ in range(2)]
                assert codes == [200, 429]
                r = await c.get("/records/1", headers=auth)
                assert r.status_code == 429 and r.json()["error"] == "rate_limited"
                assert int(r.headers["retry-after"]) >= 1
                assert r.headers["ratelimit-limit"] == "3"
                assert r.headers["ratelimit-remaining"] == "0"

    decisions = [(e.source, e.method, e.path, e.client_ip) for e in sink.access_events]
    assert len(decisions) == 15  # one event per request, allowed or denied
    assert decisions[0] == ("authz", "GET", "/records/7", "127.0.0.1")
    assert decisions[3] == ("authz", "POST", "/records/7", "127.0.0.1")


async def test_caddy_fails_closed_when_tokenward_is_down(tmp_path, backend_port, dead_port):
    site = functools.partial(caddyfile, dead_port, backend_port)
    with caddy(tmp_path, site) as caddy_port:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{caddy_port}") as c:
            r = await c.get("/records/1", headers={"Authorization": "Bearer x"})
    # Caddy's own 502: the backend was not asked.
    assert r.status_code == 502 and "x-upstream" not in r.headers
