"""POST /v1/token: API-key exchange and refresh-token rotation with reuse detection."""

from __future__ import annotations

import asyncio
from datetime import timedelta

from tokenward.oauth.exchange import GRANT_EXCHANGE, TYPE_ACCESS
from tokenward.tokens.model import Reason

EXCHANGE = {"grant_type": GRANT_EXCHANGE, "subject_token_type": TYPE_ACCESS}


async def api_key(api, project="shop", **fields):
    if (await api.get(f"/v1/projects/{project}")).status_code == 404:
        assert (await api.post("/v1/projects", json={"name": project})).status_code == 201
    body = {"project": project, "scopes": ["records:*", "files:read"], "ttl": "30d", **fields}
    response = await api.post("/v1/tokens", json=body)
    assert response.status_code == 201, response.text
    return response.json()


async def exchange(api, subject, **form):
    return await api.post("/v1/token", data={**EXCHANGE, "subject_token": subject, **form})


async def test_api_key_is_exchanged_for_a_short_lived_narrowed_token(api, services):
    key = await api_key(api)
    response = await exchange(api, key["token"], scope="records:read", expires_in="300")
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["token_type"] == "Bearer" and body["scope"] == "records:read"
    assert 295 <= body["expires_in"] <= 300
    assert body["issued_token_type"] == TYPE_ACCESS
    assert body["refresh_token"].startswith("tw_live_")
    v = services.verifier
    assert (await v.verify(body["access_token"], scope="records:read")).allowed
    denied = await v.verify(body["access_token"], scope="records:write")
    assert denied.reason is Reason.INSUFFICIENT_SCOPE
    record = (await v.verify(body["access_token"])).token
    assert record.kind == "access" and record.family_id.startswith("fam_")
    assert record.project == "shop" and record.created_by == key["id"]


async def test_default_lifetime_is_fifteen_minutes(api):
    key = await api_key(api)
    body = (await exchange(api, key["token"])).json()
    assert 890 <= body["expires_in"] <= 900
    assert body["scope"] == "records:* files:read"


BAD_REQUESTS = [
    ({"scope": "admin:write"}, "invalid_scope"),
    ({"scope": "records:read bad scope!"}, "invalid_scope"),
    ({"expires_in": "7200"}, "invalid_request"),
    ({"expires_in": "-5"}, "invalid_request"),
    ({"subject_token_type": "urn:x"}, "invalid_request"),
    ({"grant_type": "password"}, "unsupported_grant_type"),
    ({"requested_token_type": "urn:ietf:params:oauth:token-type:id_token"}, "invalid_request"),
    ({"unknown": "1"}, "invalid_request"),
]


async def test_bad_requests_get_oauth_errors(api):
    key = await api_key(api)
    for form, error in BAD_REQUESTS:
        response = await exchange(api, key["token"], **form)
        assert response.status_code == 400, (form, response.text)
        body = response.json()
        assert body["error"] == error and body["message"] and body["error_description"], form
        assert key["token"] not in response.text


async def test_invalid_subject_tokens_are_refused(api, services):
    key = await api_key(api)
    await api.post(f"/v1/tokens/{key['id']}/revoke", json={"reason": "x"})
    for subject in (key["token"], "tw_live_garbage", "not-a-token"):
        response = await exchange(api, subject)
        assert response.status_code == 400
        assert response.json()["error"] == "invalid_grant"
    assert (await api.post("/v1/token", content=b"{}")).status_code == 400
    bad_json = await api.post(
        "/v1/token", content=b"{", headers={"content-type": "application/json"}
    )
    assert bad_json.status_code == 400 and bad_json.json()["error"] == "invalid_request"


async def test_json_body_is_accepted_too(api):
    key = await api_key(api)
    response = await api.post(
        "/v1/token",
        json={**EXCHANGE, "subject_token": key["token"], "scope": ["files:read"], "expires_in": 60},
    )
    assert response.status_code == 200, response.text
    assert response.json()["scope"] == "files:read"


