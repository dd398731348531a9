"""Leak response on the server, on SQLite and PostgreSQL: lookup by secret, a leak reported
by an admin, and ``POST /v1/leaks`` signed as GitHub's partner program signs (ECDSA P-256
keys made here, public keys served by a real HTTP server on a port of its own)."""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import threading
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.conftest import EventRecorder
from tokenward.app import Services
from tokenward.leaks.partner import KEY_ID_HEADER, SIGNATURE_HEADER, PartnerKeys
from tokenward.settings import Settings
from tokenward.tokens.format import checksum, generate_token


# -- the partner: keys and a keys server --------------------------------------------------
class PartnerKey:
    def __init__(self, key_id: str) -> None:
        self.id = key_id
        self.private = ec.generate_private_key(ec.SECP256R1())

    def pem(self) -> str:
        return (
            self.private.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode()
        )

    def sign(self, body: bytes) -> dict[str, str]:
        signature = self.private.sign(body, ec.ECDSA(hashes.SHA256()))
        return {KEY_ID_HEADER: self.id, SIGNATURE_HEADER: base64.b64encode(signature).decode()}


class KeysServer:
    """Serves ``{"public_keys": [...]}`` of the keys in ``keys`` on 127.0.0.1, port 0."""

    def __init__(self) -> None:
        self.keys: list[PartnerKey] = []
        self.requests = 0
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the http.server name
                owner.requests += 1
                document = {
                    "public_keys": [
                        {"key_identifier": k.id, "key": k.pem(), "is_current": i == 0}
                        for i, k in enumerate(owner.keys)
                    ]
                }
                body = json.dumps(document).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/meta/public_keys"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def keys_server() -> Iterator[KeysServer]:
    server = KeysServer()
    server.keys.append(PartnerKey("a" * 64))
    yield server
    server.close()


@pytest.fixture
def settings(database_url: str, tmp_path: Path, keys_server: KeysServer) -> Settings:
    return Settings(
        data_dir=tmp_path,
        database_url=database_url,
        secret_key=secrets.token_hex(32),
        leak_report_keys_url=keys_server.url,
        leak_report_max_tokens=5,
    )


@pytest.fixture
async def partner(api: httpx.AsyncClient) -> AsyncIterator[httpx.AsyncClient]:
    """A client on the same app without any credential (a partner has none)."""
    async with httpx.AsyncClient(transport=api._transport, base_url=str(api.base_url)) as c:
        yield c


async def _project_token(api: httpx.AsyncClient, project: str = "shop", **extra: Any) -> dict:
    if (await api.get(f"/v1/projects/{project}")).status_code == 404:
        assert (await api.post("/v1/projects", json={"name": project})).status_code == 201
    body = {"project": project, "scopes": ["records:read"], "name": "app", **extra}
    created = await api.post("/v1/tokens", json=body)
    assert created.status_code == 201, created.text
    return created.json()


def _report(*tokens: str, url: str = "https://github.com/o/r/blob/abc/config.py") -> bytes:
    items = [
        {"token": t, "type": "tokenward_api_token", "url": url, "source": "content"} for t in tokens
    ]
    return json.dumps(items).encode()


def _bad_checksum(token: str) -> str:
    head = token[:-6]
    wrong = "000000" if checksum(head) != "000000" else "000001"
    return head + wrong


# -- lookup ---------------------------------------------------------------------------------
async def test_lookup_tells_id_project_state_never_the_secret(
    api: httpx.AsyncClient, events: EventRecorder
):
    token = await _project_token(api)
    unknown = generate_token("live")
    answer = await api.post(
        "/v1/tokens/lookup", json={"tokens": [token["token"], unknown, _bad_checksum(unknown)]}
    )
    assert answer.status_code == 200
    found, missing, garbage = answer.json()["tokens"]
    assert found["found"] and found["id"] == token["id"] and found["project"] == "shop"
    assert found["state"] == "active" and found["kind"] == "api_key"
    assert missing == {
        "found": False,
        "hint": missing["hint"],
        "id": None,
        "project": None,
        "name": None,
        "kind": None,
        "state": None,
        "quarantined": None,
    }
    assert garbage["hint"] is None
    assert token["token"] not in answer.text and unknown not in answer.text
    (looked,) = [e for e in events.admin_events if e.action == "token.lookup"]
    assert looked.detail == {"tokens": 3, "found": [token["id"]]}


