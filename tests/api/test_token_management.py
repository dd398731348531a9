"""Key management over HTTP, on SQLite and PostgreSQL: update (only narrowing what it must),
disable/enable (distinct from quarantine), search with filters, and the one cursor style
every list pages with."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta

from tests.api.test_admin_api import bearer, new_project, new_token, verify
from tokenward.pagination import encode_cursor


async def admin_events(api, services, action: str) -> list[dict]:
    await services.audit.flush()
    page = await api.get("/v1/audit", params={"kind": "admin", "action": action})
    assert page.status_code == 200, page.text
    return page.json()["events"]


# -- update -----------------------------------------------------------------------------------
async def test_update_changes_settings_and_only_narrows_what_it_must(api, services):
    await new_project(api, "app")
    token = await new_token(
        api,
        project="app",
        name="old",
        scopes=["records:read", "records:write"],
        ttl="30d",
        uses=10,
        metadata={"team": "billing"},
    )
    path = f"/v1/tokens/{token['id']}"
    soon = (datetime.now(UTC) + timedelta(days=7)).replace(microsecond=0)
    changed = await api.patch(
        path,
        json={
            "name": "storefront",
            "scopes": ["records:read"],
            "expires_at": soon.isoformat(),
            "ip_allowlist": ["10.0.0.0/8"],
            "rate_limit": "5/second",
            "uses": 3,
            "metadata": {"team": "search", "tier": "gold"},
        },
    )
    assert changed.status_code == 200, changed.text
    body = changed.json()
    assert body["name"] == "storefront" and body["scopes"] == ["records:read"]
    assert body["expires_at"] == soon.isoformat().replace("+00:00", "Z")
    assert body["ip_allowlist"] == ["10.0.0.0/8"] and body["rate_limit"] == "5/second"
    assert body["remaining_uses"] == 3 and body["metadata"] == {"team": "search", "tier": "gold"}
    assert body["state"] == "active"
    # the new scopes hold at once (the verifier's cache was told)
    inside = {"ip": "10.1.2.3"}
    assert (await verify(api, token["token"], scope="records:write", **inside))["reason"] == (
        "insufficient_scope"
    )
    assert (await verify(api, token["token"], scope="records:read", **inside))["valid"]
    assert (await verify(api, token["token"], ip="192.0.2.1"))["reason"] == "ip_not_allowed"

    for field, value, code in [
        ("scopes", ["records:read", "records:delete"], "scope_not_narrower"),
        ("expires_at", (soon + timedelta(days=1)).isoformat(), "lifetime_not_narrower"),
        ("uses", 4, "uses_not_narrower"),
    ]:
        widened = await api.patch(path, json={field: value})
        assert widened.status_code == 422, (field, widened.text)
        error = widened.json()
        assert error["error"] == code
        assert error["details"][0]["field"] == field and field in error["message"]
    assert (await api.patch(path, json={"colour": "red"})).status_code == 422
    # a rate limit and an allowlist can be removed; the metadata cleared
    cleared = await api.patch(path, json={"rate_limit": "", "ip_allowlist": [], "metadata": {}})
    assert cleared.status_code == 200, cleared.text
    assert cleared.json()["rate_limit"] is None and cleared.json()["ip_allowlist"] == []
    assert cleared.json()["metadata"] == {}

    events = await admin_events(api, services, "token.update")
    assert len(events) == 2
    first = next(e for e in events if "scopes" in e["detail"]["changed"])["detail"]
    assert first["from"]["scopes"] == ["records:read", "records:write"]
    assert first["to"]["scopes"] == ["records:read"] and first["to"]["remaining_uses"] == 3
    assert first["to"]["metadata_keys"] == ["team", "tier"]  # keys only, never values
    assert "search" not in json.dumps(first) and token["token"] not in json.dumps(events)


async def test_update_refuses_a_dead_token_a_pasted_secret_and_another_project(api):
    await new_project(api, "a")
    await new_project(api, "b")
    a_admin = await new_token(api, project="a", scopes=["admin:*", "records:*"], ttl="1h")
    b_token = await new_token(api, project="b", name="b")
    hidden = await api.patch(
        f"/v1/tokens/{b_token['id']}", json={"name": "x"}, headers=bearer(a_admin["token"])
    )
    assert hidden.status_code == 404 and hidden.json()["error"] == "token_not_found"
    pasted = await api.patch(f"/v1/tokens/{b_token['id']}", json={"name": b_token["token"]})
    assert pasted.status_code == 400 and b_token["token"] not in pasted.text
    await api.post(f"/v1/tokens/{b_token['id']}/revoke", json={})
    dead = await api.patch(f"/v1/tokens/{b_token['id']}", json={"name": "x"})
    assert dead.status_code == 422 and dead.json()["error"] == "token_not_editable"


# -- disable / enable -------------------------------------------------------------------------
async def test_disable_and_enable_are_reversible_audited_and_apart_from_quarantine(api, services):
    await new_project(api, "app")
    token = await new_token(api, project="app")
    assert (await verify(api, token["token"]))["valid"]
    off = await api.post(f"/v1/tokens/{token['id']}/disable", json={"reason": "invoice unpaid"})
    assert off.status_code == 200, off.text
    assert off.json()["disabled_reason"] == "invoice unpaid" and off.json()["disabled_at"]
    assert off.json()["state"] == "active"  # a hold, not a lifecycle state
    assert (await verify(api, token["token"]))["reason"] == "disabled"
    again = await api.post(f"/v1/tokens/{token['id']}/disable", json={"reason": "other"})
    assert again.json()["disabled_reason"] == "invoice unpaid"  # idempotent: the first kept

    # a quarantine is the security system's hold: enabling does not lift it
    await api.post(f"/v1/tokens/{token['id']}/quarantine", json={"reason": "odd traffic"})
    on = await api.post(f"/v1/tokens/{token['id']}/enable", json={"note": "paid"})
    assert on.status_code == 200 and on.json()["disabled_at"] is None
    assert (await verify(api, token["token"]))["reason"] == "quarantined"
    await api.post(f"/v1/tokens/{token['id']}/release", json={})
    assert (await verify(api, token["token"]))["valid"]

    [disabled] = await admin_events(api, services, "token.disable")
    [enabled] = await admin_events(api, services, "token.enable")
    assert disabled["detail"]["reason"] == "invoice unpaid"
    assert enabled["detail"] == {"was": "invoice unpaid", "note": "paid"}

    await api.post(f"/v1/tokens/{token['id']}/revoke", json={})
    gone = await api.post(f"/v1/tokens/{token['id']}/disable", json={})
    assert gone.status_code == 409 and gone.json()["error"] == "token_not_disableable"
    assert (await api.post("/v1/tokens/tok_nope/enable")).status_code == 404


# -- search -----------------------------------------------------------------------------------
async def test_search_filters_are_applied_together_by_the_server(api, services):
    await new_project(api, "app")
    await new_project(api, "other")
    made = {}
    for name, extra in [
        ("billing-api", {"principal": "svc-billing", "metadata": {"team": "billing"}}),
        ("billing-cron", {"principal": "svc-billing", "ttl": "2d", "environment": "test"}),
        ("search-api", {"principal": "svc-search", "metadata": {"team": "search"}}),
        ("Billing-old", {"kind": "canary", "ttl": "40d"}),
        ("café-1", {}),
        ("cafè-2", {}),
    ]:
        made[name] = await new_token(api, project="app", name=name, **extra)
    await new_token(api, project="other", name="billing-elsewhere")
    await api.post(f"/v1/tokens/{made['search-api']['id']}/disable", json={})
    await services.store.touch_many(
        {made["billing-api"]["id"]: (datetime.now(UTC) - timedelta(days=60), "10.0.0.1")}
    )

    async def names(**params) -> list[str]:
        response = await api.get("/v1/tokens", params={"project": "app", **params})
        assert response.status_code == 200, response.text
        return sorted(t["name"] for t in response.json()["tokens"])

    in_a_week = (datetime.now(UTC) + timedelta(days=7)).isoformat()
    a_month_ago = (datetime.now(UTC) - timedelta(days=30)).isoformat()
    assert await names(name_prefix="billing") == ["billing-api", "billing-cron"]  # exact case
    assert await names(name_prefix="café") == ["café-1"]  # beyond ASCII, still exact
    assert await names(principal="svc-billing") == ["billing-api", "billing-cron"]
    assert await names(metadata="team=billing") == ["billing-api"]
    assert await names(metadata=["team=billing", "x=y"]) == []
    assert await names(kind="canary") == ["Billing-old"]
    assert await names(environment="test") == ["billing-cron"]
    assert await names(expires_before=in_a_week) == ["billing-cron"]
    assert await names(last_used_before=a_month_ago) == ["billing-api"]
    assert await names(disabled="true") == ["search-api"]
    assert await names(disabled="false", name_prefix="search") == []
    assert await names(state="active", principal="svc-billing", environment="live") == [
        "billing-api"
    ]
    everywhere = (await api.get("/v1/tokens", params={"name_prefix": "billing-"})).json()
    assert sorted(t["name"] for t in everywhere["tokens"]) == [
        "billing-api",
        "billing-cron",
        "billing-elsewhere",
    ]
    assert (await api.get("/v1/tokens", params={"metadata": "no-equals"})).status_code == 422


async def test_search_pages_keep_their_filters_and_stay_in_the_project(api):
    await new_project(api, "a")
    await new_project(api, "b")
    a_admin = await new_token(api, project="a", scopes=["admin:*", "records:*"], ttl="1h")
    ids = [(await new_token(api, project="a", name=f"job-{n}"))["id"] for n in range(7)]
    await new_token(api, project="a", name="other")
    await new_token(api, project="b", name="job-b")
    seen: list[str] = []
    params: dict[str, object] = {"name_prefix": "job-", "limit": 3}
    while True:
        page = await api.get("/v1/tokens", params=params, headers=bearer(a_admin["token"]))
        assert page.status_code == 200, page.text
        body = page.json()
        seen += [t["id"] for t in body["tokens"]]
        if body["next_cursor"] is None:
            break
        params["cursor"] = body["next_cursor"]
    assert sorted(seen) == sorted(ids)  # project b's job-b is never seen by a's credential


async def test_a_bad_cursor_is_a_400_on_every_list(api):
    """One cursor style: whatever is not a next_cursor of that very list is refused."""
    await new_project(api, "app")
    forged = [
        "nope!",
        "bm9wZQ",  # base64url of "nope": not JSON
        base64.urlsafe_b64encode(b'["tokens",1]').decode().rstrip("="),  # wrong shape
        base64.urlsafe_b64encode(b'["tokens",true,"x"]').decode().rstrip("="),  # wrong type
        encode_cursor("tokens", (2**62, "tok_x")),  # past year 9999
        "A" * 300,
    ]
    for path, other in [
        ("/v1/tokens", encode_cursor("audit", (1, "c", 1))),
        ("/v1/projects", encode_cursor("tokens", (1, "tok_x"))),
        ("/v1/audit", encode_cursor("alerts", (1, "alt_x"))),
        ("/v1/alerts", encode_cursor("projects", ("app",))),
    ]:
        for cursor in [*forged, other]:
            response = await api.get(path, params={"cursor": cursor})
            assert response.status_code in (400, 422), (path, cursor, response.text)
            assert response.json()["error"] in ("invalid_cursor", "invalid_request"), path
        refused = await api.get(path, params={"cursor": other})
        assert refused.status_code == 400 and refused.json()["error"] == "invalid_cursor", path


async def test_every_list_pages_the_same_way(api, services):
    for name in ("p1", "p2", "p3"):
        await new_project(api, name)
    for _ in range(3):
        await new_token(api, project="p1")
    await services.audit.flush()
    for path, key, extra in [
        ("/v1/projects", "projects", {}),
        ("/v1/tokens", "tokens", {}),
        ("/v1/audit", "events", {"kind": "admin"}),
    ]:
        seen: list[str] = []
        params: dict[str, object] = {"limit": 2, **extra}
        while True:
            body = (await api.get(path, params=params)).json()
            assert set(body) >= {key, "limit", "next_cursor"} and body["limit"] == 2
            seen += [item["id"] for item in body[key]]
            if body["next_cursor"] is None:
                break
            params["cursor"] = body["next_cursor"]
        assert len(seen) == len(set(seen)) >= 3, path
