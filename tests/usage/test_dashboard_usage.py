"""The dashboard's usage page: a chart over a chosen range, within the user's projects."""

from __future__ import annotations

from tokenward.audit.records import AuditRecord
from tokenward.dashboard.accounts import Role

from ..test_dashboard import PASSWORD, make_token, owner, person


async def _traffic(services, clock):
    shop_token = await make_token(services, "shop")
    other_token = await make_token(services, "other")
    shop = await services.store.get_project("shop")
    other = await services.store.get_project("other")
    records = [
        AuditRecord(
            at=clock.now,
            kind="access",
            action="verify",
            project_id=project.id,
            token_id=token,
            decision=decision,
            reason=reason,
        )
        for project, token, decision, reason in [
            (shop, shop_token, "allow", "ok"),
            (shop, shop_token, "allow", "ok"),
            (shop, shop_token, "deny", "rate_limited"),
            (other, other_token, "deny", "revoked"),
        ]
    ]
    await services.audit.append(records)
    await services.audit.flush()
    await services.usage.catch_up()
    return shop, shop_token


async def test_usage_page_shows_the_range_chosen(dash, clock, accounts, services):
    p = await owner(dash, clock, accounts)
    _, shop_token = await _traffic(services, clock)
    page = await p.get("/dashboard/usage", params={"project": "shop", "range": "24h"})
    assert page.status_code == 200
    assert "<strong>3</strong> requests" in page.text and "<strong>1</strong> denied" in page.text
    assert "<svg" in page.text and "rate_limited" in page.text and "revoked" not in page.text
    everything = await p.get("/dashboard/usage", params={"range": "1h"})
    assert "<strong>4</strong> requests" in everything.text and "per minute" in everything.text
    by_token = await p.get("/dashboard/usage", params={"token": shop_token, "range": "7d"})
    assert "<strong>3</strong> requests" in by_token.text
    assert (await p.get("/dashboard/usage", params={"range": "1y"})).status_code == 400
    assert (await p.get("/dashboard/usage", params={"colour": "red"})).status_code == 400


async def test_a_member_sees_only_their_projects_usage(dash, clock, accounts, services):
    await owner(dash, clock, accounts)
    shop, _ = await _traffic(services, clock)
    await accounts.create_user("vera", Role.VIEWER, password=PASSWORD, project_ids=[shop.id])
    v = person(dash, clock)
    await v.sign_in("vera")
    mine = await v.get("/dashboard/usage")
    assert mine.status_code == 200 and "<strong>3</strong> requests" in mine.text
    assert (await v.get("/dashboard/usage", params={"project": "other"})).status_code == 404