async def test_lookup_is_bounded_and_stays_in_the_callers_project(api: httpx.AsyncClient):
    other = await _project_token(api, "other")
    shop_admin = await _project_token(api, "shop", scopes=["tokens:*", "admin:*"])
    as_shop = {"Authorization": f"Bearer {shop_admin['token']}"}
    answer = await api.post("/v1/tokens/lookup", json={"tokens": [other["token"]]}, headers=as_shop)
    assert answer.status_code == 200 and answer.json()["tokens"][0]["found"] is False
    elsewhere = await api.post(f"/v1/tokens/{other['id']}/leaked", json={}, headers=as_shop)
    assert elsewhere.status_code == 404  # another project's token: as if it did not exist
    assert (await api.get(f"/v1/tokens/{other['id']}")).json()["state"] == "active"
    too_many = await api.post("/v1/tokens/lookup", json={"tokens": ["x"] * 101})
    assert too_many.status_code == 422


# -- an admin's report (scan --revoke) ------------------------------------------------------
async def test_a_reported_leak_revokes_by_default_alerts_and_emits_token_leaked(
    api: httpx.AsyncClient, services: Services, events: EventRecorder
):
    token = await _project_token(api)
    answer = await api.post(
        f"/v1/tokens/{token['id']}/leaked", json={"location": "src/settings.py:12"}
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["action"] == "revoked" and body["state"] == "revoked"
    verified = await api.post("/v1/verify", json={"token": token["token"]})
    assert verified.json()["valid"] is False
    leaked = [e for e in events.admin_events if e.action == "token.leaked"]
    assert len(leaked) == 1 and leaked[0].token_id == token["id"]
    assert leaked[0].detail["location"] == "src/settings.py:12"
    alerts = (await api.get("/v1/alerts", params={"detector": "token_leaked"})).json()["alerts"]
    assert len(alerts) == 1 and alerts[0]["severity"] == "critical"
    assert alerts[0]["id"] == body["alert_id"] and "src/settings.py:12" in alerts[0]["summary"]


async def test_leak_action_quarantine_is_the_projects_policy(api: httpx.AsyncClient):
    token = await _project_token(api)
    policy = await api.put("/v1/projects/shop/policy", json={"leak_action": "quarantine"})
    assert policy.status_code == 200 and policy.json()["leak_action"] == "quarantine"
    assert (await api.get("/v1/projects/shop/policy")).json()["leak_action"] == "quarantine"
    assert (await api.put("/v1/projects/shop/policy", json={"leak_action": "x"})).status_code == 422
    body = (await api.post(f"/v1/tokens/{token['id']}/leaked", json={})).json()
    assert body["action"] == "quarantined" and body["quarantined_at"] is not None
    assert body["state"] == "active" and body["revoked_at"] is None
    again = (await api.post(f"/v1/tokens/{token['id']}/leaked", json={})).json()
    assert again["action"] == "none"  # already quarantined


async def test_a_canary_or_a_dead_token_is_left_as_it_is(api: httpx.AsyncClient):
    canary = await _project_token(api, kind="canary")
    body = (await api.post(f"/v1/tokens/{canary['id']}/leaked", json={})).json()
    assert body["action"] == "none" and body["revoked_at"] is None
    dead = await _project_token(api)
    await api.post(f"/v1/tokens/{dead['id']}/revoke", json={"reason": "old"})
    body = (await api.post(f"/v1/tokens/{dead['id']}/leaked", json={})).json()
    assert body["action"] == "none" and body["revoked_reason"] == "old"
    alerts = (await api.get("/v1/alerts", params={"detector": "token_leaked"})).json()["alerts"]
    severities = {a["token_id"]: a["severity"] for a in alerts}
    assert severities == {canary["id"]: "critical", dead["id"]: "warning"}


# -- POST /v1/leaks -------------------------------------------------------------------------
async def test_a_signed_partner_report_revokes_and_labels_each_token(
    api: httpx.AsyncClient,
    partner: httpx.AsyncClient,
    keys_server: KeysServer,
    events: EventRecorder,
):
    token = await _project_token(api)
    unknown = generate_token("live")
    look_alike = _bad_checksum(token["token"])
    body = _report(token["token"], unknown, look_alike)
    answer = await partner.post("/v1/leaks", content=body, headers=keys_server.keys[0].sign(body))
    assert answer.status_code == 200, answer.text
    verdicts = answer.json()
    assert [v["label"] for v in verdicts] == ["true_positive", "false_positive", "false_positive"]
    assert verdicts[0]["token_hash"] == hashlib.sha256(token["token"].encode()).hexdigest()
    assert verdicts[0]["token_type"] == "tokenward_api_token"
    for secret in (token["token"], unknown, look_alike):
        assert secret not in answer.text
    state = (await api.get(f"/v1/tokens/{token['id']}")).json()
    assert state["state"] == "revoked" and "github.com/o/r" in state["revoked_reason"]
    alerts = (await api.get("/v1/alerts", params={"detector": "token_leaked"})).json()["alerts"]
    assert len(alerts) == 1 and alerts[0]["severity"] == "critical"
    assert alerts[0]["evidence"]["location"] == "https://github.com/o/r/blob/abc/config.py"
    leaked = [e for e in events.admin_events if e.action == "token.leaked"]
    assert [e.actor_id for e in leaked] == ["system:leaks"]
    assert keys_server.requests == 1


async def test_a_bad_or_missing_signature_changes_nothing_and_is_audited(
    api: httpx.AsyncClient,
    partner: httpx.AsyncClient,
    keys_server: KeysServer,
    events: EventRecorder,
):
    token = await _project_token(api)
    body = _report(token["token"])
    forger = PartnerKey(keys_server.keys[0].id)  # the right id, another key
    cases = [
        ({}, "missing_signature"),
        (forger.sign(body), "bad_signature"),
        (keys_server.keys[0].sign(body + b" "), "bad_signature"),  # not this body
        ({**keys_server.keys[0].sign(body), SIGNATURE_HEADER: "%%%"}, "bad_signature"),
        (PartnerKey("b" * 64).sign(body), "unknown_key"),
    ]
    for headers, code in cases:
        answer = await partner.post("/v1/leaks", content=body, headers=headers)
        assert answer.status_code == 401, (code, answer.text)
        assert answer.json()["error"] == code
        assert token["token"] not in answer.text
    assert (await api.get(f"/v1/tokens/{token['id']}")).json()["state"] == "active"
    rejected = [e for e in events.security_events if e.kind == "leak_report_rejected"]
    assert [e.evidence["reason"] for e in rejected] == [code for _, code in cases]
    audit = await api.get("/v1/audit", params={"kind": "security", "limit": 50})
    actions = [e["action"] for e in audit.json()["events"]]
    assert actions.count("security.leak_report_rejected") == len(cases)
    assert not [e for e in events.admin_events if e.action == "token.leaked"]


async def test_a_new_partner_key_is_fetched_once_then_cached(
    api: httpx.AsyncClient, partner: httpx.AsyncClient, keys_server: KeysServer
):
    first = await _project_token(api)
    body = _report(first["token"])
    assert (
        await partner.post("/v1/leaks", content=body, headers=keys_server.keys[0].sign(body))
    ).status_code == 200
    assert keys_server.requests == 1
    rotated = PartnerKey("c" * 64)
    keys_server.keys.insert(0, rotated)  # the partner rotates its key
    second = await _project_token(api)
    body = _report(second["token"])
    answer = await partner.post("/v1/leaks", content=body, headers=rotated.sign(body))
    assert answer.status_code == 200 and answer.json()[0]["label"] == "true_positive"
    assert keys_server.requests == 2  # fetched again once, for the unknown id
    again = await partner.post("/v1/leaks", content=body, headers=rotated.sign(body))
    assert again.status_code == 200 and keys_server.requests == 2


async def test_reports_are_bounded_and_checked(
    partner: httpx.AsyncClient, keys_server: KeysServer, services: Services
):
    key = keys_server.keys[0]
    too_many = _report(*[generate_token("live") for _ in range(6)])  # the limit is 5 here
    cases = [
        (too_many, 422, "too_many_tokens"),
        (b"[]", 422, "invalid_leak_report"),
        (b'{"token": "x"}', 422, "invalid_leak_report"),
        (b'[{"token": 5, "type": "t", "url": "u"}]', 422, "invalid_leak_report"),
        (b"not json", 400, "invalid_json"),
        (b"[" + b" " * services.settings.leak_report_max_bytes + b"]", 413, "payload_too_large"),
    ]
    for body, status, code in cases:
        answer = await partner.post("/v1/leaks", content=body, headers=key.sign(body))
        assert (answer.status_code, answer.json()["error"]) == (status, code), body[:40]


async def test_inline_keys_pem_and_document():
    key, other = PartnerKey("k1"), PartnerKey("k2")
    pem_keys = PartnerKeys(inline=key.pem() + "\n" + other.pem())
    assert len(await pem_keys.keys_for("any id")) == 2  # PEM names no ids: any may sign
    document = json.dumps({"public_keys": [{"key_identifier": "k1", "key": key.pem()}]})
    doc_keys = PartnerKeys(inline=document)
    assert len(await doc_keys.keys_for("k1")) == 1 and await doc_keys.keys_for("k2") == []
    with pytest.raises(ValueError, match="P-256"):
        rsa_like = ec.generate_private_key(ec.SECP384R1()).public_key()
        PartnerKeys(
            inline=rsa_like.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ).decode()
        )
    with pytest.raises(ValueError):
        Settings(leak_report_keys="not a key")
    with pytest.raises(ValueError):
        Settings(leak_report_keys_url="http://example.com/keys")  # plain http off loopback


