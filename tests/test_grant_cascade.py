"""Revoking, quarantining or rotating an API key reaches what was exchanged from it."""

from __future__ import annotations

import importlib.util
from datetime import timedelta
from pathlib import Path

from sqlalchemy import delete, select

from tests.test_oauth_exchange import api_key, exchange, refresh
from tokenward.oauth.tables import token_grants
from tokenward.store.engine import MIGRATIONS
from tokenward.tokens.model import Reason


def record_fanout(services):
    """The token ids published to the other replicas."""
    published: list[str] = []
    original = services.tokens.on_change

    async def publish(token_id: str) -> None:
        published.append(token_id)
        if original is not None:
            await original(token_id)

    services.tokens.on_change = publish
    return published


async def grant(api, key, **form):
    """Exchange ``key``: an access token, its refresh token, and an access token narrowed
    from the first one."""
    body = await exchange(api, key["token"], scope="records:read", **form)
    assert body.status_code == 200, body.text
    body = body.json()
    narrowed = await exchange(api, body["access_token"], scope="records:read", expires_in="60")
    assert narrowed.status_code == 200, narrowed.text
    return body, narrowed.json()


async def reason(services, token):
    return (await services.verifier.verify(token)).reason


async def test_revoking_a_key_revokes_everything_exchanged_from_it(api, services, events):
    key = await api_key(api)
    other = await api_key(api, name="other")
    body, narrowed = await grant(api, key)
    refreshed = (await refresh(api, body["refresh_token"])).json()
    kept, kept_narrowed = await grant(api, other)
    for token in (body["access_token"], narrowed["access_token"], refreshed["access_token"]):
        assert (await reason(services, token)) is Reason.OK  # now in the verifier's cache
    published = record_fanout(services)

    response = await api.post(f"/v1/tokens/{key['id']}/revoke", json={"reason": "leaked"})
    assert response.status_code == 200, response.text

    for token in (body["access_token"], narrowed["access_token"], refreshed["access_token"]):
        assert (await reason(services, token)) is Reason.REVOKED
    for token in (body["refresh_token"], refreshed["refresh_token"]):
        denied = await refresh(api, token)
        assert denied.status_code == 400 and denied.json()["error"] == "invalid_grant"
    cascade = [e for e in events.admin_events if e.action == "token.cascade_revoke"]
    assert len(cascade) == 1 and cascade[0].token_id == key["id"]
    revoked = set(cascade[0].detail["revoked"])
    descendants = {body["token_id"], narrowed["token_id"], refreshed["token_id"]}
    assert descendants <= revoked and len(revoked) == 5  # plus both refresh tokens
    assert revoked <= set(published)  # dropped from the cache of every replica
    assert cascade[0].detail["reason"] == "origin_revoked"
    # A key that has nothing to do with it keeps working, and so does its grant.
    assert (await reason(services, other["token"])) is Reason.OK
    assert (await reason(services, kept["access_token"])) is Reason.OK
    assert (await reason(services, kept_narrowed["access_token"])) is Reason.OK
    assert (await refresh(api, kept["refresh_token"])).status_code == 200


async def test_quarantining_a_key_revokes_its_grants_for_good(api, services, events):
    key = await api_key(api)
    body, narrowed = await grant(api, key)
    response = await api.post(f"/v1/tokens/{key['id']}/quarantine", json={"reason": "odd"})
    assert response.status_code == 200, response.text
    assert (await reason(services, body["access_token"])) is Reason.REVOKED
    assert (await reason(services, narrowed["access_token"])) is Reason.REVOKED
    assert (await refresh(api, body["refresh_token"])).json()["error"] == "invalid_grant"
    cascade = [e for e in events.admin_events if e.action == "token.cascade_revoke"]
    assert cascade[0].detail["reason"] == "origin_quarantined"
    # Releasing the key does not bring them back: the client exchanges the key again.
    assert (await api.post(f"/v1/tokens/{key['id']}/release", json={})).status_code == 200
    assert (await reason(services, body["access_token"])) is Reason.REVOKED
    assert (await exchange(api, key["token"])).status_code == 200


async def test_refresh_stops_once_the_key_is_quarantined_even_if_the_grant_was_missed(
    api, services
):
    key = await api_key(api)
    body = (await exchange(api, key["token"])).json()
    # As if the cascade had missed it (a race): the refresh itself checks its origin.
    await services.store.set_quarantine(key["id"], services.verifier.clock(), "odd")
    denied = await refresh(api, body["refresh_token"])
    assert denied.json()["error"] == "invalid_grant"
    assert "quarantined" in denied.json()["message"]
    assert (await reason(services, body["access_token"])) is Reason.REVOKED


