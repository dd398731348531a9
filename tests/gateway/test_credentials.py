"""Upstream secrets held by the gateway: a fake provider that checks what it receives."""

from __future__ import annotations

import contextlib
import logging
import secrets
import socket
from collections.abc import AsyncIterator

import httpx
import pytest
import structlog
from aiohttp import web

from tests.gateway.support import make_token, use_policy
from tokenward.audit.query import AuditFilter, list_events
from tokenward.gateway import ConfigError, parse_policy
from tokenward.gateway.credentials import AnswerMask
from tokenward.gateway.proxy import Gateway

POLICY = """
[[upstreams]]
name = "provider"
url = "http://127.0.0.1:{port}"
credential_header = "x-api-key"
credential_env = "{env}"

[[upstreams]]
name = "bearer"
url = "http://127.0.0.1:{port}/v1"
credential_header = "Authorization"
credential_file = "{file}"

[[upstreams]]
name = "query"
url = "http://127.0.0.1:{port}"
credential_query = "key"
credential_env = "{env}"

[[upstreams]]
name = "down"
url = "http://127.0.0.1:{dead}"
credential_header = "x-api-key"
credential_env = "{env}"

[[routes]]
upstream = "provider"
path = "/llm/{{rest:path}}"
methods = ["POST", "GET"]
scope = "llm:invoke"

[[routes]]
upstream = "bearer"
path = "/bearer/{{rest:path}}"
methods = ["GET"]
scope = "llm:invoke"

[[routes]]
upstream = "query"
path = "/query/{{rest:path}}"
methods = ["GET"]
scope = "llm:invoke"

[[routes]]
upstream = "down"
path = "/down"
methods = ["GET"]
scope = "llm:invoke"
"""


def _bound() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


class Provider:
    """A fake LLM provider: records every request; ``/echo`` sends the key back."""

    def __init__(self) -> None:
        self.seen: list[dict[str, object]] = []

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen.append(
            {
                "path": request.raw_path,
                "headers": [(k.lower(), v) for k, v in request.headers.items()],
                "body": body,
            }
        )
        key = request.headers.get("x-api-key") or request.query.get("key") or ""
        if request.path.endswith("/echo"):
            # a provider that quotes the key back (an error message, a debug header)
            text = f'{{"error": "invalid key {key}"}}'
            return web.Response(text=text, headers={"X-Debug-Key": key}, status=401)
        if request.path.endswith("/stream"):
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            half = len(key) // 2
            await response.write(b"data: start " + key[:half].encode())
            await response.write(key[half:].encode() + b" end\n\n")
            await response.write_eof()
            return response
        return web.json_response({"ok": True})


@contextlib.asynccontextmanager
async def gateway_with_provider(
    services, tmp_path, monkeypatch
) -> AsyncIterator[tuple[httpx.AsyncClient, Provider, str, object]]:
    key = "sk-test-" + secrets.token_urlsafe(24)  # generated here, never a real key
    env = "TW_TEST_PROVIDER_KEY"
    monkeypatch.setenv(env, key)
    key_file = tmp_path / "provider.key"
    key_file.write_text(key + "\n")
    provider = Provider()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", provider.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    upstream_sock, dead, gateway_sock = _bound(), _bound(), _bound()
    site = web.SockSite(runner, upstream_sock)
    await site.start()
    text = POLICY.format(
        port=upstream_sock.getsockname()[1], dead=dead.getsockname()[1], env=env, file=key_file
    )
    dead.close()
    sink = use_policy(services, text)
    gateway = Gateway(services.enforcement)
    await gateway.start("127.0.0.1", 0, sock=gateway_sock)
    base = f"http://127.0.0.1:{gateway_sock.getsockname()[1]}"
    try:
        async with httpx.AsyncClient(base_url=base) as client:
            yield client, provider, key, sink
    finally:
        await gateway.aclose()
        await runner.cleanup()


async def test_the_provider_gets_the_key_and_never_the_token(
    services, admin, tmp_path, monkeypatch
):
    issued = await make_token(services, admin, scopes=["llm:invoke"])
    auth = {"Authorization": f"Bearer {issued.secret}"}
    with structlog.testing.capture_logs() as logs:
        async with gateway_with_provider(services, tmp_path, monkeypatch) as (gw, seen, key, sink):
            # a header credential: the client's own copy of the header is replaced
            r = await gw.post(
                "/llm/chat", headers={**auth, "x-api-key": "client-guess"}, content=b"{}"
            )
            assert r.status_code == 200, r.text
            # Authorization: Bearer from a file (the trailing newline is not part of it)
            assert (await gw.get("/bearer/models", headers=auth)).status_code == 200
            # a query parameter: the client's "key" is dropped, the gateway's added
            r = await gw.get("/query/models?key=client-guess&x=1", headers=auth)
            assert r.status_code == 200
    header, bearer, query = seen.seen
    assert ("x-api-key", key) in header["headers"]
    assert [v for k, v in header["headers"] if k == "x-api-key"] == [key]
    assert not any(k == "authorization" for k, _ in header["headers"])
    assert ("authorization", f"Bearer {key}") in bearer["headers"]
    assert bearer["path"] == "/v1/bearer/models"
    assert query["path"] == f"/query/models?x=1&key={key}"
    for request in seen.seen:
        assert issued.secret not in repr(request)  # the client's token never goes upstream
    assert key not in repr(sink.access_events) and key not in repr(logs)
    await services.audit.flush()
    page = await list_events(services.engine, AuditFilter(), limit=50)
    assert page.events and key not in repr([e.values for e in page.events])