async def test_access_token_never_outlives_its_subject(api, services):
    key = await api_key(api, ttl="2m")
    body = (await exchange(api, key["token"])).json()
    assert body["expires_in"] <= 120
    assert body["refresh_token_expires_in"] <= 120


async def test_access_token_can_be_narrowed_again_but_gets_no_refresh_token(api, services):
    key = await api_key(api)
    first = (await exchange(api, key["token"])).json()
    second = await exchange(api, first["access_token"], scope="files:read")
    assert second.status_code == 200, second.text
    assert "refresh_token" not in second.json()
    wider = await exchange(api, second.json()["access_token"], scope="records:read")
    assert wider.json()["error"] == "invalid_scope"


async def test_refresh_token_is_not_a_credential(api, services):
    key = await api_key(api)
    body = (await exchange(api, key["token"])).json()
    decision = await services.verifier.verify(body["refresh_token"])
    assert decision.reason is Reason.WRONG_TOKEN_TYPE
    admin_call = await api.get(
        "/v1/projects", headers={"Authorization": f"Bearer {body['refresh_token']}"}
    )
    assert admin_call.status_code == 401


async def refresh(api, token, **form):
    return await api.post(
        "/v1/token", data={"grant_type": "refresh_token", "refresh_token": token, **form}
    )


async def test_refresh_rotates_and_reuse_revokes_the_family(api, services, events):
    key = await api_key(api)
    first = (await exchange(api, key["token"])).json()
    second = await refresh(api, first["refresh_token"], scope="files:read")
    assert second.status_code == 200, second.text
    second = second.json()
    assert second["refresh_token"] != first["refresh_token"]
    assert second["scope"] == "files:read"
    # The new refresh token keeps the grant's scopes: a later refresh may ask for them again.
    third = (await refresh(api, second["refresh_token"], scope="records:read")).json()
    assert third["scope"] == "records:read"

    # Past the concurrency grace, presenting the first refresh token again is reuse.
    now = services.verifier.clock()
    services.verifier.clock = lambda: now + timedelta(seconds=30)
    reused = await refresh(api, first["refresh_token"])
    assert reused.status_code == 400 and reused.json()["error"] == "invalid_grant"
    assert "family is revoked" in reused.json()["message"]
    for token in (first["access_token"], second["access_token"], third["access_token"]):
        assert (await services.verifier.verify(token)).reason is Reason.REVOKED
    again = await refresh(api, third["refresh_token"])
    assert again.json()["error"] == "invalid_grant"
    # The API key itself is untouched: it can start a new family.
    assert (await services.verifier.verify(key["token"])).allowed
    alerts = [e for e in events.security_events if e.kind == "refresh_token_reuse"]
    assert len(alerts) == 1 and alerts[0].severity == "critical"
    family = (await services.store.get_token(third["token_id"])).family_id
    assert alerts[0].evidence["family_id"] == family
    assert len(alerts[0].evidence["revoked_token_ids"]) == 6


async def test_racing_refreshes_within_grace_get_one_successor(api, services, events):
    """Five presenters of one refresh token at once: one new pair, four refusals; the family
    lives on (a race, not a theft) and no alarm is raised."""
    key = await api_key(api)
    first = (await exchange(api, key["token"])).json()
    before = await _family_size(services, first["token_id"])
    results = await asyncio.gather(*[refresh(api, first["refresh_token"]) for _ in range(5)])
    codes = sorted(r.status_code for r in results)
    assert codes == [200, 400, 400, 400, 400], [r.text for r in results]
    [winner] = [r.json() for r in results if r.status_code == 200]
    for refused in (r.json() for r in results if r.status_code == 400):
        assert refused["error"] == "invalid_grant" and "a moment ago" in refused["message"]
    assert await _family_size(services, first["token_id"]) == before + 2  # one pair
    assert not [e for e in events.security_events if e.kind == "refresh_token_reuse"]
    refusals = [e for e in events.access_events if e.decision.reason.value == "already_refreshed"]
    assert len(refusals) == 4  # audited as a race, not as a rotated (leaked) token
    # The family is untouched: the earlier access token and the one successor still work.
    assert (await services.verifier.verify(first["access_token"])).allowed
    assert (await services.verifier.verify(winner["access_token"])).allowed
    assert (await refresh(api, winner["refresh_token"])).status_code == 200


