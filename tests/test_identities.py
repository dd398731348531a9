"""Identities: owners of tokens, through the API, on SQLite and PostgreSQL; the identity's
rate limit holds across all its tokens, in memory and across two replicas sharing Redis."""

from __future__ import annotations

import asyncio
import secrets

from sqlalchemy import select

from tests.conftest import REDIS_URL, two_replicas
from tests.test_oauth_exchange import api_key, exchange
from tokenward.app import Services
from tokenward.identities.service import IdentityChanges
from tokenward.service import Issued, TokenSpec, issue_bootstrap_record
from tokenward.store.tables import tokens
from tokenward.tokens.model import Reason


async def identity(api, external_id: str = "user_123", **body) -> dict:
    response = await api.post(
        "/v1/projects/shop/identities", json={"external_id": external_id, **body}
    )
    assert response.status_code == 201, response.text
    return response.json()


async def token(api, **body) -> dict:
    response = await api.post(
        "/v1/tokens", json={"project": "shop", "scopes": ["records:read"], **body}
    )
    assert response.status_code == 201, response.text
    return response.json()


async def verify(api, secret: str, **body) -> dict:
    response = await api.post("/v1/verify", json={"token": secret, **body})
    assert response.status_code == 200, response.text
    return response.json()


async def test_create_show_list_and_update_an_identity(api):
    assert (await api.post("/v1/projects", json={"name": "shop"})).status_code == 201
    created = await identity(api, metadata={"plan": "pro"}, rate_limit="100/minute")
    assert created["external_id"] == "user_123" and created["id"].startswith("idn_")
    assert created["metadata"] == {"plan": "pro"} and created["rate_limit"] == "100/minute"
    again = await api.post("/v1/projects/shop/identities", json={"external_id": "user_123"})
    assert again.status_code == 409 and again.json()["error"] == "identity_exists"
    await identity(api, "user_200")
    await token(api, identity="user_123")
    shown = (await api.get("/v1/projects/shop/identities/user_123")).json()
    assert shown["tokens"] == 1 and shown["project"] == "shop"
    page = (await api.get("/v1/projects/shop/identities", params={"limit": 1})).json()
    assert [i["external_id"] for i in page["identities"]] == ["user_123"]
    assert page["next"] == "user_123"
    rest = (await api.get("/v1/projects/shop/identities", params={"after": "user_123"})).json()
    assert [i["external_id"] for i in rest["identities"]] == ["user_200"] and rest["next"] is None
    changed = await api.patch(
        "/v1/projects/shop/identities/user_123", json={"metadata": {"plan": "team"}}
    )
    assert changed.status_code == 200 and changed.json()["metadata"] == {"plan": "team"}
    assert changed.json()["rate_limit"] == "100/minute"  # left as it was
    cleared = await api.patch("/v1/projects/shop/identities/user_123", json={"rate_limit": ""})
    assert cleared.json()["rate_limit"] is None
    missing = await api.get("/v1/projects/shop/identities/nobody")
    assert missing.status_code == 404 and missing.json()["error"] == "identity_not_found"


async def test_verify_answers_carry_the_identity(api):
    await api.post("/v1/projects", json={"name": "shop"})
    await identity(api, metadata={"plan": "pro"})
    issued = await token(api, identity="user_123")
    assert issued["identity"]["external_id"] == "user_123"
    body = await verify(api, issued["token"])
    assert body["valid"] is True
    assert body["identity"] == {
        "id": issued["identity"]["id"],
        "external_id": "user_123",
        "metadata": {"plan": "pro"},
    }
    # A change to the identity is seen at once (the cached token is dropped).
    await api.patch("/v1/projects/shop/identities/user_123", json={"metadata": {"plan": "x"}})
    assert (await verify(api, issued["token"]))["identity"]["metadata"] == {"plan": "x"}
    plain = await token(api)
    assert (await verify(api, plain["token"]))["identity"] is None


async def test_a_canary_reveals_no_identity(api):
    await api.post("/v1/projects", json={"name": "shop"})
    await identity(api)
    canary = await token(api, identity="user_123", kind="canary")
    body = await verify(api, canary["token"])
    assert body["reason"] == "unknown" and body["identity"] is None


async def test_tokens_are_listed_by_identity(api):
    await api.post("/v1/projects", json={"name": "shop"})
    await identity(api)
    await identity(api, "user_200")
    mine = {(await token(api, identity="user_123"))["id"] for _ in range(3)}
    await token(api, identity="user_200")
    await token(api)
    listed = await api.get("/v1/tokens", params={"project": "shop", "identity": "user_123"})
    assert listed.status_code == 200
    assert {t["id"] for t in listed.json()["tokens"]} == mine
    without_project = await api.get("/v1/tokens", params={"identity": "user_123"})
    assert {t["id"] for t in without_project.json()["tokens"]} == mine
    unknown = await api.get("/v1/tokens", params={"project": "shop", "identity": "nobody"})
    assert unknown.status_code == 200 and unknown.json()["tokens"] == []


