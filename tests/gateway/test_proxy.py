"""The built-in gateway, served by uvicorn, in front of a real upstream server."""

from __future__ import annotations

import contextlib

import httpx
import pytest

from tests.conftest import closed_port, listening_socket, port_of
from tests.gateway.support import POLICY, make_token, upstream_server, use_policy
from tokenward.gateway.proxy import Gateway


@contextlib.asynccontextmanager
async def running_gateway(services, **settings):
    sock = listening_socket()
    with closed_port() as dead_port:
        async with upstream_server() as upstream_port:
            sink = use_policy(
                services, POLICY.format(port=upstream_port, dead_port=dead_port), **settings
            )
            gateway = Gateway(services.enforcement)
            await gateway.start("127.0.0.1", 0, sock=sock)
            try:
                base = f"http://127.0.0.1:{port_of(sock)}"
                async with httpx.AsyncClient(base_url=base) as client:
                    yield client, sink
            finally:
                await gateway.aclose()
                sock.close()


async def test_forwards_request_strips_secrets_and_adds_identity(services, admin):
    issued = await make_token(services, admin, principal="storefront", rate_limit=["9/minute"])
    async with running_gateway(services) as (gw, sink):
        r = await gw.get(
            "/records/a%20b/c?x=1&y=%2F",
            headers={
                "Authorization": f"Bearer {issued.secret}",
                "X-Tokenward-Principal": "root",
                "X-Tokenward-Scopes": "*",
                "X-Custom": "kept",
                "Connection": "keep-alive, X-Custom-Hop",
            },
        )
    assert r.status_code == 200, r.text
    assert r.headers["x-upstream"] == "yes"
    assert r.headers["ratelimit-limit"] == "9" and r.headers["ratelimit-remaining"] == "8"
    seen = r.json()
    assert seen["method"] == "GET"
    assert seen["path"] == "/records/a%20b/c" and seen["query"] == "x=1&y=%2F"
    headers = seen["headers"]
    assert "authorization" not in headers
    assert issued.secret not in r.text
    assert headers["x-tokenward-principal"] == "storefront"
    assert headers["x-tokenward-scopes"] == "records:read"
    assert headers["x-tokenward-token-id"] == issued.record.id
    assert headers["x-tokenward-project"] == "shop"
    assert headers["x-tokenward-client-ip"] == "127.0.0.1"
    assert headers["x-custom"] == "kept"
    assert headers["x-forwarded-for"] == "127.0.0.1"
    assert headers["x-request-id"] == r.headers["x-request-id"]
    [event] = sink.access_events
    assert event.source == "gateway" and event.decision.allowed
    assert (event.method, event.path) == ("GET", "/records/a%20b/c")


async def test_denials_are_json_and_never_reach_the_upstream(services, admin):
    issued = await make_token(services, admin)
    auth = {"Authorization": f"Bearer {issued.secret}"}
    async with running_gateway(services) as (gw, sink):
        r = await gw.get("/records/1")
        assert r.status_code == 401 and r.json()["error"] == "missing_credential"
        r = await gw.post("/records/1", headers=auth, content=b"{}")
        assert r.status_code == 403 and r.json()["error"] == "insufficient_scope"
        r = await gw.get("/nowhere", headers=auth)
        assert r.status_code == 404 and r.json()["error"] == "no_route"
        r = await gw.get("/authz-only/x", headers=auth)  # a route without upstream
        assert r.status_code == 404
        r = await gw.get("/records/%2e%2e/secret", headers=auth)
        assert r.status_code == 404
        r = await gw.get("/records/x", headers={"Authorization": "Bearer tw_live_nope"})
        assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    assert len(sink.access_events) == 6
    assert not any(e.decision.allowed for e in sink.access_events)


