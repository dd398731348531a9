"""Invariant 1 for free text: a token typed into any stored field is refused (400
``token_in_field``), one that arrives in a header or a path is cut out, percent-encoded or
not; nothing of it reaches the database, the audit log or the server log."""

from __future__ import annotations

import contextlib
import io
import socket
from collections.abc import AsyncIterator
from urllib.parse import quote

import httpx
import pytest
from aiohttp import web
from sqlalchemy import select

from tests.gateway.support import make_token, use_policy
from tokenward.anomaly.store import Alert
from tokenward.gateway.proxy import Gateway
from tokenward.logs import access_log, configure_logging
from tokenward.store.tables import metadata
from tokenward.tokens.format import generate_token, holds_token, redact_tokens

JSON_TYPE = {"content-type": "application/json"}


def every_form_of(secret: str) -> list[str]:
    """What must not be found anywhere: the token, its secret body, and those encoded."""
    body = secret[8:-6]
    encoded = "".join(f"%{ord(c):02X}" for c in secret)
    return [secret, body, encoded, quote(secret, safe=""), encoded.replace("%", "%25")]


def disguises(secret: str) -> list[str]:
    """A token as a careless caller may paste it into a text field."""
    return [
        secret,
        f"leaked: {secret} (see ticket)",
        f"key={secret}",
        f"x{secret}y",  # glued to other text
        secret.replace("_", "%5F"),
        "".join(f"%{ord(c):02x}" for c in secret),  # every character encoded
        quote(quote(secret, safe=""), safe="").replace("_", "%255F"),  # encoded twice
    ]


@pytest.fixture
def server_log(monkeypatch) -> io.StringIO:
    """Everything the server logs (structlog lines and the access log), as text."""
    stream = io.StringIO()
    stream.buffer = io.BytesIO()  # type: ignore[misc]
    configure_logging("info", stream=stream)
    monkeypatch.setattr(access_log, "stream", stream)
    monkeypatch.setattr(access_log, "enabled", True)
    yield stream
    configure_logging("info")


def logged(stream: io.StringIO) -> str:
    access_log.flush()
    return stream.getvalue() + stream.buffer.getvalue().decode()  # type: ignore[attr-defined]


async def stored(services) -> str:
    """Every row of every table, audit log included, once queued writes are durable."""
    await services.verifier.flush_usage()
    if services.audit is not None:
        await services.audit.flush()
    rows: list[str] = []
    async with services.engine.connect() as conn:
        for table in metadata.sorted_tables:
            for row in (await conn.execute(select(table))).all():
                rows.append(repr(tuple(row)))
    return "\n".join(rows)


def assert_nowhere(secret: str, *texts: str) -> None:
    for text in texts:
        for form in every_form_of(secret):
            assert form not in text, form


# -- the rule ------------------------------------------------------------------------------
def test_the_rule_sees_a_token_in_every_disguise_and_cuts_it_out():
    secret = generate_token("live")
    for text in disguises(secret):
        assert holds_token(text), text
        assert_nowhere(secret, redact_tokens(text))
        assert "tw_live_[redacted]" in redact_tokens(text)
    for harmless in ("/records/a%20b", "tw_live_short", "tw_prod_" + "a" * 38, "%zz%"):
        assert not holds_token(harmless)
        assert redact_tokens(harmless) == harmless


# -- typed by the caller: refused ---------------------------------------------------------
async def _project_token(api) -> str:
    assert (await api.post("/v1/projects", json={"name": "app"})).status_code == 201
    created = await api.post("/v1/tokens", json={"project": "app", "scopes": ["records:read"]})
    assert created.status_code == 201
    return created.json()["id"]


async def _alert(services) -> str:
    alert = Alert("canary", "high", "a canary was used", services.verifier.clock())
    await services.anomaly.store.insert_alert(alert)
    return alert.id