async def test_no_keys_configured_refuses_every_report(tmp_path: Path, database_url: str):
    from tokenward.app import create_asgi, open_services

    services = await open_services(
        Settings(data_dir=tmp_path, database_url=database_url, secret_key=secrets.token_hex(32))
    )
    try:
        app = create_asgi(services=services)
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 50000))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            body = _report(generate_token("live"))
            answer = await client.post(
                "/v1/leaks", content=body, headers=PartnerKey("x").sign(body)
            )
        assert answer.status_code == 401
        assert answer.json()["error"] == "leak_reports_not_configured"
    finally:
        await services.close()


# -- canaries -------------------------------------------------------------------------------
async def test_a_project_admin_makes_canaries_with_any_decoy_scope(api: httpx.AsyncClient):
    shop_admin = await _project_token(api, "shop", scopes=["admin:*", "records:read"])
    as_shop = {"Authorization": f"Bearer {shop_admin['token']}"}
    body = {"project": "shop", "scopes": ["billing:*"], "kind": "canary", "name": "decoy"}
    canary = await api.post("/v1/tokens", json=body, headers=as_shop)
    assert canary.status_code == 201, canary.text
    assert canary.json()["kind"] == "canary"
    plain = await api.post("/v1/tokens", json={**body, "kind": "api_key"}, headers=as_shop)
    assert plain.status_code == 403  # a real token still needs scopes its creator holds
    verified = await api.post("/v1/verify", json={"token": canary.json()["token"]})
    assert verified.json()["valid"] is False and verified.json()["reason"] == "unknown"