async def test_streams_large_bodies_both_ways_within_bounds(services, admin):
    issued = await make_token(services, admin, scopes=["records:*"])
    auth = {"Authorization": f"Bearer {issued.secret}"}

    async def chunks(n: int, size: int = 65536):
        for _ in range(n):
            yield b"y" * size

    async with running_gateway(services) as (gw, _):
        r = await gw.put("/records/upload", headers=auth, content=chunks(20))  # chunked, 1.3 MB
        assert r.status_code == 200 and r.json()["body_bytes"] == 20 * 65536
        body = b"z" * 1_500_000
        r = await gw.post("/records/upload", headers=auth, content=body)
        assert r.status_code == 200 and r.json()["body_bytes"] == len(body)
        r = await gw.post("/records/upload", headers=auth, content=b"z" * 2_000_001)
        assert r.status_code == 413 and r.json()["error"] == "payload_too_large"
        r = await gw.put("/records/upload", headers=auth, content=chunks(40))
        assert r.status_code == 413
        async with gw.stream("GET", "/records/big/2500000", headers=auth) as r:
            total = sum([len(c) async for c in r.aiter_bytes()])
        assert r.status_code == 200 and total == 2_500_000
        with pytest.raises(httpx.HTTPError):
            async with gw.stream("GET", "/records/big/3500000", headers=auth) as r:
                async for _ in r.aiter_bytes():
                    pass


async def test_upstream_down_is_502_and_slow_is_504(services, admin):
    issued = await make_token(services, admin)
    auth = {"Authorization": f"Bearer {issued.secret}"}
    async with running_gateway(services) as (gw, _):
        r = await gw.get("/down", headers=auth)
        assert r.status_code == 502 and r.json()["error"] == "upstream_unavailable"
        r = await gw.get("/records/slow", headers=auth)
        assert r.status_code == 504 and r.json()["error"] == "upstream_timeout"
        r = await gw.get("/records/fine", headers=auth)  # the pool recovers
        assert r.status_code == 200


async def test_remaining_uses_and_route_limit_through_the_gateway(services, admin):
    issued = await make_token(services, admin, scopes=["functions:invoke:*"], uses=3)
    auth = {"Authorization": f"Bearer {issued.secret}"}
    async with running_gateway(services) as (gw, _):
        codes = [(await gw.post("/functions/mail", headers=auth)).status_code for _ in range(3)]
        assert codes == [200, 200, 429]  # the route allows 2/minute per token
        # The rate-limited call spent no use; the last use goes through another route.
        assert (await services.store.get_token(issued.record.id)).remaining_uses == 1
        r = await gw.get("/records/x", headers={**auth})
        assert r.status_code == 403  # no records scope: a denied call spends nothing either
        services.verifier.clear()
        r = await gw.get("/shop/x", headers=auth)
        assert r.status_code == 403
        assert (await services.store.get_token(issued.record.id)).remaining_uses == 1
        twice = await make_token(services, admin, uses=2)
        auth2 = {"Authorization": f"Bearer {twice.secret}"}
        codes = [(await gw.get("/records/x", headers=auth2)).status_code for _ in range(3)]
        assert codes == [200, 200, 401]


async def test_keeps_connections_to_the_upstream_alive(services, admin):
    issued = await make_token(services, admin)
    auth = {"Authorization": f"Bearer {issued.secret}"}
    async with running_gateway(services) as (gw, _):
        ports = {(await gw.get("/records/x", headers=auth)).json()["peer_port"] for _ in range(5)}
    assert len(ports) == 1  # one pooled upstream connection served all five requests


async def test_head_and_expect_continue(services, admin):
    issued = await make_token(services, admin, scopes=["records:*"])
    auth = {"Authorization": f"Bearer {issued.secret}"}
    async with running_gateway(services) as (gw, _):
        r = await gw.head("/records/x", headers=auth)
        assert r.status_code == 200 and r.content == b""
        r = await gw.post(
            "/records/x", headers={**auth, "Expect": "100-continue"}, content=b"a" * 1000
        )
        assert r.status_code == 200 and r.json()["body_bytes"] == 1000
        assert "expect" not in r.json()["headers"]


