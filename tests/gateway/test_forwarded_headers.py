"""What the gateway forwards about the request itself: its own X-Forwarded-* (a client's
chain only from a trusted proxy) and never a method override."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator

import httpx
import pytest
from aiohttp import web

from tests.gateway.support import make_token, use_policy
from tokenward.gateway.proxy import Gateway

_POLICY = """
[[upstreams]]
name = "records"
url = "http://127.0.0.1:{port}"

[[routes]]
upstream = "records"
path = "/records/{{rest:path}}"
methods = ["GET"]
scope = "records:read"
"""


async def _echo(request: web.Request) -> web.Response:
    headers = [[k.lower(), v] for k, v in request.headers.items()]
    return web.json_response({"method": request.method, "headers": headers})


@contextlib.asynccontextmanager
async def _upstream() -> AsyncIterator[int]:
    """A real HTTP upstream on a port the system chose; yields the port."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", _echo)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


@contextlib.asynccontextmanager
async def _gateway(services, **settings) -> AsyncIterator[httpx.AsyncClient]:
    async with _upstream() as port:
        use_policy(services, _POLICY.format(port=port), **settings)
        gateway = Gateway(services.enforcement)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        await gateway.start("127.0.0.1", 0, sock=sock)
        base = f"http://127.0.0.1:{sock.getsockname()[1]}"
        try:
            async with httpx.AsyncClient(base_url=base) as client:
                yield client
        finally:
            await gateway.aclose()


def _seen(response: httpx.Response) -> dict[str, list[str]]:
    assert response.status_code == 200, response.text
    out: dict[str, list[str]] = {}
    for name, value in response.json()["headers"]:
        out.setdefault(name, []).append(value)
    return out


_SPOOFED = [
    ("X-Forwarded-For", "10.9.9.9"),
    ("X-Forwarded-For", "192.0.2.1, 10.0.0.1"),
    ("X-Forwarded-Proto", "https"),
    ("X-Forwarded-Host", "evil.example"),
    ("Forwarded", "for=10.0.0.1;proto=https"),
]


async def test_a_client_s_forwarded_headers_are_replaced_without_a_trusted_proxy(services, admin):
    issued = await make_token(services, admin)
    async with _gateway(services) as gw:
        r = await gw.get(
            "/records/1", headers=[("Authorization", f"Bearer {issued.secret}"), *_SPOOFED]
        )
    seen = _seen(r)
    assert seen["x-forwarded-for"] == ["127.0.0.1"]  # the peer alone, nothing the client said
    assert seen["x-forwarded-proto"] == ["http"]
    assert seen["x-forwarded-host"] == [f"127.0.0.1:{gw.base_url.port}"]
    assert "forwarded" not in seen
    assert seen["x-tokenward-client-ip"] == ["127.0.0.1"]


async def test_a_trusted_proxy_s_forwarded_for_chain_is_kept_and_extended(services, admin):
    issued = await make_token(services, admin)
    async with _gateway(services, trusted_proxies="127.0.0.1/32") as gw:
        r = await gw.get(
            "/records/1", headers=[("Authorization", f"Bearer {issued.secret}"), *_SPOOFED]
        )
    seen = _seen(r)
    assert seen["x-forwarded-for"] == ["10.9.9.9, 192.0.2.1, 10.0.0.1, 127.0.0.1"]
    assert seen["x-forwarded-proto"] == ["http"]  # still the gateway's own
    assert "forwarded" not in seen
    assert seen["x-tokenward-client-ip"] == ["10.0.0.1"]


async def test_a_peer_outside_the_trusted_proxies_is_not_believed(services, admin):
    issued = await make_token(services, admin)
    async with _gateway(services, trusted_proxies="10.0.0.0/8") as gw:
        r = await gw.get(
            "/records/1", headers=[("Authorization", f"Bearer {issued.secret}"), *_SPOOFED]
        )
    assert _seen(r)["x-forwarded-for"] == ["127.0.0.1"]


@pytest.mark.parametrize(
    "name",
    [
        "X-HTTP-Method-Override",
        "X-HTTP-Method",
        "X-Method-Override",
        "x-http-method-override",
        "X_HTTP_Method_Override",
        "X_Method_Override",
    ],
)
async def test_a_method_override_never_reaches_the_upstream(services, admin, name):
    """The route is decided on the real method (GET, records:read): an upstream framework
    that honours an override would otherwise serve a DELETE to a read-only token."""
    issued = await make_token(services, admin)
    async with _gateway(services) as gw:
        r = await gw.get(
            "/records/1",
            headers=[("Authorization", f"Bearer {issued.secret}"), (name, "DELETE")],
        )
    seen = _seen(r)
    assert r.json()["method"] == "GET"
    assert not {"x-http-method-override", "x-http-method", "x-method-override"} & set(seen)
    assert not [n for n in seen if "method" in n.replace("_", "-")]
