"""The admin REST API over HTTP, on SQLite and PostgreSQL: projects, tokens, verify,
scopes only narrowing, tenant isolation and invariant 1 (no secret at rest or in logs)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from tokenward.store.tables import metadata
from tokenward.tokens.format import generate_token, parse_token


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


async def new_project(api, name: str) -> dict:
    response = await api.post("/v1/projects", json={"name": name})
    assert response.status_code == 201, response.text
    return response.json()


async def new_token(api, headers: dict[str, str] | None = None, **body) -> dict:
    body.setdefault("scopes", ["records:read"])
    response = await api.post("/v1/tokens", json=body, headers=headers)
    assert response.status_code == 201, response.text
    return response.json()


async def verify(api, token: str, **fields) -> dict:
    response = await api.post("/v1/verify", json={"token": token, **fields})
    assert response.status_code == 200, response.text
    return response.json()


def move_clock(services, delta: timedelta) -> None:
    now = datetime.now(UTC) + delta
    services.verifier.clock = lambda: now


@pytest.fixture
async def tenants(api):
    """Projects a and b; an admin credential bound to a (admin:*, records:*, 1h); a b token."""
    await new_project(api, "a")
    await new_project(api, "b")
    a_admin = await new_token(api, project="a", scopes=["admin:*", "records:*"], ttl="1h")
    b_token = await new_token(api, project="b", scopes=["records:read"], name="b-token")
    a_token = await new_token(api, project="a", scopes=["records:read"], name="a-token")
    return {"a_admin": a_admin, "b_token": b_token, "a_token": a_token}


# -- projects ---------------------------------------------------------------------------------
async def test_projects_create_list_get_and_duplicate(api):
    shop = await new_project(api, "shop")
    assert shop["name"] == "shop" and shop["id"].startswith("prj_")
    await new_project(api, "blog")
    listed = (await api.get("/v1/projects")).json()["projects"]
    assert [p["name"] for p in listed] == ["blog", "shop"]
    by_name = await api.get("/v1/projects/shop")
    by_id = await api.get(f"/v1/projects/{shop['id']}")
    assert by_name.status_code == by_id.status_code == 200
    assert by_name.json() == by_id.json() == shop
    duplicate = await api.post("/v1/projects", json={"name": "shop"})
    assert duplicate.status_code == 409
    assert duplicate.json()["error"] == "project_exists"
    missing = await api.get("/v1/projects/nope")
    assert missing.status_code == 404 and missing.json()["error"] == "project_not_found"


# -- tokens -----------------------------------------------------------------------------------
async def test_secret_is_returned_once_then_never_again(api):
    await new_project(api, "app")
    response = await api.post(
        "/v1/tokens",
        json={"project": "app", "scopes": ["records:read"], "name": "web", "ttl": "90d"},
    )
    assert response.status_code == 201
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    secret = body["token"]
    parse_token(secret)
    assert "only once" in body["warning"]
    assert body["hint"] == f"tw_live_…{secret[-4:]}"
    assert body["project"] == "app" and body["scopes"] == ["records:read"]
    shown = await api.get(f"/v1/tokens/{body['id']}")
    listed = await api.get("/v1/tokens", params={"project": "app"})
    assert shown.status_code == listed.status_code == 200
    for later in (shown, listed):
        assert secret not in later.text and secret[8:-4] not in later.text
        assert "token" not in (later.json() if later is shown else later.json()["tokens"][0])
    assert shown.json()["state"] == "active"


async def test_list_filters_by_state(api, services):
    await new_project(api, "app")
    active = await new_token(api, project="app", name="active")
    expiring = await new_token(api, project="app", name="expiring", ttl="1h")
    revoked = await new_token(api, project="app", name="revoked")
    rotated = await new_token(api, project="app", name="rotated")
    assert (await api.post(f"/v1/tokens/{revoked['id']}/revoke", json={})).status_code == 200
    rotation = await api.post(f"/v1/tokens/{rotated['id']}/rotate", json={"grace": "0"})
    assert rotation.status_code == 201
    successor = rotation.json()
    move_clock(services, timedelta(hours=2))

    async def ids(state: str) -> set[str]:
        response = await api.get("/v1/tokens", params={"project": "app", "state": state})
        assert response.status_code == 200
        items = response.json()["tokens"]
        assert all(t["state"] == state for t in items)
        return {t["id"] for t in items}

    assert await ids("active") == {active["id"], successor["id"]}
    assert await ids("expired") == {expiring["id"]}
    assert await ids("revoked") == {revoked["id"]}
    assert await ids("rotated") == {rotated["id"]}
    everything = await api.get("/v1/tokens", params={"project": "app"})
    assert len(everything.json()["tokens"]) == 5
    # Not a state: refused rather than silently ignored (and so is a misspelt filter).
    for params in ({"state": "sleeping"}, {"sate": "active"}):
        bad = await api.get("/v1/tokens", params=params)
        assert bad.status_code == 422 and bad.json()["error"] == "invalid_request"


async def test_list_paginates_with_limit_and_next_cursor(api):
    await new_project(api, "app")
    created = [(await new_token(api, project="app"))["id"] for _ in range(5)]
    seen: list[str] = []
    params: dict[str, object] = {"project": "app", "limit": 2}
    pages = 0
    while True:
        page = (await api.get("/v1/tokens", params=params)).json()
        pages += 1
        assert len(page["tokens"]) <= 2 and page["limit"] == 2
        seen += [t["id"] for t in page["tokens"]]
        if not page["next_cursor"]:
            break
        params["cursor"] = page["next_cursor"]
    assert sorted(seen) == sorted(created)  # each once, none left out
    assert pages == 3
    assert (await api.get("/v1/tokens", params={"limit": 0})).status_code == 422
    assert (await api.get("/v1/tokens", params={"limit": 1001})).status_code == 422


async def test_revoke(api):
    await new_project(api, "app")
    token = await new_token(api, project="app")
    assert (await verify(api, token["token"]))["valid"] is True
    response = await api.post(f"/v1/tokens/{token['id']}/revoke", json={"reason": "leaked"})
    assert response.status_code == 200
    body = response.json()
    assert body["state"] == "revoked" and body["revoked_reason"] == "leaked"
    assert token["token"] not in response.text
    after = await verify(api, token["token"])
    assert after == {**after, "valid": False, "reason": "revoked"}
    again = await api.post(f"/v1/tokens/{token['id']}/revoke", json={"reason": "other"})
    assert again.json()["revoked_reason"] == "leaked"  # the first revocation is kept
    missing = await api.post("/v1/tokens/tok_nope/revoke")
    assert missing.status_code == 404


async def test_rotate_with_grace(api, services):
    await new_project(api, "app")
    old = await new_token(api, project="app", scopes=["records:*"], ttl="30d", uses=50)
    response = await api.post(f"/v1/tokens/{old['id']}/rotate", json={"grace": "1h"})
    assert response.status_code == 201
    assert response.headers["cache-control"] == "no-store"
    new = response.json()
    assert new["token"] != old["token"] and new["rotated_from"] == old["id"]
    assert new["scopes"] == ["records:*"] and new["remaining_uses"] == 50
    assert new["previous"]["id"] == old["id"] and new["previous"]["grace_until"]
    assert (await verify(api, old["token"]))["valid"] is True
    assert (await verify(api, new["token"]))["valid"] is True
    shown = (await api.get(f"/v1/tokens/{old['id']}")).json()
    assert shown["state"] == "rotated_in_grace" and shown["replaced_by"] == new["id"]

    move_clock(services, timedelta(hours=1, seconds=5))
    assert (await verify(api, old["token"]))["reason"] == "rotated"
    assert (await verify(api, new["token"]))["valid"] is True
    assert (await api.get(f"/v1/tokens/{old['id']}")).json()["state"] == "rotated"
    twice = await api.post(f"/v1/tokens/{old['id']}/rotate", json={"grace": "1h"})
    assert twice.status_code in (409, 422)
    assert (
        await api.post(f"/v1/tokens/{new['id']}/rotate", json={"grace": "31d"})
    ).status_code == 422


async def test_grace_never_outlives_the_old_tokens_expiry(api, services):
    await new_project(api, "app")
    old = await new_token(api, project="app", ttl="1h")
    move_clock(services, timedelta(minutes=50))
    response = await api.post(f"/v1/tokens/{old['id']}/rotate", json={"grace": "2h"})
    assert response.status_code == 201
    new = response.json()  # a fresh hour: expires at +110 minutes
    move_clock(services, timedelta(minutes=70))  # past the old expiry, inside the grace
    assert (await verify(api, old["token"]))["reason"] == "expired"
    assert (await api.get(f"/v1/tokens/{old['id']}")).json()["state"] == "expired"
    assert (await verify(api, new["token"]))["valid"] is True
    expired = await api.get("/v1/tokens", params={"project": "app", "state": "expired"})
    assert [t["id"] for t in expired.json()["tokens"]] == [old["id"]]
    active = await api.get("/v1/tokens", params={"project": "app", "state": "active"})
    assert [t["id"] for t in active.json()["tokens"]] == [new["id"]]


async def test_verify_body_and_reasons(api, services):
    await new_project(api, "app")
    token = await new_token(
        api,
        project="app",
        scopes=["records:*"],
        principal="svc-a",
        ip_allowlist=["10.0.0.0/8"],
        ttl="1h",
    )
    ok = await verify(api, token["token"], scope="records:read", ip="10.1.2.3")
    assert ok["valid"] is True and ok["reason"] == "ok"
    assert ok["token_id"] == token["id"] and ok["project"] == "app"
    assert ok["principal"] == "svc-a" and ok["scopes"] == ["records:*"]
    assert ok["environment"] == "live" and ok["expires_at"] == token["expires_at"]
    assert set(ok) >= {"remaining_uses", "ratelimit"}
    secret = token["token"]
    typo = secret[:-1] + ("A" if secret[-1] != "A" else "B")
    cases = [
        ({"token": secret, "scope": "functions:invoke", "ip": "10.0.0.1"}, "insufficient_scope"),
        ({"token": secret, "ip": "192.0.2.1"}, "ip_not_allowed"),
        ({"token": secret, "ip": "10.0.0.1", "environment": "test"}, "wrong_environment"),
        ({"token": secret, "ip": "10.0.0.1", "project": "other"}, "wrong_project"),
        ({"token": generate_token("live")}, "unknown"),
        ({"token": "not a token"}, "malformed"),
        ({"token": typo}, "bad_checksum"),
    ]
    for body, reason in cases:
        response = await api.post("/v1/verify", json=body)
        assert response.status_code == 200
        result = response.json()
        assert result["valid"] is False and result["reason"] == reason, (body, result)
        assert secret not in response.text
    limited = await new_token(api, project="app", rate_limit="2/minute", uses=5)
    results = [await verify(api, limited["token"]) for _ in range(3)]
    assert [r["valid"] for r in results] == [True, True, False]
    assert results[-1]["reason"] == "rate_limited" and results[0]["ratelimit"]["limit"] == 2
    assert results[1]["remaining_uses"] == 3
    once = await new_token(api, project="app", uses=1)
    assert (await verify(api, once["token"]))["remaining_uses"] == 0
    assert (await verify(api, once["token"]))["reason"] == "uses_exhausted"
    move_clock(services, timedelta(hours=2))
    assert (await verify(api, secret, ip="10.0.0.1"))["reason"] == "expired"


# -- scopes only narrow -----------------------------------------------------------------------
async def test_project_admin_cannot_widen_scope_or_life(api, tenants):
    a_admin = bearer(tenants["a_admin"]["token"])
    fine = await new_token(api, a_admin, project="a", scopes=["records:read"], ttl="30m")
    assert fine["created_by"] == tenants["a_admin"]["id"]

    async def refused(body: dict, code: str) -> None:
        response = await api.post("/v1/tokens", json=body, headers=a_admin)
        assert response.status_code == 403, response.text
        assert response.json()["error"] == code

    await refused({"project": "a", "scopes": ["functions:*"], "ttl": "30m"}, "scope_not_held")
    await refused({"project": "a", "scopes": ["*"], "ttl": "30m"}, "scope_not_held")
    await refused({"project": "a", "scopes": ["records:read"], "ttl": "2h"}, "lifetime_not_held")
    await refused({"project": "a", "scopes": ["records:read"]}, "lifetime_not_held")
    far = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    await refused(
        {"project": "a", "scopes": ["records:read"], "expires_at": far}, "lifetime_not_held"
    )
    # No project: a project-bound credential cannot mint a global token.
    response = await api.post("/v1/tokens", json={"scopes": ["records:read"]}, headers=a_admin)
    assert response.status_code == 422
    # Project creation needs a global admin.
    assert (await api.post("/v1/projects", json={"name": "c"}, headers=a_admin)).status_code == 403


async def test_rotation_never_widens_scope_or_life(api, tenants):
    a_admin = bearer(tenants["a_admin"]["token"])
    wide = await new_token(api, project="a", scopes=["functions:*"])  # made by the global admin
    response = await api.post(f"/v1/tokens/{wide['id']}/rotate", json={}, headers=a_admin)
    assert response.status_code == 403 and response.json()["error"] == "scope_not_held"
    assert (await verify(api, wide["token"]))["valid"] is True  # untouched
    long_lived = await new_token(api, project="a", scopes=["records:read"], ttl="90d")
    response = await api.post(f"/v1/tokens/{long_lived['id']}/rotate", json={}, headers=a_admin)
    assert response.status_code == 201
    successor = response.json()
    # The successor cannot outlive the credential that rotated it.
    assert successor["expires_at"] <= tenants["a_admin"]["expires_at"]


async def test_rotation_keeps_not_before(api, services):
    await new_project(api, "app")
    later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    token = await new_token(api, project="app", not_before=later)
    assert (await verify(api, token["token"]))["reason"] == "not_yet_valid"
    response = await api.post(f"/v1/tokens/{token['id']}/rotate", json={"grace": "0"})
    assert response.status_code == 201
    # The successor does not start working earlier than its predecessor would have.
    assert (await verify(api, response.json()["token"]))["reason"] == "not_yet_valid"
    move_clock(services, timedelta(hours=2))
    assert (await verify(api, response.json()["token"]))["valid"] is True


async def test_test_environment_credential_cannot_make_live_tokens(api):
    await new_project(api, "a")
    tester = await new_token(api, project="a", environment="test", scopes=["admin:*", "records:*"])
    assert tester["token"].startswith("tw_test_")
    headers = bearer(tester["token"])
    response = await api.post(
        "/v1/tokens", json={"project": "a", "scopes": ["records:read"]}, headers=headers
    )
    assert response.status_code == 403 and response.json()["error"] == "environment_not_held"
    made = await new_token(api, headers, project="a", environment="test")
    assert made["token"].startswith("tw_test_")
    live = await new_token(api, project="a")
    rotated = await api.post(f"/v1/tokens/{live['id']}/rotate", json={}, headers=headers)
    assert rotated.status_code == 403 and "tw_live_" not in rotated.text
    assert (await verify(api, live["token"]))["valid"] is True


# -- tenant isolation -------------------------------------------------------------------------
async def test_project_admin_sees_nothing_of_another_project(api, tenants, services):
    a = bearer(tenants["a_admin"]["token"])
    b_token = tenants["b_token"]
    b_id = b_token["id"]
    assert (await api.get("/v1/projects/b", headers=a)).status_code == 404
    b_project_id = (await api.get("/v1/projects/b")).json()["id"]
    assert (await api.get(f"/v1/projects/{b_project_id}", headers=a)).status_code == 404
    assert [p["name"] for p in (await api.get("/v1/projects", headers=a)).json()["projects"]] == [
        "a"
    ]
    assert (await api.get("/v1/projects/a", headers=a)).status_code == 200

    for method, path in [
        ("GET", f"/v1/tokens/{b_id}"),
        ("POST", f"/v1/tokens/{b_id}/revoke"),
        ("POST", f"/v1/tokens/{b_id}/rotate"),
    ]:
        response = await api.request(method, path, headers=a, json={})
        assert response.status_code == 404, (path, response.text)
        assert response.json()["error"] == "token_not_found"
        assert "b-token" not in response.text

    listed = (await api.get("/v1/tokens", headers=a)).json()["tokens"]
    assert listed and {t["project"] for t in listed} == {"a"}
    assert b_id not in {t["id"] for t in listed}
    for state in ("active", "revoked", "expired", "rotated"):
        items = (await api.get("/v1/tokens", params={"state": state}, headers=a)).json()["tokens"]
        assert all(t["project"] == "a" for t in items)
    assert (await api.get("/v1/tokens", params={"project": "b"}, headers=a)).status_code == 404
    created = await api.post(
        "/v1/tokens", json={"project": "b", "scopes": ["records:read"], "ttl": "5m"}, headers=a
    )
    assert created.status_code == 404
    created = await api.post(
        "/v1/tokens",
        json={"project": b_project_id, "scopes": ["records:read"], "ttl": "5m"},
        headers=a,
    )
    assert created.status_code == 404

    verified = await api.post("/v1/verify", json={"token": b_token["token"]}, headers=a)
    assert verified.json() == {
        **verified.json(),
        "valid": False,
        "reason": "unknown",
        "token_id": None,
        "project": None,
        "principal": None,
        "environment": None,
        "scopes": [],
    }
    assert b_id not in verified.text and "b-token" not in verified.text
    introspected = await api.post("/oauth/introspect", data={"token": b_token["token"]}, headers=a)
    assert introspected.status_code == 200 and introspected.json() == {"active": False}
    revoked = await api.post("/oauth/revoke", data={"token": b_token["token"]}, headers=a)
    assert revoked.status_code == 200
    assert (await verify(api, b_token["token"]))["valid"] is True
    record = await services.store.get_token(b_id)
    assert record.revoked_at is None and record.replaced_by is None
    # Its own project's tokens it can see and use.
    a_id = tenants["a_token"]["id"]
    assert (await api.get(f"/v1/tokens/{a_id}", headers=a)).status_code == 200
    mine = await api.post("/v1/verify", json={"token": tenants["a_token"]["token"]}, headers=a)
    assert mine.json()["valid"] is True


async def test_global_tokens_are_invisible_to_a_project_admin(api, tenants, admin):
    a = bearer(tenants["a_admin"]["token"])
    assert (await api.get(f"/v1/tokens/{admin.record.id}", headers=a)).status_code == 404
    verified = await api.post("/v1/verify", json={"token": admin.secret}, headers=a)
    assert verified.json()["reason"] == "unknown" and verified.json()["token_id"] is None


async def test_verify_only_credential(api):
    await new_project(api, "app")
    checker = await new_token(api, project="app", scopes=["verify"])
    target = await new_token(api, project="app")
    headers = bearer(checker["token"])
    ok = await api.post("/v1/verify", json={"token": target["token"]}, headers=headers)
    assert ok.status_code == 200 and ok.json()["valid"] is True
    introspected = await api.post(
        "/oauth/introspect", data={"token": target["token"]}, headers=headers
    )
    assert introspected.json()["active"] is True
    for method, path, body in [
        ("GET", "/v1/projects", None),
        ("GET", "/v1/projects/app", None),
        ("POST", "/v1/projects", {"name": "x"}),
        ("GET", "/v1/tokens", None),
        ("GET", f"/v1/tokens/{target['id']}", None),
        ("POST", "/v1/tokens", {"project": "app", "scopes": ["verify"]}),
        ("POST", f"/v1/tokens/{target['id']}/revoke", {}),
        ("POST", f"/v1/tokens/{target['id']}/rotate", {}),
    ]:
        response = await api.request(method, path, json=body, headers=headers)
        assert response.status_code == 403, (path, response.text)
        assert response.json()["error"] == "insufficient_scope"
    records_only = await new_token(api, project="app", scopes=["records:*"])
    response = await api.post(
        "/v1/verify", json={"token": target["token"]}, headers=bearer(records_only["token"])
    )
    assert response.status_code == 403


# -- invariant 1 ------------------------------------------------------------------------------
async def test_no_secret_in_any_row_log_or_error_body(api, services, admin, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    await new_project(api, "app")
    secrets_seen = [admin.secret]
    bodies: list[str] = []
    for scopes in (["records:read"], ["admin:*"], ["functions:invoke:send-email"]):
        token = await new_token(
            api,
            project="app",
            scopes=scopes,
            ip_allowlist=["127.0.0.0/8"],
            metadata={"team": "x"},
            rate_limit="100/minute",
            uses=10,
        )
        secrets_seen.append(token["token"])
    rotated = await api.post(f"/v1/tokens/{(await new_token(api, project='app'))['id']}/rotate")
    secrets_seen += [rotated.json()["token"]]
    for secret in secrets_seen[1:]:
        await verify(api, secret, ip="127.0.0.1")
        await api.post("/oauth/introspect", data={"token": secret})
        # Error paths that carry the secret somewhere in the request.
        for response in [
            await api.post("/v1/verify", json={"token": secret, "extra": 1}),
            await api.post("/v1/verify", json={secret: 1, "token": "x"}),
            await api.post("/v1/verify", json={"token": secret, "scope": 5}),
            await api.post("/v1/verify", json={"token": secret, "environment": "prod"}),
            await api.post("/v1/tokens", json={"project": "app", "scopes": [secret]}),
            await api.post("/v1/tokens", json={"project": "app", "scopes": ["a:b"], secret: 1}),
            await api.post("/v1/tokens", json={"project": secret, "scopes": ["a:b"]}),
            await api.post(
                "/v1/tokens", json={"project": "app", "scopes": ["a:b"], "ip_allowlist": [secret]}
            ),
            await api.post(
                "/v1/tokens", json={"project": "app", "scopes": ["a:b"], "rate_limit": secret}
            ),
            await api.post("/v1/tokens", json={"project": "app", "scopes": ["a:b"], "ttl": secret}),
            await api.post("/v1/tokens", content=b'{"token": "' + secret.encode() + b'",'),
            await api.get("/v1/tokens", headers=bearer(secret + "x")),
            await api.get("/v1/tokens", headers=bearer(secret[:-1] + "!")),
            await api.post("/oauth/revoke", json={"token": secret}),
            # A secret pasted into a stored text field is refused, not stored.
            await api.post("/v1/tokens", json={"scopes": [secret]}),
            await api.post("/v1/tokens", json={"scopes": [f"{secret}:read"]}),
            await api.post("/v1/tokens", json={"scopes": ["a:b"], "name": f"k={secret}"}),
            await api.post("/v1/tokens", json={"scopes": ["a:b"], "principal": secret}),
            await api.post("/v1/tokens", json={"scopes": ["a:b"], "metadata": {"k": secret}}),
            await api.post("/v1/tokens", json={"scopes": ["a:b"], "metadata": {secret: "v"}}),
            await api.post(
                f"/v1/tokens/{admin.record.id}/revoke", json={"reason": f"leaked {secret}"}
            ),
        ]:
            assert 400 <= response.status_code < 500, response.text
            bodies.append(response.text)
    await services.verifier.flush_usage()

    rows: list[str] = []
    async with services.engine.connect() as conn:
        for table in metadata.sorted_tables:
            for row in (await conn.execute(select(table))).all():
                rows.append(repr(tuple(row)))
    assert len(rows) >= len(secrets_seen) + 1
    dumped = "\n".join(rows)
    captured = capsys.readouterr()
    logs = caplog.text + captured.out + captured.err
    for secret in secrets_seen:
        body = secret[8:-6]
        assert secret not in dumped and body not in dumped
        assert secret not in logs and body not in logs
    # A client that wrongly puts a token in a URL does not get it echoed back either (the
    # client's own request log shows its URL, so these come after the log check).
    for secret in secrets_seen[1:]:
        for response in [
            await api.get(f"/v1/tokens/{secret}"),
            await api.get(f"/v1/projects/{secret}"),
            await api.post(f"/v1/tokens/{secret}/revoke"),
            await api.post(f"/v1/tokens/{secret}/rotate"),
            await api.get("/v1/tokens", params={"after": secret}),
            await api.get("/v1/tokens", params={"project": secret, "state": secret}),
        ]:
            assert 400 <= response.status_code < 500, response.text
            bodies.append(response.text)
    for secret in secrets_seen:
        for text in bodies:
            assert secret not in text and secret[8:-6] not in text
