"""docs/proxies/nginx.conf, as documented, with a real nginx in front of a real backend."""

from __future__ import annotations

import contextlib
import functools
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, start_on_some_port
from tests.gateway.support import POLICY, make_token, use_policy, uvicorn_server
from tokenward.app import create_asgi

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
pytestmark = pytest.mark.skipif(not Path(NGINX).exists(), reason="nginx is not installed")

MAIN_CONF = """
daemon off;
master_process off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    include {tmp}/site.conf;
}}
"""


def site_conf(tokenward_port: int, backend_port: int, nginx_port: int) -> str:
    text = (ROOT / "docs" / "proxies" / "nginx.conf").read_text()
    for documented, actual in (
        ("127.0.0.1:8080", tokenward_port),
        ("127.0.0.1:9001", backend_port),
        ("127.0.0.1:8000", nginx_port),
    ):
        assert documented in text
        text = text.replace(documented, f"127.0.0.1:{actual}")
    return text


@contextlib.contextmanager
def nginx(tmp_path: Path, site: Callable[[int], str]) -> Iterator[int]:
    """nginx with ``site(port)`` as its site; yields the port it listens on.

    nginx cannot take a socket bound for it nor report the port it bound, so the port is a
    guess, retried on "address already in use" (see :func:`start_on_some_port`)."""
    (tmp_path / "nginx.conf").write_text(MAIN_CONF.format(tmp=tmp_path))
    stderr_path = tmp_path / "nginx.stderr"

    def start(port: int) -> subprocess.Popen[bytes]:
        (tmp_path / "site.conf").write_text(site(port))
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
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(params=["sqlite"])
def database_url(request, tmp_path):
    # nginx is what is under test here; one store is enough.
    return f"sqlite+aiosqlite:///{tmp_path / 'tokenward.db'}"


async def test_nginx_auth_request_in_front_of_a_backend(
    services, admin, tmp_path, backend_port, dead_port
):
    sink = use_policy(
        services,
        POLICY.format(port=backend_port, dead_port=dead_port),
        trusted_proxies="127.0.0.1/32",
        auth_failure_limit="100/minute",
    )
    good = await make_token(services, admin, principal="storefront", rate_limit=["4/minute"])
    walled = await make_token(services, admin, ip_allowlist=["10.0.0.0/8"])
    app = create_asgi(services=services)
    async with uvicorn_server(app) as tokenward_port:
        site = functools.partial(site_conf, tokenward_port, backend_port)
        with nginx(tmp_path, site) as nginx_port:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{nginx_port}") as c:
                auth = {"Authorization": f"Bearer {good.secret}"}
                r = await c.get(
                    "/records/7?x=1",
                    headers={**auth, "X-Tokenward-Principal": "root", "X-Original-URI": "/x"},
                )
                assert r.status_code == 200, r.text
                seen = r.json()
                assert seen["path"] == "/records/7" and seen["query"] == "x=1"
                assert "authorization" not in seen["headers"]
                assert seen["headers"]["x-tokenward-principal"] == "storefront"
                assert seen["headers"]["x-tokenward-token-id"] == good.record.id
                assert seen["headers"]["x-tokenward-scopes"] == "records:read"
                assert r.headers["ratelimit-limit"] == "4"
                assert r.headers["ratelimit-remaining"] == "3"

                # nginx drops header names with underscores (underscores_in_headers off, set
                # in the file): a CGI/WSGI backend would read X_Tokenward_Principal as
                # HTTP_X_TOKENWARD_PRINCIPAL.
                r = await c.get(
                    "/records/7",
                    headers={
                        **auth,
                        "X_Tokenward_Principal": "admin",
                        "X_Tokenward_Scopes": "admin:*",
                        "X-Tokenward_Token-Id": "tok_other",
                        "X_Forwarded_For": "10.1.1.1",
                        "X_Original_URI": "/elsewhere",
                    },
                )
                assert r.status_code == 200, r.text
                seen = r.json()["headers"]
                assert [name for name in seen if "_" in name] == []
                assert seen["x-tokenward-principal"] == "storefront"
                assert seen["x-tokenward-scopes"] == "records:read"

                # Two Authorization headers: nginx refuses them itself (a duplicate header
                # line), before asking tokenward or the backend.
                r = await c.get(
                    "/records/7",
                    headers=[
                        ("Authorization", f"Bearer {walled.secret}"),
                        ("Authorization", f"Bearer {good.secret}"),
                    ],
                )
                assert r.status_code == 400 and "x-upstream" not in r.headers
                assert good.secret not in r.text and walled.secret not in r.text

                # Every header tokenward sets for a backend is replaced, and the forgeable
                # forms of the client's address go.
                r = await c.get(
                    "/records/7",
                    headers={
                        **auth,
                        "X-Tokenward-Client-IP": "6.6.6.6",
                        "X-Tokenward-Environment": "test",
                        "X-Real-IP": "6.6.6.6",
                        "Forwarded": "for=6.6.6.6",
                    },
                )
                assert r.status_code == 200, r.text
                seen = r.json()["headers"]
                assert seen["x-tokenward-client-ip"] == "127.0.0.1"
                assert seen["x-real-ip"] == "127.0.0.1"
                assert seen["x-tokenward-environment"] == "live"
                assert "forwarded" not in seen

                r = await c.get("/records/7", headers={"Authorization": "Bearer tw_live_x"})
                assert r.status_code == 401 and r.json()["error"] == "invalid_token"
                assert 'error="invalid_token"' in r.headers["www-authenticate"]
                assert len(r.headers.get_list("www-authenticate")) == 1
                r = await c.get("/records/7")
                assert r.status_code == 401 and r.json()["error"] == "missing_credential"

                r = await c.post("/records/7", headers=auth, content=b"{}")
                assert r.status_code == 403 and r.json()["error"] == "insufficient_scope"
                assert 'scope="records:write"' in r.headers["www-authenticate"]
                r = await c.get("/elsewhere", headers=auth)
                assert r.status_code == 403 and r.json()["error"] == "no_route"

                # nginx overwrites X-Forwarded-For: the client cannot claim an address.
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

    decisions = [(e.source, e.method, e.path, e.client_ip) for e in sink.access_events]
    assert len(decisions) == 11  # one event per request, allowed or denied
    assert decisions[0] == ("authz", "GET", "/records/7", "127.0.0.1")