async def test_an_unknown_identity_is_refused_at_creation(api):
    await api.post("/v1/projects", json={"name": "shop"})
    await api.post("/v1/projects", json={"name": "other"})
    await identity(api)
    response = await api.post(
        "/v1/tokens", json={"project": "other", "scopes": ["x:y"], "identity": "user_123"}
    )
    assert response.status_code == 404 and response.json()["error"] == "identity_not_found"


async def test_deleting_an_identity_needs_confirmation_and_revokes_its_tokens(api, services):
    await api.post("/v1/projects", json={"name": "shop"})
    await identity(api)
    issued = [await token(api, identity="user_123") for _ in range(3)]
    other = await token(api)
    for t in issued:  # cached, as on a busy replica
        assert (await verify(api, t["token"]))["valid"]
    refused = await api.delete("/v1/projects/shop/identities/user_123")
    assert refused.status_code == 422
    assert (await verify(api, issued[0]["token"]))["valid"]
    deleted = await api.delete("/v1/projects/shop/identities/user_123", params={"confirm": "true"})
    assert deleted.status_code == 200, deleted.text
    assert sorted(deleted.json()["revoked"]) == sorted(t["id"] for t in issued)
    for t in issued:
        assert (await verify(api, t["token"]))["reason"] == "revoked"
    assert (await verify(api, other["token"]))["valid"]
    async with services.engine.connect() as conn:
        kept = (
            await conn.execute(select(tokens.c.identity_id).where(tokens.c.id == issued[0]["id"]))
        ).scalar()
    assert kept == issued[0]["identity"]["id"]  # the audit trail still names it
    gone = await api.get("/v1/projects/shop/identities/user_123")
    assert gone.status_code == 404


async def test_identities_are_isolated_by_project(api, services, admin):
    await api.post("/v1/projects", json={"name": "shop"})
    await api.post("/v1/projects", json={"name": "other"})
    await identity(api)
    bound = await services.tokens.create_token(
        admin.record, TokenSpec(project="other", scopes=["admin:*"])
    )
    headers = {"Authorization": f"Bearer {bound.secret}"}
    seen = await api.get("/v1/projects/shop/identities/user_123", headers=headers)
    assert seen.status_code == 404
    listed = await api.get("/v1/projects/shop/identities", headers=headers)
    assert listed.status_code == 404


async def test_bad_identity_input_gets_clear_errors(api):
    await api.post("/v1/projects", json={"name": "shop"})
    for body in (
        {"external_id": ""},
        {"external_id": "has space"},
        {"external_id": "x" * 129},
        {"external_id": "ok", "rate_limit": "lots"},
        {"external_id": "ok", "extra": 1},
    ):
        response = await api.post("/v1/projects/shop/identities", json=body)
        assert response.status_code == 422, body
        assert response.json()["error"] and "Traceback" not in response.text
    fine = await api.post("/v1/projects/shop/identities", json={"external_id": "a.b@c:d+e-f_1"})
    assert fine.status_code == 201


# -- the identity's rate limit: one counter for all its tokens ---------------------------


async def _three_tokens(services: Services, admin: Issued, rate: str) -> list[Issued]:
    await services.tokens.create_project(admin.record, "shop")
    assert services.identities is not None
    await services.identities.create(admin.record, "shop", "user_123", rate_limit=rate)
    return [
        await services.tokens.create_token(
            admin.record, TokenSpec(project="shop", scopes=["x:y"], identity="user_123")
        )
        for _ in range(3)
    ]


async def test_a_user_cannot_escape_the_limit_with_more_keys(services, admin):
    """Three tokens of one identity with 5/minute: 5 requests in all, not 3 × 5."""
    three = await _three_tokens(services, admin, "5/minute")
    decisions = await asyncio.gather(
        *(services.verifier.verify(three[i % 3].secret) for i in range(15))
    )
    assert sum(d.allowed for d in decisions) == 5
    denied = [d for d in decisions if not d.allowed]
    assert {d.reason for d in denied} == {Reason.RATE_LIMITED}
    assert all(d.ratelimit.limit == 5 and d.ratelimit.remaining == 0 for d in denied)