def _typed_requests(token_id: str, alert_id: str, text: str) -> list[tuple[str, str, dict]]:
    policy = {
        "name": "ci",
        "issuer": "https://issuer.example",
        "audience": "tokenward",
        "claims": {"repository": "org/app"},
        "scopes": ["records:read"],
    }
    return [
        ("POST", f"/v1/tokens/{token_id}/quarantine", {"reason": text}),
        ("POST", f"/v1/tokens/{token_id}/release", {"note": text}),
        ("POST", f"/v1/tokens/{token_id}/revoke", {"reason": text}),
        ("POST", f"/v1/alerts/{alert_id}/ack", {"note": text}),
        ("POST", "/v1/ip-blocks", {"network": "203.0.113.0/24", "reason": text}),
        ("POST", "/v1/projects/app/trust-policies", {**policy, "issuer": "https://i/" + text}),
        ("POST", "/v1/projects/app/trust-policies", {**policy, "audience": text}),
        ("POST", "/v1/projects/app/trust-policies", {**policy, "claims": {"sub": text}}),
        (
            "PUT",
            f"/v1/tokens/{token_id}/rotation",
            {"period": "30d", "webhook_url": "https://hooks.example/r?k=" + text},
        ),
        ("PUT", "/v1/anomaly/settings", {"webhook_url": "https://hooks.example/a/" + text}),
        ("POST", "/v1/tokens", {"project": "app", "scopes": ["a:b"], "name": text}),
        ("POST", "/v1/tokens", {"project": "app", "scopes": ["a:b"], "metadata": {"k": text}}),
        ("POST", "/v1/verify", {"token": generate_token("live"), "scope": text}),
        ("POST", "/v1/verify", {"token": generate_token("live"), "project": text}),
    ]


async def test_a_token_typed_into_any_stored_field_is_refused(api, services, server_log):
    token_id = await _project_token(api)
    alert_id = await _alert(services)
    secret = generate_token("live")
    seen: list[str] = []
    refused = 0
    for text in disguises(secret):
        for method, path, body in _typed_requests(token_id, alert_id, text):
            response = await api.request(method, path, json=body)
            answer = response.json()
            if response.status_code == 422 and len(text) > 64:  # refused for its length
                assert "at most" in answer["message"] or "longer than" in answer["message"]
            else:
                assert response.status_code == 400, (path, body, response.text)
                assert answer["error"] == "token_in_field", (path, answer)
                assert "tokens are never stored" in answer["message"]
                refused += 1
            seen.append(response.text)
    assert refused >= 5 * len(_typed_requests("t", "a", ""))
    assert_nowhere(secret, "\n".join(seen), await stored(services), logged(server_log))
    # Refused before anything changed: the token is neither quarantined nor revoked.
    state = (await api.get(f"/v1/tokens/{token_id}")).json()
    assert state["state"] == "active", state


async def test_the_column_refuses_what_a_service_forgot(services):
    """The last line: a typed column refuses a token whoever writes it, straight SQL too;
    a recorded one (an alert's evidence) keeps it cut out."""
    from sqlalchemy import update
    from sqlalchemy.exc import StatementError

    from tokenward.anomaly.tables import alerts
    from tokenward.api.errors import refusal_in

    secret = generate_token("test")
    alert_id = await _alert(services)
    for values in ({"ack_note": f"n {secret}"}, {"actions": ["x"], "summary": "s"}):
        if "ack_note" not in values:
            values["evidence"] = {"user_agent": f"ua {secret}", secret: 1}
            values["summary"] = f"s {secret}"
        try:
            async with services.engine.begin() as conn:
                await conn.execute(update(alerts).where(alerts.c.id == alert_id).values(values))
        except StatementError as exc:
            refused = refusal_in(exc)
            assert "ack_note" in values
            assert refused is not None and refused.code == "token_in_field"
            assert secret not in str(exc)
        else:
            assert "ack_note" not in values
    dumped = await stored(services)
    assert "ua tw_test_[redacted]" in dumped
    assert_nowhere(secret, dumped)


