"""RFC 7662 introspection and RFC 7009 revocation, on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from tokenward.tokens.format import generate_token


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


@pytest.fixture
async def app_project(api):
    assert (await api.post("/v1/projects", json={"name": "app"})).status_code == 201


async def new_token(api, **body) -> dict:
    body.setdefault("project", "app")
    body.setdefault("scopes", ["records:read"])
    response = await api.post("/v1/tokens", json=body)
    assert response.status_code == 201, response.text
    return response.json()


async def introspect(api, token: str, headers=None) -> dict:
    response = await api.post("/oauth/introspect", data={"token": token}, headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    return response.json()


async def is_valid(api, token: str) -> bool:
    return (await api.post("/v1/verify", json={"token": token})).json()["valid"]


async def test_introspection_of_an_active_token(api, app_project):
    token = await new_token(
        api, scopes=["records:read", "functions:invoke:*"], principal="svc-a", ttl="1h"
    )
    body = await introspect(api, token["token"])
    assert body["active"] is True
    assert body["scope"] == "records:read functions:invoke:*"
    assert body["sub"] == "svc-a" and body["jti"] == token["id"]
    assert body["token_type"] == "api_key"
    created = datetime.fromisoformat(token["created_at"])
    expires = datetime.fromisoformat(token["expires_at"])
    assert body["iat"] == int(created.timestamp()) and body["exp"] == int(expires.timestamp())
    assert body["exp"] - body["iat"] == 3600
    assert token["token"] not in str(body)
    no_expiry = await introspect(api, (await new_token(api))["token"])
    assert no_expiry["active"] is True and "exp" not in no_expiry


async def test_introspection_inactive_cases(api, services, app_project):
    revoked = await new_token(api)
    await api.post(f"/v1/tokens/{revoked['id']}/revoke", json={})
    expiring = await new_token(api, ttl="1m")
    canary = await new_token(api, kind="canary")
    secret = (await new_token(api))["token"]
    typo = secret[:-1] + ("A" if secret[-1] != "A" else "B")
    for token in (generate_token("live"), revoked["token"], "garbage", typo, canary["token"]):
        assert await introspect(api, token) == {"active": False}
    assert (await introspect(api, expiring["token"]))["active"] is True
    now = datetime.now(UTC) + timedelta(minutes=5)
    services.verifier.clock = lambda: now
    assert await introspect(api, expiring["token"]) == {"active": False}


async def test_introspection_spends_no_use_and_no_rate_limit(api, app_project):
    token = await new_token(api, uses=1, rate_limit="1/minute")
    for _ in range(5):
        body = await introspect(api, token["token"])
        assert body["active"] is True
    first = (await api.post("/v1/verify", json={"token": token["token"]})).json()
    assert first["valid"] is True and first["remaining_uses"] == 0
    second = (await api.post("/v1/verify", json={"token": token["token"]})).json()
    assert second["valid"] is False and second["reason"] in ("uses_exhausted", "rate_limited")
    assert await introspect(api, token["token"]) == {"active": False}


async def test_introspection_needs_a_credential_and_a_form(api, app_project):
    token = await new_token(api)
    response = await api.post(
        "/oauth/introspect", data={"token": token["token"]}, headers={"Authorization": ""}
    )
    assert response.status_code == 401 and "www-authenticate" in response.headers
    no_scope = await new_token(api, scopes=["records:read"])
    response = await api.post(
        "/oauth/introspect", data={"token": token["token"]}, headers=bearer(no_scope["token"])
    )
    assert response.status_code == 403
    response = await api.post("/oauth/introspect", json={"token": token["token"]})
    assert response.status_code in (400, 422)
    assert response.json()["error"] == "invalid_request" and token["token"] not in response.text
    response = await api.post("/oauth/introspect", data={})
    assert response.status_code in (400, 422) and response.json()["error"] == "invalid_request"


async def test_rfc7009_revoke_answers_200_for_unknown_and_malformed(api, app_project):
    bystander = await new_token(api)
    for token in (generate_token("live"), "garbage", "tw_live_" + "a" * 38):
        response = await api.post("/oauth/revoke", data={"token": token})
        assert response.status_code == 200 and response.json() == {}
    assert await is_valid(api, bystander["token"])


async def test_rfc7009_revoke_with_admin_write(api, app_project):
    token = await new_token(api)
    assert await is_valid(api, token["token"])
    response = await api.post(
        "/oauth/revoke", data={"token": token["token"], "token_type_hint": "access_token"}
    )
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    verdict = (await api.post("/v1/verify", json={"token": token["token"]})).json()
    assert verdict["reason"] == "revoked"
    shown = (await api.get(f"/v1/tokens/{token['id']}")).json()
    assert shown["state"] == "revoked" and "7009" in shown["revoked_reason"]


async def test_rfc7009_revoke_needs_admin_write_for_other_tokens(api, app_project):
    target = await new_token(api)
    reader = await new_token(api, scopes=["admin:read"])
    response = await api.post(
        "/oauth/revoke", data={"token": target["token"]}, headers=bearer(reader["token"])
    )
    assert response.status_code == 403 and response.json()["error"] == "insufficient_scope"
    assert target["token"] not in response.text
    assert await is_valid(api, target["token"])


async def test_a_public_client_revokes_the_token_it_presents(api, app_project):
    # RFC 7009 with a public client: no client credentials; holding the token is the right
    # to give it up (as presenting it as its own Bearer credential always was).
    target = await new_token(api)
    bystander = await new_token(api)
    response = await api.post(
        "/oauth/revoke",
        data={"token": target["token"], "client_id": "my-app"},
        headers={"Authorization": ""},
    )
    assert response.status_code == 200 and response.json() == {}
    assert not await is_valid(api, target["token"])
    assert await is_valid(api, bystander["token"])


async def test_a_token_may_revoke_itself(api, app_project):
    token = await new_token(api, scopes=["records:read"])
    other = await new_token(api)
    response = await api.post(
        "/oauth/revoke", data={"token": token["token"]}, headers=bearer(token["token"])
    )
    assert response.status_code == 200
    assert (await api.post("/v1/verify", json={"token": token["token"]})).json()[
        "reason"
    ] == "revoked"
    assert await is_valid(api, other["token"])
    again = await api.post(
        "/oauth/revoke", data={"token": token["token"]}, headers=bearer(token["token"])
    )
    assert again.status_code == 200


async def test_a_canary_cannot_switch_itself_off(api, app_project):
    canary = await new_token(api, kind="canary")
    response = await api.post(
        "/oauth/revoke", data={"token": canary["token"]}, headers=bearer(canary["token"])
    )
    assert response.status_code == 200
    shown = (await api.get(f"/v1/tokens/{canary['id']}")).json()
    assert shown["revoked_at"] is None


async def test_rfc7009_json_body_is_an_error(api, app_project):
    token = await new_token(api)
    response = await api.post("/oauth/revoke", json={"token": token["token"]})
    assert response.status_code in (400, 422)
    body = response.json()
    assert body["error"] == "invalid_request" and body["message"]
    assert token["token"] not in response.text
    assert await is_valid(api, token["token"])


async def test_introspection_of_an_ip_restricted_token_is_active(api, services):
    await api.post("/v1/projects", json={"name": "iprestricted"})
    created = (
        await api.post(
            "/v1/tokens",
            json={
                "project": "iprestricted",
                "scopes": ["records:read"],
                "ip_allowlist": ["10.0.0.0/8"],
            },
        )
    ).json()
    response = await api.post("/oauth/introspect", data={"token": created["token"]})
    assert response.json()["active"] is True


@pytest.mark.parametrize("endpoint", ["/oauth/introspect", "/oauth/revoke"])
async def test_a_repeated_form_parameter_is_refused(api, app_project, endpoint):
    # RFC 6749 §3.1: parameters are sent at most once. Taking either copy would let a
    # request mean two things; the second copy is refused, and neither value is echoed.
    good = (await new_token(api))["token"]
    response = await api.post(
        endpoint,
        content=f"token=tw_live_other&token={good}",
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"] == "invalid_request"
    assert "more than once" in response.json()["message"]
    assert good not in response.text
    assert await is_valid(api, good)  # revocation did not take either copy