async def test_dpop_bound_token_through_the_gateway(services, admin):
    from joserfc.jwk import ECKey

    from tokenward.oauth.dpop import make_proof

    key = ECKey.generate_key("P-256")
    issued = await make_token(services, admin, dpop_jkt=key.thumbprint())
    async with running_gateway(services) as (gw, sink):
        url = str(gw.base_url.join("/records/1"))  # scheme and Host as the client sends them

        def proof(target: str = url) -> str:
            return make_proof(key, "GET", target, access_token=issued.secret)

        r = await gw.get(
            "/records/1", headers={"Authorization": f"DPoP {issued.secret}", "DPoP": proof()}
        )
        assert r.status_code == 200, r.text
        forwarded = r.json()["headers"]
        assert "dpop" not in forwarded and "authorization" not in forwarded
        assert forwarded["x-tokenward-token-id"] == issued.record.id
        r = await gw.get(
            "/records/1",
            headers={"Authorization": f"DPoP {issued.secret}", "DPoP": proof(url + "x")},
        )
        assert r.status_code == 401  # a proof for another URL
        challenge = r.headers["www-authenticate"]
        assert challenge.startswith("DPoP ") and 'error="invalid_dpop_proof"' in challenge
        r = await gw.get("/records/1", headers={"Authorization": f"Bearer {issued.secret}"})
        assert r.status_code == 401  # no proof at all
        # RFC 9449 §7.1: challenged with the DPoP scheme and the algorithms accepted.
        challenge = r.headers["www-authenticate"]
        assert challenge.startswith("DPoP ") and 'error="invalid_token"' in challenge
        assert 'algs="' in challenge and "ES256" in challenge
    assert [e.decision.allowed for e in sink.access_events] == [True, False, False]