async def test_the_identity_limit_holds_across_two_replicas_sharing_redis(settings):
    prefix = f"tw-identity-{secrets.token_hex(4)}:"
    shared = settings.model_copy(update={"redis_url": REDIS_URL, "redis_prefix": prefix})
    async with two_replicas(shared) as (a, b):
        a.verifier.store_timeout = b.verifier.store_timeout = 60.0  # exactness, not speed
        admin = issue_bootstrap_record(a.hasher, a.verifier.clock())
        await a.store.insert_token(admin.record, a.hasher.hash(admin.secret))
        three = await _three_tokens(a, admin, "7/minute")
        decisions = await asyncio.gather(
            *((a, b)[i % 2].verifier.verify(three[i % 3].secret) for i in range(30))
        )
        assert sum(d.allowed for d in decisions) == 7
        # A raised limit is effective on the other replica at once (one fan-out message).
        assert a.identities is not None
        await a.identities.update(
            admin.record, "shop", "user_123", IdentityChanges(rate_limit="7/minute;100/hour")
        )
        for _ in range(200):
            decision = await b.verifier.verify(three[0].secret, consume=False)
            if decision.token.identity.rate_limit != ("7/minute",):
                break
            await asyncio.sleep(0.025)
        assert decision.token.identity.rate_limit == ("7/minute", "100/hour")
        await a.limiter.reset()


async def test_deleting_an_identity_revokes_on_the_other_replica(settings):
    shared = settings.model_copy(update={"redis_url": REDIS_URL, "cache_ttl": 300.0})
    async with two_replicas(shared) as (a, b):
        a.verifier.store_timeout = b.verifier.store_timeout = 60.0  # exactness, not speed
        admin = issue_bootstrap_record(a.hasher, a.verifier.clock())
        await a.store.insert_token(admin.record, a.hasher.hash(admin.secret))
        three = await _three_tokens(a, admin, "")
        for t in three:
            assert (await b.verifier.verify(t.secret)).allowed  # cached on B, for 300 s
        assert a.identities is not None
        await a.identities.delete(admin.record, "shop", "user_123", confirm=True)
        for _ in range(200):
            reasons = {(await b.verifier.verify(t.secret)).reason for t in three}
            if reasons == {Reason.REVOKED}:
                break
            await asyncio.sleep(0.01)
        assert reasons == {Reason.REVOKED}


async def test_exchanged_tokens_keep_the_identity_and_its_limit(api, services):
    """A key's exchanged access tokens belong to the key's identity: no escape that way."""
    await api.post("/v1/projects", json={"name": "shop"})
    await identity(api, rate_limit="4/minute")
    key = await api_key(api, identity="user_123")
    body = (await exchange(api, key["token"])).json()  # the exchange presents the key: hit 1
    record = await services.store.get_token(body["token_id"])
    assert record.identity is not None and record.identity.external_id == "user_123"
    answers = [await verify(api, body["access_token"]) for _ in range(4)]
    assert [a["valid"] for a in answers] == [True, True, True, False]
    assert answers[0]["identity"]["external_id"] == "user_123"
    # Deleting the identity revokes what was exchanged too.
    await api.delete("/v1/projects/shop/identities/user_123", params={"confirm": "true"})
    assert (await verify(api, body["access_token"]))["reason"] == "revoked"


async def test_identity_changes_are_audited(services, admin, events):
    await services.tokens.create_project(admin.record, "shop")
    assert services.identities is not None
    made = await services.identities.create(admin.record, "shop", "user_123")
    await services.identities.update(
        admin.record, "shop", "user_123", IdentityChanges(metadata={"plan": "pro"})
    )
    issued = await services.tokens.create_token(
        admin.record, TokenSpec(project="shop", scopes=["x:y"], identity="user_123")
    )
    await services.identities.delete(admin.record, "shop", "user_123", confirm=True)
    actions = [(e.action, e.detail.get("identity")) for e in events.admin_events]
    assert ("identity.create", made.id) in actions
    assert ("identity.update", made.id) in actions
    assert ("token.create", made.id) in actions
    [deleted] = [e for e in events.admin_events if e.action == "identity.delete"]
    assert deleted.detail["revoked"] == [issued.record.id] and deleted.actor_id == admin.record.id


async def test_a_bad_cost_is_a_clear_error(api):
    await api.post("/v1/projects", json={"name": "shop"})
    issued = await token(api, uses=3)
    for cost in (-1, "5", True, 1.5, 10**7):
        response = await api.post("/v1/verify", json={"token": issued["token"], "cost": cost})
        assert response.status_code == 422, cost
        assert response.json()["error"] == "invalid_request"
        assert "cost" in response.json()["message"] and issued["token"] not in response.text
    assert (await verify(api, issued["token"], cost=3.0))["remaining_uses"] == 0