async def test_rotating_a_key_without_grace_stops_refresh(api, services, events):
    key = await api_key(api)
    body, narrowed = await grant(api, key)
    rotated = await api.post(f"/v1/tokens/{key['id']}/rotate", json={"grace": "0"})
    assert rotated.status_code == 201, rotated.text
    # Already issued access tokens live out their short life ...
    assert (await reason(services, body["access_token"])) is Reason.OK
    assert (await reason(services, narrowed["access_token"])) is Reason.OK
    # ... but the grant cannot be renewed, and refusing it revokes the family.
    denied = await refresh(api, body["refresh_token"])
    assert denied.status_code == 400 and denied.json()["error"] == "invalid_grant"
    assert "rotated" in denied.json()["message"]
    assert (await reason(services, body["access_token"])) is Reason.REVOKED
    assert (await reason(services, narrowed["access_token"])) is Reason.REVOKED
    family = [e for e in events.admin_events if e.action == "token.family_revoke"]
    assert family[-1].detail["reason"] == "origin_not_valid"
    assert family[-1].detail["origin"] == key["id"]


async def test_refresh_works_during_the_rotation_grace_and_stops_after(api, services):
    key = await api_key(api)
    body = (await exchange(api, key["token"])).json()
    rotated = await api.post(f"/v1/tokens/{key['id']}/rotate", json={"grace": "1h"})
    assert rotated.status_code == 201, rotated.text
    again = await refresh(api, body["refresh_token"])
    assert again.status_code == 200, again.text
    now = services.verifier.clock()
    services.verifier.clock = lambda: now + timedelta(hours=1, seconds=1)
    denied = await refresh(api, again.json()["refresh_token"])
    assert denied.json()["error"] == "invalid_grant"


async def test_revoking_an_access_token_revokes_only_what_was_narrowed_from_it(api, services):
    key = await api_key(api)
    body, narrowed = await grant(api, key)
    sibling = (await exchange(api, key["token"])).json()
    response = await api.post(f"/v1/tokens/{body['token_id']}/revoke", json={"reason": "x"})
    assert response.status_code == 200
    assert (await reason(services, narrowed["access_token"])) is Reason.REVOKED
    assert (await reason(services, key["token"])) is Reason.OK
    assert (await reason(services, sibling["access_token"])) is Reason.OK
    assert (await refresh(api, body["refresh_token"])).status_code == 200


async def test_a_key_revoked_by_its_holder_takes_its_grants_along(api, services):
    key = await api_key(api)
    body, _ = await grant(api, key)
    response = await api.post(
        "/oauth/revoke", data={"token": key["token"]}, headers={"Authorization": ""}
    )
    assert response.status_code == 200, response.text
    assert (await reason(services, key["token"])) is Reason.REVOKED
    assert (await reason(services, body["access_token"])) is Reason.REVOKED


def _migration():
    path = Path(MIGRATIONS) / "versions" / "0007_token_grants.py"
    spec = importlib.util.spec_from_file_location("migration_0007", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_migration_links_tokens_exchanged_before_it(api, services):
    key = await api_key(api)
    body, narrowed = await grant(api, key)
    refreshed = (await refresh(api, body["refresh_token"])).json()
    async with services.engine.begin() as conn:
        before = set((await conn.execute(select(token_grants))).all())
        await conn.execute(delete(token_grants))
        await conn.run_sync(lambda sync: _migration()._backfill(sync, token_grants))
        after = set((await conn.execute(select(token_grants))).all())
    assert after == before and len(after) == 5
    assert {row.origin_id for row in after} == {key["id"]}
    await api.post(f"/v1/tokens/{key['id']}/revoke", json={"reason": "x"})
    assert (await reason(services, refreshed["access_token"])) is Reason.REVOKED


async def test_a_client_revokes_the_tokens_issued_to_it_rfc_7009(api):
    """RFC 7009 §2.1: an API key, authenticating as the OAuth client (its id and secret),
    may revoke the tokens it was exchanged for, without ``admin:write``; not another key's."""
    key = await api_key(api)
    other = await api_key(api)
    body, narrowed = await grant(api, key)
    theirs = (await exchange(api, other["token"], scope="records:read")).json()
    client = {"client_id": key["id"], "client_secret": key["token"]}
    no_auth = {"Authorization": ""}

    response = await api.post(
        "/oauth/revoke", data={"token": theirs["access_token"], **client}, headers=no_auth
    )
    assert response.status_code == 403  # not granted from this client
    assert (await api.post("/v1/verify", json={"token": theirs["access_token"]})).json()["valid"]

    response = await api.post(
        "/oauth/revoke", data={"token": body["refresh_token"], **client}, headers=no_auth
    )
    assert response.status_code == 200, response.text
    assert (await refresh(api, body["refresh_token"])).json()["error"] == "invalid_grant"
    for token in (body["access_token"], narrowed["access_token"]):  # its grant, and beyond
        verdict = (await api.post("/v1/verify", json={"token": token})).json()
        assert verdict["valid"] is False and verdict["reason"] == Reason.REVOKED
    assert (await api.post("/v1/verify", json={"token": key["token"]})).json()["valid"]
