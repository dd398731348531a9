"""Values a database cannot store (NUL, control characters) are refused where they enter.

SQLite stores a NUL byte, PostgreSQL refuses it: every case here must be a clean 4xx on
both, never a 500 on one of them.
"""

from __future__ import annotations

import base64
import json

import pytest

from tokenward.anomaly.store import Alert

from .test_bad_input import assert_clean_error

EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
ID_TOKEN = "urn:ietf:params:oauth:token-type:id_token"


def _b64(value: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()


def unsigned_jwt(claims: dict) -> str:
    return f"{_b64({'alg': 'RS256', 'typ': 'JWT'})}.{_b64(claims)}.c2ln"


@pytest.fixture
async def shop(api, services):
    assert (await api.post("/v1/projects", json={"name": "shop"})).status_code == 201
    created = await api.post("/v1/tokens", json={"project": "shop", "scopes": ["records:read"]})
    assert created.status_code == 201
    alert = Alert("brute_force", "warning", "test", services.verifier.clock())
    await services.anomaly.store.insert_alert(alert)
    return {"token": created.json()["id"], "alert": alert.id}


async def test_token_endpoint_refuses_control_characters(api):
    api.headers.pop("Authorization")
    jwt = unsigned_jwt({"iss": "https://x\u0000.example", "exp": 9999999999})
    form = {"grant_type": EXCHANGE, "subject_token_type": ID_TOKEN, "subject_token": jwt}
    body = assert_clean_error(await api.post("/v1/token", data=form), 400)
    assert body["error"] == "invalid_grant"
    body = assert_clean_error(await api.post("/v1/token", data={**form, "audience": "\x00"}), 400)
    assert body["error"] == "invalid_request"
    huge = unsigned_jwt({"iss": "https://ci.example", "exp": 10**20})
    response = await api.post("/v1/token", data={**form, "subject_token": huge})
    assert_clean_error(response, 400)


@pytest.mark.parametrize(
    "name", ["principal", "reason", "ip", "action", "fingerprint", "request_id", "token", "project"]
)
async def test_audit_filters_refuse_nul(api, shop, name):
    assert_clean_error(await api.get("/v1/audit", params={name: "\x00"}), 422)
    assert_clean_error(await api.get("/v1/audit/export", params={name: "\x00"}), 422)


async def test_query_and_path_parameters_refuse_nul(api, shop):
    for path, params in [
        ("/v1/alerts", {"detector": "\x00"}),
        ("/v1/alerts", {"token": "\x00"}),
        ("/v1/alerts", {"project": "\x00"}),
        ("/v1/trust-policies", {"project": "\x00"}),
        ("/v1/anomaly/settings", {"project": "\x00"}),
        ("/v1/alerts/alt_%00", {}),
        ("/v1/projects/shop%00/policy", {}),
        ("/v1/tokens/tok_%00/rotation", {}),
        ("/v1/tokens", {"x\x00": "1"}),
    ]:
        assert_clean_error(await api.get(path, params=params), 404, 422)
    response = await api.put("/v1/anomaly/settings", params={"project": "\x00"}, json={})
    assert_clean_error(response, 422)
    response = await api.patch("/v1/projects/shop%00", json={"ip_allowlist": []})
    assert_clean_error(response, 404, 422)


async def test_bodies_refuse_nul(api, shop):
    for path, body in [
        (f"/v1/tokens/{shop['token']}/quarantine", {"reason": "a\u0000b"}),
        (f"/v1/tokens/{shop['token']}/release", {"note": "a\u0000b"}),
        ("/v1/ip-blocks", {"network": "10.9.0.0/16", "reason": "a\u0000b"}),
        (f"/v1/alerts/{shop['alert']}/ack", {"note": "a\u0000b"}),
        (f"/v1/alerts/{shop['alert']}/ack", {"note": "a\u0007b"}),
    ]:
        assert_clean_error(await api.post(path, json=body), 422)
    alert = (await api.get(f"/v1/alerts/{shop['alert']}")).json()
    assert alert["acknowledged_at"] is None  # the note was refused, not stored
    policy = {
        "name": "ci",
        "issuer": "https://ci.example",
        "audience": "a\u0000",
        "claims": {"repo": "org/app"},
        "scopes": ["records:read"],
    }
    for changed in (
        {},
        {"audience": "tokenward", "issuer": "https://ci\u0000.example"},
        {"audience": "tokenward", "claims": {"repo": "org\u0000"}},
    ):
        response = await api.post("/v1/projects/shop/trust-policies", json={**policy, **changed})
        assert_clean_error(response, 422)