async def test_the_dashboard_form_makes_a_canary(services: Services, monkeypatch):
    from argon2 import PasswordHasher

    from tests import test_dashboard as d
    from tokenward.app import create_app
    from tokenward.dashboard import security
    from tokenward.dashboard.accounts import actor_for

    quick = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)  # as test_dashboard
    monkeypatch.setattr(security, "_passwords", quick)
    monkeypatch.setattr(security, "_DUMMY_HASH", quick.hash("not a password"))
    app = create_app(services=services)
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 50000))
    async with httpx.AsyncClient(transport=transport, base_url="https://tokenward.test") as c:
        dash = (c, app.state.dashboard)
        clock = d.Clock(services)
        p = await d.owner(dash, clock, dash[1].accounts)
        await p.post("/dashboard/projects", {"name": "shop"})
        page = await p.get("/dashboard/p/shop/tokens/new")
        assert 'name="kind" value="canary"' in page.text
        made = await p.post("/dashboard/p/shop/tokens", {"kind": "canary", "name": "bait"})
        assert made.status_code == 201, made.text
        bad = await p.post("/dashboard/p/shop/tokens", {"kind": "refresh", "scopes": "a:b"})
        assert bad.status_code == 422
        olga = actor_for(await dash[1].accounts.get_user("olga"), None)
        (token,) = await services.tokens.list_tokens(olga, project="shop")
        assert token.kind == "canary" and token.scopes == ["canary:none"]