async def test_a_dpop_bound_token_through_nginx(services, admin, tmp_path, backend_port, dead_port):
    """The proof names the URL the client called; the subrequest must carry that Host and
    scheme (not the upstream's name), and a client's own X-Forwarded-Host must not count."""
    from joserfc.jwk import ECKey

    from tokenward.oauth.dpop import make_proof

    use_policy(
        services,
        POLICY.format(port=backend_port, dead_port=dead_port),
        trusted_proxies="127.0.0.1/32",
    )
    key = ECKey.generate_key("P-256")
    issued = await make_token(services, admin, dpop_jkt=key.thumbprint())
    app = create_asgi(services=services)
    async with uvicorn_server(app) as tokenward_port:
        site = functools.partial(site_conf, tokenward_port, backend_port)
        with nginx(tmp_path, site) as nginx_port:
            base = f"http://127.0.0.1:{nginx_port}"
            async with httpx.AsyncClient(base_url=base) as c:

                def headers(url: str, **extra: str) -> dict[str, str]:
                    proof = make_proof(key, "GET", url, access_token=issued.secret)
                    return {"Authorization": f"DPoP {issued.secret}", "DPoP": proof, **extra}

                r = await c.get("/records/1", headers=headers(f"{base}/records/1"))
                assert r.status_code == 200, r.text
                assert "dpop" not in r.json()["headers"]
                # A proof for another host, with the client claiming that host: refused.
                elsewhere = "http://elsewhere.example/records/1"
                r = await c.get(
                    "/records/1",
                    headers=headers(elsewhere, **{"X-Forwarded-Host": "elsewhere.example"}),
                )
                assert r.status_code == 401, r.text


async def test_nginx_fails_closed_when_tokenward_is_down(tmp_path, backend_port, dead_port):
    site = functools.partial(site_conf, dead_port, backend_port)
    with nginx(tmp_path, site) as nginx_port:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{nginx_port}") as c:
            r = await c.get("/records/1", headers={"Authorization": "Bearer x"})
    assert r.status_code == 503 and r.json()["error"] == "unavailable"
