# ruff: noqa: F811 (the fixtures of tests.test_dashboard are imported by name)
"""Dashboard forms and filters take what the API takes, on SQLite and PostgreSQL: no
control characters, numbers in range and in ASCII digits, one CSRF token per form."""

from __future__ import annotations

from tests.test_dashboard import (  # noqa: F401 (fixtures)
    PASSWORD,
    _quick_password_hashing,
    accounts,
    clock,
    dash,
    owner,
    person,
)
from tokenward.dashboard.accounts import Role


async def _shop(dash, clock, accounts):
    p = await owner(dash, clock, accounts)
    assert (await p.post("/dashboard/projects", {"name": "shop"})).status_code == 303
    await p.get("/dashboard/p/shop/tokens/new")
    return p


async def _tokens(services) -> list:
    project = await services.store.get_project("shop")
    now = services.verifier.clock()
    return await services.store.list_tokens(project_ids=[project.id], state=None, now=now)


async def _token_count(services) -> int:
    return len(await _tokens(services))


async def test_sign_in_refuses_control_characters(dash, clock, accounts):
    await accounts.create_user("owner", Role.OWNER, password=PASSWORD)
    p = person(dash, clock)
    await p.get("/dashboard/login")
    response = await p.post("/dashboard/login", {"login": "own\x00er", "password": PASSWORD})
    assert response.status_code == 400, response.text
    assert "control characters" in response.text


async def test_token_form_applies_the_api_rules(dash, clock, accounts, services):
    p = await _shop(dash, clock, accounts)
    base = {"scopes": "records:read"}
    cases = [
        ({"name": "a\x00b"}, 400),
        ({"principal": "svc\x00"}, 400),
        ({"name": "bell\x07"}, 400),
        ({"uses": "2147483648"}, 422),
        ({"uses": "999999999999"}, 422),
        ({"uses": "1000000001"}, 422),
        ({"uses": "١٢"}, 422),
        ({"uses": "²"}, 422),
        ({"uses": "0"}, 422),
        ({"name": "n" * 129}, 422),
        ({"name": "tab\there"}, 422),
        ({"ip_allowlist": "\n".join(f"10.0.{i}.0/24" for i in range(101))}, 422),
    ]
    for extra, status in cases:
        response = await p.post("/dashboard/p/shop/tokens", {**base, **extra})
        assert response.status_code == status, (extra, response.text[-500:])
        assert "Traceback" not in response.text and "invalid literal" not in response.text
        if status == 422:
            assert 'class="error"' in response.text
    assert await _token_count(services) == 0
    ok = await p.post("/dashboard/p/shop/tokens", {**base, "uses": "1000000000", "name": "x y"})
    assert ok.status_code == 201


async def test_token_edit_applies_the_api_rules(dash, clock, accounts, services):
    p = await _shop(dash, clock, accounts)
    created = await p.post("/dashboard/p/shop/tokens", {"scopes": "records:read", "uses": "5"})
    assert created.status_code == 201
    (record,) = await _tokens(services)
    await p.get(f"/dashboard/p/shop/tokens/{record.id}")
    path = f"/dashboard/p/shop/tokens/{record.id}/settings"
    for extra in ({"uses": "²"}, {"uses": "١"}, {"uses": "99999999999"}, {"name": "a\x00"}):
        response = await p.post(path, {"scopes": "records:read", **extra})
        assert 400 <= response.status_code < 500, (extra, response.status_code)
    many = "\n".join(f"10.1.{i}.0/24" for i in range(101))
    response = await p.post(path, {"scopes": "records:read", "ip_allowlist": many})
    assert response.status_code == 422
    assert (await services.store.get_token(record.id)).ip_allowlist == []


async def test_filters_refuse_control_characters_and_unknown_parameters(dash, clock, accounts):
    p = await _shop(dash, clock, accounts)
    for path in (
        "/dashboard/audit?ip=%00",
        "/dashboard/audit?reason=%00",
        "/dashboard/audit?token=%00",
        "/dashboard/audit?ip=zzz",
        "/dashboard/audit?before=%C2%B2",
        "/dashboard/audit?since=zz",
        "/dashboard/audit/export?since=zz",
        "/dashboard/audit/export?ip=%00",
        "/dashboard/audit/feed?after=1&colour=red",
        "/dashboard/p/shop/tokens?q=%00",
        "/dashboard/p/shop/tokens?cursor=%C2%B2",
        "/dashboard/p/shop/tokens?cursor=bm9wZQ",
        "/dashboard/p/shop/tokens?expiring=%D9%A1",
    ):
        response = await p.client.get(path)
        assert response.status_code == 400, (path, response.status_code)
    assert (await p.client.get("/dashboard/audit?ip=127.0.0.1&decision=deny")).status_code == 200
    export = await p.client.get("/dashboard/audit/export?kind=admin")
    assert export.status_code == 200


async def test_lifetime_days_are_ascii_digits(dash, clock, accounts):
    p = await _shop(dash, clock, accounts)
    await p.get("/dashboard/settings")
    for text in ("²", "١٢"):
        response = await p.post("/dashboard/settings/projects/shop/lifetime", {"max_days": text})
        assert response.status_code == 422, response.status_code
        assert "whole number" in response.text


async def test_a_repeated_csrf_field_is_refused(dash, clock, accounts, services):
    p = await _shop(dash, clock, accounts)
    form = [("csrf", "bad"), ("csrf", p.csrf), ("scopes", "records:read")]
    response = await p.client.post(
        "/dashboard/p/shop/tokens",
        content="&".join(f"{k}={v}" for k, v in form),
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 403
    assert await _token_count(services) == 0