async def test_an_echoed_key_is_masked_and_errors_never_hold_it(
    services, admin, tmp_path, monkeypatch, caplog
):
    issued = await make_token(services, admin, scopes=["llm:invoke"])
    auth = {"Authorization": f"Bearer {issued.secret}"}
    caplog.set_level(logging.DEBUG)
    with structlog.testing.capture_logs() as logs:
        async with gateway_with_provider(services, tmp_path, monkeypatch) as (gw, _, key, sink):
            r = await gw.get("/llm/echo", headers=auth)
            assert r.status_code == 401
            assert key not in r.text and "*" * len(key) in r.text
            assert r.headers["x-debug-key"] == "*" * len(key)
            r = await gw.get("/llm/stream", headers=auth)  # split across two chunks
            assert r.text == "data: start " + "*" * len(key) + " end\n\n"
            r = await gw.get("/down", headers=auth)
            assert r.status_code == 502 and key not in r.text
    assert key not in repr(logs) and key not in caplog.text
    assert key not in repr(sink.access_events)
    assert key not in repr(services.enforcement.policy)  # nor in a repr of the policy


async def test_each_agent_token_has_its_own_budget(services, admin, tmp_path, monkeypatch):
    """One token per agent: its rate limit and uses apply on the provider's route."""
    limited = await make_token(services, admin, scopes=["llm:invoke"], rate_limit=["2/minute"])
    once = await make_token(services, admin, scopes=["llm:invoke"], uses=1)
    async with gateway_with_provider(services, tmp_path, monkeypatch) as (gw, seen, _, _sink):
        auth = {"Authorization": f"Bearer {limited.secret}"}
        answers = [await gw.get("/llm/x", headers=auth) for _ in range(3)]
        assert [r.status_code for r in answers] == [200, 200, 429]
        assert int(answers[2].headers["retry-after"]) > 0
        auth = {"Authorization": f"Bearer {once.secret}"}
        assert (await gw.get("/llm/x", headers=auth)).status_code == 200
        r = await gw.get("/llm/x", headers=auth)
        assert r.status_code == 401 and r.json()["reason"] == "uses_exhausted"
    assert len(seen.seen) == 3  # denied requests never reach the provider
    by_token = [e.decision.token.id for e in _sink.access_events if e.decision.token]
    assert by_token.count(limited.record.id) == 3 and by_token.count(once.record.id) == 2


def test_a_secret_written_in_the_policy_is_refused():
    text = '[[upstreams]]\nname = "p"\nurl = "http://127.0.0.1:1"\napi_key = "sk-live-abc"\n'
    with pytest.raises(ConfigError) as info:
        parse_policy(text, "t.toml")
    message = str(info.value)
    assert "t.toml:4: upstreams[0].api_key: the secret must not be written" in message
    assert "sk-live-abc" not in message


@pytest.mark.parametrize(
    ("keys", "problem"),
    [
        ('credential_header = "x-api-key"', "credential_file: set exactly one"),
        ('credential_env = "TW_UNSET_FOR_TEST"', "credential_header: set exactly one"),
        (
            'credential_header = "x-api-key"\ncredential_env = "TW_UNSET_FOR_TEST"',
            "credential_env: TW_UNSET_FOR_TEST is empty or not set",
        ),
        (
            'credential_header = "x-api-key"\ncredential_file = "/nonexistent/key"',
            "credential_file: cannot read /nonexistent/key",
        ),
        (
            'credential_header = "Host"\ncredential_env = "TW_UNSET_FOR_TEST"',
            "credential_header: the gateway sets Host itself",
        ),
        (
            'credential_query = "key"\ncredential_prefix = "Bearer "\ncredential_env = "X"',
            "credential_prefix: only for a header credential",
        ),
    ],
)
def test_credential_settings_are_checked(keys, problem, monkeypatch):
    monkeypatch.delenv("TW_UNSET_FOR_TEST", raising=False)
    monkeypatch.setenv("X", "v")
    text = f'[[upstreams]]\nname = "p"\nurl = "http://127.0.0.1:1"\n{keys}\n'
    with pytest.raises(ConfigError, match=problem):
        parse_policy(text, "t.toml")


def test_a_secret_with_a_line_break_is_refused(monkeypatch):
    monkeypatch.setenv("TW_TEST_KEY", "abc\r\nX-Injected: 1")
    text = (
        '[[upstreams]]\nname = "p"\nurl = "http://127.0.0.1:1"\n'
        'credential_header = "x-api-key"\ncredential_env = "TW_TEST_KEY"\n'
    )
    with pytest.raises(ConfigError, match="one line of printable ASCII") as info:
        parse_policy(text, "t.toml")
    assert "abc" not in str(info.value)


async def test_the_mask_holds_back_only_a_possible_start_of_the_key():
    mask = AnswerMask(b"sk-secret")
    assert await mask.feed(b"data: 1\n\n") == b"data: 1\n\n"  # nothing held: streams at once
    assert await mask.feed(b"x sk-se") == b"x "
    assert await mask.feed(b"cret y") == b"********* y"
    assert await mask.feed(b"ends sk") == b"ends "
    assert await mask.end() == b"sk"