async def test_refresh_reuse_within_grace_mints_nothing(api, services, events):
    key = await api_key(api)
    first = (await exchange(api, key["token"])).json()
    assert (await refresh(api, first["refresh_token"])).status_code == 200
    size = await _family_size(services, first["token_id"])
    for _ in range(4):  # within the 10 s grace, one after the other
        again = await refresh(api, first["refresh_token"])
        assert again.status_code == 400 and again.json()["error"] == "invalid_grant"
    assert await _family_size(services, first["token_id"]) == size
    assert not [e for e in events.security_events if e.kind == "refresh_token_reuse"]
    # After the grace it is reuse: the family is revoked.
    now = services.verifier.clock()
    services.verifier.clock = lambda: now + timedelta(seconds=30)
    late = await refresh(api, first["refresh_token"])
    assert "family is revoked" in late.json()["message"]
    assert len([e for e in events.security_events if e.kind == "refresh_token_reuse"]) == 1


async def _family_size(services, token_id):
    """How many tokens the family of ``token_id`` has."""
    from sqlalchemy import func, select

    from tokenward.store.tables import tokens

    family = (await services.store.get_token(token_id)).family_id
    async with services.engine.connect() as conn:
        query = select(func.count()).select_from(tokens).where(tokens.c.family_id == family)
        return (await conn.execute(query)).scalar()


async def test_refresh_errors(api, services):
    assert (await refresh(api, "tw_live_nope")).json()["error"] == "invalid_grant"
    key = await api_key(api)
    body = (await exchange(api, key["token"])).json()
    # An access token is not a refresh token.
    assert (await refresh(api, body["access_token"])).json()["error"] == "invalid_grant"
    wider = await refresh(api, body["refresh_token"], scope="admin:*")
    assert wider.json()["error"] == "invalid_scope"
    missing = await api.post("/v1/token", data={"grant_type": "refresh_token"})
    assert missing.json()["error"] == "invalid_request"


async def test_expired_refresh_token_is_refused(api, services):
    key = await api_key(api)
    body = (await exchange(api, key["token"])).json()
    now = services.verifier.clock()
    services.verifier.clock = lambda: now + timedelta(days=2)
    response = await refresh(api, body["refresh_token"])
    assert response.json()["error"] == "invalid_grant"
    assert "expired" in response.json()["message"]


async def test_project_policy_caps_lifetimes(api, services):
    await api_key(api)
    policy = await api.put(
        "/v1/projects/shop/policy",
        json={"max_token_lifetime": "7d", "access_token_ttl": "5m", "expiry_warning_days": 2},
    )
    assert policy.status_code == 200, policy.text
    assert policy.json()["max_token_lifetime"] == 7 * 86400
    too_long = await api.post(
        "/v1/tokens", json={"project": "shop", "scopes": ["records:read"], "ttl": "30d"}
    )
    assert too_long.status_code == 422 and too_long.json()["error"] == "lifetime_exceeds_policy"
    forever = await api.post("/v1/tokens", json={"project": "shop", "scopes": ["records:read"]})
    assert forever.status_code == 201 and forever.json()["expires_at"] is not None
    body = (await exchange(api, forever.json()["token"])).json()
    assert body["expires_in"] <= 300
    asked = await exchange(api, forever.json()["token"], expires_in="600")
    assert asked.json()["error"] == "invalid_request"
    assert (await api.get("/v1/projects/nope/policy")).status_code == 404


async def test_exchange_emits_one_access_event(api, services, events):
    key = await api_key(api)
    before = len(events.access_events)
    await exchange(api, key["token"])
    sources = [e.source for e in events.access_events[before:]]
    assert sources.count("token_endpoint") == 1