async def test_what_the_server_cannot_parse_is_json_and_never_quoted(services, admin, capsys):
    """A malformed header line, with a token in it: a JSON 400, and no trace of the token in
    the answer or the log."""
    import asyncio
    import json

    issued = await make_token(services, admin)
    async with running_gateway(services) as (gw, _sink):
        port = int(str(gw.base_url).rsplit(":", 1)[1].strip("/"))
        for bad in (
            f"Authorization: Bearer {issued.secret}\x01",
            f"Content-Length: {issued.secret}",
            f"X-{issued.secret}\x7f: 1",
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(f"GET /records/1 HTTP/1.1\r\nHost: x\r\n{bad}\r\n\r\n".encode("latin-1"))
            await writer.drain()
            answer = (await asyncio.wait_for(reader.read(), 5)).decode("latin-1")
            writer.close()
            head, _, body = answer.partition("\r\n\r\n")
            assert head.startswith("HTTP/1.") and " 400 " in head.split("\r\n")[0]
            assert "application/json" in head
            assert json.loads(body)["error"] == "bad_request"
            assert issued.secret not in answer
    logged = capsys.readouterr()
    assert issued.secret not in logged.out + logged.err


async def test_underscore_spellings_of_controlled_headers_are_not_forwarded(services, admin):
    """CGI and WSGI servers fold ``_`` into ``-``: ``X_Tokenward_Principal`` would reach a
    backend as ``HTTP_X_TOKENWARD_PRINCIPAL``, next to (or in place of) the real one."""
    issued = await make_token(services, admin, principal="storefront")
    spoofed = [
        ("X_Tokenward_Principal", "admin"),
        ("X_Tokenward_Scopes", "admin:*"),
        ("x-tokenward_token-id", "tok_other"),
        ("X_TOKENWARD_CLIENT_IP", "10.0.0.1"),
        ("X_Forwarded_For", "10.0.0.1"),
        ("X_Forwarded_Proto", "https"),
        ("X-Forwarded_Host", "evil.example"),
        ("X-Forwarded-Prefix", "/admin"),
        ("X-Forwarded-Port", "1"),
        ("Forwarded", "for=10.0.0.1;proto=https"),
        ("X-Real-IP", "10.0.0.1"),
        ("X_Real_IP", "10.0.0.1"),
        ("X_Request_ID", "chosen-by-client"),
        ("Proxy_Authorization", "Basic eDp5"),
        ("Transfer_Encoding", "chunked"),
    ]
    async with running_gateway(services) as (gw, _sink):
        r = await gw.get(
            "/records/7",
            headers=[
                ("Authorization", f"Bearer {issued.secret}"),
                *spoofed,
                ("X_Custom_Thing", "kept"),
            ],
        )
    assert r.status_code == 200, r.text
    seen = r.json()["headers"]
    assert seen["x-tokenward-principal"] == "storefront"
    assert seen["x-tokenward-scopes"] == "records:read"
    assert seen["x-forwarded-for"] == "127.0.0.1" and seen["x-forwarded-proto"] == "http"
    assert seen["x-forwarded-host"] == "127.0.0.1:" + str(gw.base_url.port)
    assert seen["x_custom_thing"] == "kept"  # underscores alone are no reason to drop
    assert [n for n in seen if "_" in n] == ["x_custom_thing"]
    for gone in ("forwarded", "x-real-ip", "x-forwarded-prefix", "x-forwarded-port"):
        assert gone not in seen
    assert "admin" not in seen["x-tokenward-principal"] + seen["x-tokenward-scopes"]


async def test_more_than_one_authorization_header_is_refused(services, admin):
    issued = await make_token(services, admin)
    other = await make_token(services, admin, scopes=["records:*"])
    async with running_gateway(services) as (gw, sink):
        for values in ((issued.secret, other.secret), (issued.secret, issued.secret)):
            r = await gw.get(
                "/records/7", headers=[("Authorization", f"Bearer {v}") for v in values]
            )
            assert r.status_code == 400, r.text
            assert r.json()["error"] == "duplicate_authorization"
            assert "x-upstream" not in r.headers
            assert 'error="invalid_request"' in r.headers["www-authenticate"]
            assert issued.secret not in r.text and other.secret not in r.text
            assert issued.secret not in str(r.headers) and other.secret not in str(r.headers)
    assert len(sink.access_events) == 2
    assert not any(e.decision.allowed for e in sink.access_events)


async def test_invalid_escapes_and_raw_bytes_in_the_path_match_no_route(services, admin):
    import asyncio

    issued = await make_token(services, admin)
    auth = {"Authorization": f"Bearer {issued.secret}"}
    async with running_gateway(services) as (gw, sink):
        for path in ("/records/users/%zz", "/records/users/%4", "/records/%g0/x"):
            r = await gw.get(path, headers=auth)
            assert r.status_code == 404 and r.json()["error"] == "no_route", path
        port = gw.base_url.port
        for raw in (
            b"/records/users/\xff\xfe",
            b"/records/\xc0\xae\xc0\xae/x",
            b"/records/\xc3\xa9",
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(
                b"GET " + raw + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                b"Authorization: Bearer " + issued.secret.encode() + b"\r\n\r\n"
            )
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            # The HTTP parser refuses them before any decision (a JSON 400).
            assert answer.split(b" ", 2)[1] == b"400", (raw, answer[:200])
            assert b"application/json" in answer and b"x-upstream" not in answer.lower()
    assert not any(e.decision.allowed for e in sink.access_events)


async def test_a_dependency_that_fails_mid_request_is_a_503_not_a_500(services, admin, monkeypatch):
    """The audit log cannot be written (a database that hangs): the gateway fails closed
    with 503 and Retry-After, as the API does, never a 500."""
    from tokenward.errors import Unavailable

    issued = await make_token(services, admin)

    async def failing_record(*args, **kwargs):
        raise Unavailable("audit_unavailable", "the audit log cannot be written")

    async with running_gateway(services) as (gw, _):
        monkeypatch.setattr(services.enforcement, "record", failing_record)
        r = await gw.get("/records/1", headers={"Authorization": f"Bearer {issued.secret}"})
    assert r.status_code == 503, r.text
    assert r.json()["error"] == "audit_unavailable" and r.headers["retry-after"] == "5"
    assert issued.secret not in r.text


async def test_an_oversized_header_is_a_431(services, admin):
    issued = await make_token(services, admin)
    async with running_gateway(services) as (gw, _):
        r = await gw.get(
            "/records/1",
            headers={"Authorization": f"Bearer {issued.secret}", "X-Big": "a" * 100_000},
        )
    assert r.status_code == 431 and r.json()["error"] == "headers_too_large"
    assert issued.secret not in r.text
