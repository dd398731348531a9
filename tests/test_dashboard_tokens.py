# ruff: noqa: F811 (the fixtures of tests.test_dashboard are imported by name)
"""The dashboard's token list (search form, cursor pages) and token detail (metadata edit,
disable/enable): the same service calls as the API, so the same rules and events."""

from __future__ import annotations

import re

from tests.test_dashboard import (  # noqa: F401 (fixtures)
    _quick_password_hashing,
    accounts,
    clock,
    dash,
    make_token,
    owner,
)


async def test_token_list_filters_and_pages_by_cursor(dash, clock, accounts, services):
    p = await owner(dash, clock, accounts)
    made = [
        await make_token(services, "shop", name=f"job-{n:02}", principal=f"svc-{n % 2}")
        for n in range(55)
    ]
    await make_token(services, "shop", name="other", metadata={"team": "billing"})
    first = await p.get("/dashboard/p/shop/tokens?name=job-&principal=svc-1")
    assert first.status_code == 200
    assert "27 tokens match" in first.text  # svc-1: the odd ones
    seen = set(re.findall(r"/tokens/(tok_[A-Za-z0-9]{16})", first.text))
    assert len(seen) == 27 and seen <= set(made)
    assert 'rel="next"' not in first.text  # one page of 50 holds them

    everything = await p.get("/dashboard/p/shop/tokens?name=job-")
    pages = [everything.text]
    while 'rel="next"' in pages[-1]:
        link = re.search(r'href="\?([^"]*)" rel="next"', pages[-1])
        assert link is not None
        pages.append(
            (await p.get("/dashboard/p/shop/tokens?" + link[1].replace("&amp;", "&"))).text
        )
    ids = [set(re.findall(r"/tokens/(tok_[A-Za-z0-9]{16})", page)) for page in pages]
    assert len(pages) == 2 and ids[0].isdisjoint(ids[1]) and ids[0] | ids[1] == set(made)
    assert "name=job-" in pages[1] and "newest" in pages[1]  # the filters stay on every page

    meta = await p.get("/dashboard/p/shop/tokens?meta=team%3Dbilling")
    assert "1 token match" in meta.text and "other" in meta.text
    for bad in ("kind=spoon", "meta=novalue", "cursor=bm9wZQ"):
        assert (await p.get(f"/dashboard/p/shop/tokens?{bad}")).status_code == 400, bad


async def test_token_detail_edits_metadata_and_disables_then_enables(
    dash, clock, accounts, services
):
    p = await owner(dash, clock, accounts)
    token_id = await make_token(services, "shop", name="app", metadata={"team": "a"})
    path = f"/dashboard/p/shop/tokens/{token_id}"
    page = await p.get(path)
    assert 'id="disable-form"' in page.text and "team=a" in page.text
    keep = {"name": "app", "scopes": "records:read", "rate_limit": "", "ip_allowlist": ""}
    saved = await p.post(path + "/settings", {**keep, "metadata": "team=b\ntier=gold"})
    assert saved.status_code == 303
    assert (await services.store.get_token(token_id)).metadata == {"team": "b", "tier": "gold"}
    bad = await p.post(path + "/settings", {**keep, "metadata": "no equals sign"})
    assert bad.status_code == 422 and "key=value" in bad.text

    off = await p.post(path + "/disable", {"reason": "customer on hold"})
    assert off.status_code == 303
    record = await services.store.get_token(token_id)
    assert record.disabled_at is not None and record.disabled_reason == "customer on hold"
    page = await p.get(path)
    assert 'id="enable-form"' in page.text and "customer on hold" in page.text
    listed = await p.get("/dashboard/p/shop/tokens")
    assert ">disabled<" in listed.text
    on = await p.post(path + "/enable", {"note": "paid"})
    assert on.status_code == 303
    assert (await services.store.get_token(token_id)).disabled_at is None
    trail = (await p.get(path)).text
    assert "token.disable" in trail and "token.enable" in trail