async def test_refresh_token_keeps_the_ip_allowlist(api, services):
    key = await api_key(api, ip_allowlist=["127.0.0.0/8"])
    body = (await exchange(api, key["token"])).json()
    record = await services.store.get_token(body["token_id"])
    assert record.ip_allowlist == ["127.0.0.0/8"]
    assert (await services.verifier.verify(body["access_token"], ip="10.0.0.1")).reason is (
        Reason.IP_NOT_ALLOWED
    )
    ok = await refresh(api, body["refresh_token"])
    assert ok.status_code == 200
    from_elsewhere = await api.post(
        "/v1/token",
        data={"grant_type": "refresh_token", "refresh_token": ok.json()["refresh_token"]},
        headers={"X-Forwarded-For": "10.0.0.1"},
    )
    assert from_elsewhere.status_code == 200  # forwarded headers are not trusted
    services.sessions.exchange.tokens.verifier.clear()
    import httpx

    from tokenward.app import create_app

    transport = httpx.ASGITransport(app=create_app(services=services), client=("10.0.0.1", 1))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as other:
        denied = await other.post(
            "/v1/token",
            data={
                "grant_type": "refresh_token",
                "refresh_token": from_elsewhere.json()["refresh_token"],
            },
        )
    assert denied.status_code == 400 and "address" in denied.json()["message"]


async def test_odd_input_never_gets_a_500(api):
    key = await api_key(api)
    odd = [
        {"content": b"", "headers": {"content-type": "application/x-www-form-urlencoded"}},
        {
            "content": b"grant_type=refresh_token&grant_type=x",
            "headers": {"content-type": "application/x-www-form-urlencoded"},
        },
        {"content": b"\xff\xfe", "headers": {"content-type": "application/json"}},
        {"content": b"[1,2]", "headers": {"content-type": "application/json"}},
        {"json": {"grant_type": GRANT_EXCHANGE, "subject_token": 5}},
        {
            "json": {
                "grant_type": GRANT_EXCHANGE,
                "subject_token_type": TYPE_ACCESS,
                "subject_token": key["token"],
                "expires_in": True,
            }
        },
        {"data": {**EXCHANGE, "subject_token": key["token"], "expires_in": "9" * 15}},
        {"data": {**EXCHANGE, "subject_token": key["token"], "expires_in": "0"}},
        {"data": {**EXCHANGE, "subject_token": "x" * 20000}},
        {"data": {**EXCHANGE, "subject_token": key["token"], "scope": "a:b " * 1000}},
        {"data": {**EXCHANGE, "subject_token": key["token"]}, "headers": {"DPoP": "x.y.z"}},
        {
            "data": {
                **EXCHANGE,
                "subject_token_type": "urn:ietf:params:oauth:token-type:id_token",
                "subject_token": key["token"],
            }
        },
        {
            "data": {
                **EXCHANGE,
                "subject_token_type": "urn:ietf:params:oauth:token-type:jwt",
                "subject_token": "e30.e30.e30",
            }
        },
        {"files": {"f": ("a.txt", b"x")}, "data": {"grant_type": "refresh_token"}},
    ]
    for kwargs in odd:
        response = await api.post("/v1/token", **kwargs)
        assert 400 <= response.status_code < 500, (kwargs, response.text)
        body = response.json()
        assert body["error"] and body["message"], body
        assert key["token"] not in response.text
    for path, body in [
        ("/v1/projects/shop/policy", {"max_token_lifetime": "forever"}),
        ("/v1/projects/shop/policy", {"expiry_warning_days": -1}),
        ("/v1/projects/shop/policy", {"unknown": 1}),
    ]:
        response = await api.put(path, json=body)
        assert response.status_code == 422, response.text
    response = await api.put(f"/v1/tokens/{key['id']}/rotation", json={"period": "x"})
    assert response.status_code == 422
