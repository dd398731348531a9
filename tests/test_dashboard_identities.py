"""The dashboard's identities pages, over HTTP (in process), on SQLite and PostgreSQL: create,
change, a token with an identity and a refill from the token form, delete with confirmation,
roles and tenant isolation."""

from __future__ import annotations

from tests.test_dashboard import (  # noqa: F401  (fixtures)
    PASSWORD,
    _quick_password_hashing,
    accounts,
    clock,
    dash,
    make_token,
    owner,
    person,
)
from tokenward.dashboard.accounts import Role
from tokenward.tokens.model import TokenState


async def test_identities_pages_end_to_end(dash, clock, accounts, services):  # noqa: F811
    p = await owner(dash, clock, accounts)
    await p.post("/dashboard/projects", {"name": "shop"})
    page = await p.get("/dashboard/p/shop/identities")
    assert page.status_code == 200 and "No identities yet" in page.text
    created = await p.post(
        "/dashboard/p/shop/identities",
        {"external_id": "user_123", "rate_limit": "5/minute", "metadata": "plan=pro\nteam=a"},
    )
    assert created.status_code == 303
    assert created.headers["location"] == "/dashboard/p/shop/identities/user_123"
    detail = await p.get(created.headers["location"])
    assert detail.status_code == 200 and "5/minute" in detail.text and "No tokens" in detail.text

    # The token form takes an identity and a refill.
    await p.get("/dashboard/p/shop/tokens/new")
    made = await p.post(
        "/dashboard/p/shop/tokens",
        {
            "scopes": "records:read",
            "identity": "user_123",
            "refill": "100/month",
            "refill_day": "15",
        },
    )
    assert made.status_code == 201, made.text
    shop = await services.store.get_project("shop")
    [record] = await services.store.list_tokens(project_ids=[shop.id], state=None, now=clock.now)
    assert record.identity.external_id == "user_123" and record.remaining_uses == 100
    assert str(record.refill) == "100/month" and record.refill.day == 15
    detail = await p.get("/dashboard/p/shop/identities/user_123")
    assert record.id in detail.text and "refills 100/month" in detail.text
    shown = await p.get(f"/dashboard/p/shop/tokens/{record.id}")
    assert "refills to 100 every month on day 15" in shown.text
    assert 'href="/dashboard/p/shop/identities/user_123"' in shown.text

    changed = await p.post(
        "/dashboard/p/shop/identities/user_123", {"rate_limit": "", "metadata": "plan=team"}
    )
    assert changed.status_code == 303
    identity = await services.identities.store.get(shop.id, "user_123")
    assert identity.rate_limit == [] and identity.metadata == {"plan": "team"}

    # Deleting needs the box ticked (the browser also asks, with a confirm dialog).
    detail = await p.get("/dashboard/p/shop/identities/user_123")
    assert 'data-confirm="Delete user_123' in detail.text
    refused = await p.post("/dashboard/p/shop/identities/user_123/delete", {})
    assert refused.status_code == 422 and "Tick the box" in refused.text
    assert (await services.store.get_token(record.id)).revoked_at is None
    deleted = await p.post("/dashboard/p/shop/identities/user_123/delete", {"confirm": "yes"})
    assert deleted.status_code == 303
    listing = await p.get(deleted.headers["location"])
    assert "revoked 1 token(s)" in listing.text
    assert (await services.store.get_token(record.id)).state(clock.now) is TokenState.REVOKED
    assert (await p.get("/dashboard/p/shop/identities/user_123")).status_code == 404


async def test_identity_form_errors_are_shown_not_raised(dash, clock, accounts):  # noqa: F811
    p = await owner(dash, clock, accounts)
    await p.post("/dashboard/projects", {"name": "shop"})
    await p.get("/dashboard/p/shop/identities")
    for data in (
        {"external_id": ""},
        {"external_id": "has space"},
        {"external_id": "ok", "rate_limit": "lots"},
        {"external_id": "ok", "metadata": "no equals sign"},
    ):
        response = await p.post("/dashboard/p/shop/identities", data)
        assert response.status_code == 422, data
        assert 'class="error"' in response.text
    await p.post("/dashboard/p/shop/identities", {"external_id": "ok"})
    again = await p.post("/dashboard/p/shop/identities", {"external_id": "ok"})
    assert again.status_code == 422 and "already exists" in again.text
    await p.get("/dashboard/p/shop/tokens/new")
    for data in (
        {"scopes": "records:read", "identity": "nobody"},
        {"scopes": "records:read", "refill": "10/week"},
        {"scopes": "records:read", "refill": "10/day", "refill_day": "3"},
    ):
        response = await p.post("/dashboard/p/shop/tokens", data)
        assert response.status_code == 422, data
        assert 'class="error"' in response.text


async def test_viewers_and_other_projects(dash, clock, accounts, services):  # noqa: F811
    p = await owner(dash, clock, accounts)
    await p.post("/dashboard/projects", {"name": "shop"})
    await p.post("/dashboard/projects", {"name": "other"})
    await p.get("/dashboard/p/shop/identities")
    await p.post("/dashboard/p/shop/identities", {"external_id": "user_123"})
    shop = await services.store.get_project("shop")
    other = await services.store.get_project("other")
    await accounts.create_user("vera", Role.VIEWER, password=PASSWORD, project_ids=[shop.id])
    await accounts.create_user("otto", Role.ADMIN, password=PASSWORD, project_ids=[other.id])
    v = person(dash, clock)
    await v.sign_in("vera")
    page = await v.get("/dashboard/p/shop/identities/user_123")
    assert page.status_code == 200 and "Delete identity" not in page.text
    for path, data in (
        ("/dashboard/p/shop/identities", {"external_id": "x"}),
        ("/dashboard/p/shop/identities/user_123", {"rate_limit": ""}),
        ("/dashboard/p/shop/identities/user_123/delete", {"confirm": "yes"}),
    ):
        assert (await v.post(path, data)).status_code == 403, path
    o = person(dash, clock)
    await o.sign_in("otto")
    assert (await o.get("/dashboard/p/shop/identities")).status_code == 404
    assert (await o.get("/dashboard/p/shop/identities/user_123")).status_code == 404
    assert await services.identities.store.get(shop.id, "user_123") is not None