# -- arrived in a header or a path: cut out ------------------------------------------------
async def test_a_token_in_user_agent_or_request_id_is_cut_out(api, services, server_log):
    secret = generate_token("live")
    verify = {"token": generate_token("live")}
    answers = []
    for agent in disguises(secret):
        for path, body in (("/v1/verify", verify), ("/v1/projects", None)):
            response = await api.request(
                "POST" if body else "GET",
                path,
                json=body,
                headers={"User-Agent": agent, "X-Request-ID": secret},
            )
            assert response.status_code == 200, response.text
            assert response.headers["x-request-id"] != secret
            assert response.headers["x-request-id"].startswith("req_")
            answers.append(repr(response.headers) + response.text)
    dumped = await stored(services)
    assert "tw_live_[redacted]" in dumped  # recorded, with the secret cut out
    assert_nowhere(secret, "\n".join(answers), dumped, logged(server_log))


async def test_a_token_in_an_admin_api_path_is_cut_out_of_the_logs(api, services, server_log):
    secret = generate_token("live")
    for path in (f"/v1/tokens/{s}" for s in disguises(secret)):
        response = await api.get(path)
        assert 400 <= response.status_code < 500
    assert_nowhere(secret, await stored(services), logged(server_log))


async def test_a_dashboard_session_keeps_no_token_from_its_user_agent(services):
    from tests.test_dashboard import PASSWORD, Clock, Person
    from tokenward.app import create_app
    from tokenward.dashboard.accounts import Role

    secret = generate_token("live")
    app = create_app(services=services)
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 50000))
    async with app.router.lifespan_context(app):
        await app.state.dashboard.accounts.create_user("olga", Role.OWNER, password=PASSWORD)
        client = httpx.AsyncClient(
            transport=transport,
            base_url="https://tokenward.test",
            headers={"User-Agent": f"Mozilla/5.0 {secret}"},
        )
        person = Person(client, Clock(services))
        response = await person.sign_in("olga")
        assert response.status_code == 200, response.text
        # A token typed into a dashboard form is refused as in the API.
        alert_id = await _alert(services)
        response = await person.post(f"/dashboard/alerts/{alert_id}/ack", {"note": secret})
        assert response.status_code == 400, response.text
        assert "contains a tokenward token" in response.text
    dumped = await stored(services)
    assert "Mozilla/5.0 tw_live_[redacted]" in dumped
    assert_nowhere(secret, dumped, response.text)


# -- the gateway ---------------------------------------------------------------------------
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
    return web.json_response({"path": request.raw_path})


@contextlib.asynccontextmanager
async def _gateway(services) -> AsyncIterator[httpx.AsyncClient]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", _echo)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    use_policy(services, _POLICY.format(port=runner.addresses[0][1]))
    gateway = Gateway(services.enforcement)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    await gateway.start("127.0.0.1", 0, sock=sock)
    try:
        base = f"http://127.0.0.1:{sock.getsockname()[1]}"
        async with httpx.AsyncClient(base_url=base) as client:
            yield client
    finally:
        await gateway.aclose()
        await runner.cleanup()


async def test_the_gateway_records_no_token_from_a_path_or_a_header(services, admin, server_log):
    issued = await make_token(services, admin)
    secret = generate_token("live")
    events: list = []

    class _Watch:
        async def access(self, event) -> None:
            events.append(event)

        async def admin(self, event) -> None:
            pass

        async def security(self, event) -> None:
            pass

    async with _gateway(services) as gw:
        services.events.subscribe(_Watch())
        for shape in disguises(secret):
            if "%" not in shape and shape != secret:
                continue  # a raw space or parenthesis is no path
            response = await gw.get(
                "/records/" + shape,
                headers={
                    "Authorization": f"Bearer {issued.secret}",
                    "User-Agent": f"cli/1.0 {secret}",
                    "X-Request-ID": secret,
                },
            )
            assert response.status_code == 200, response.text
            assert response.headers["x-request-id"] != secret
    dumped = await stored(services)
    assert dumped.count("tw_live_[redacted]") >= 8  # paths and user agents, recorded cut
    # What the detectors and alert webhooks read is cut too, not only what is stored.
    seen = [f"{e.path} {e.user_agent} {e.request_id}" for e in events]
    assert len(seen) == 4  # the plain secret and three encodings of it
    assert_nowhere(secret, dumped, logged(server_log), *seen)
