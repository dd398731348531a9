"""Disabling an API key stops what was exchanged from it at once; enabling it brings back the
key, not the access tokens (the client exchanges the key again)."""

from __future__ import annotations

from tests.test_grant_cascade import grant, reason
from tests.test_oauth_exchange import api_key, exchange, refresh
from tokenward.tokens.model import Reason


async def test_disabling_a_key_revokes_its_grants_and_enabling_brings_back_only_the_key(
    api, services, events
):
    key = await api_key(api)
    body, narrowed = await grant(api, key)
    for token in (body["access_token"], narrowed["access_token"]):
        assert (await reason(services, token)) is Reason.OK  # cached

    off = await api.post(f"/v1/tokens/{key['id']}/disable", json={"reason": "on hold"})
    assert off.status_code == 200, off.text
    assert (await reason(services, key["token"])) is Reason.DISABLED
    for token in (body["access_token"], narrowed["access_token"]):
        assert (await reason(services, token)) is Reason.REVOKED
    denied = await refresh(api, body["refresh_token"])
    assert denied.status_code == 400 and denied.json()["error"] == "invalid_grant"
    refused = await exchange(api, key["token"], scope="records:read")
    assert refused.status_code in (400, 401), refused.text
    [cascade] = [e for e in events.admin_events if e.action == "token.cascade_revoke"]
    assert cascade.detail["reason"] == "origin_disabled"

    assert (await api.post(f"/v1/tokens/{key['id']}/enable", json={})).status_code == 200
    assert (await reason(services, key["token"])) is Reason.OK
    assert (await reason(services, body["access_token"])) is Reason.REVOKED
    again = await exchange(api, key["token"], scope="records:read")
    assert again.status_code == 200, again.text
