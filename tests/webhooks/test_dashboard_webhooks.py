"""The dashboard's webhooks page: add (secret once), test, the log, remove; per project."""

from __future__ import annotations

import re

import pytest

from tests.webhook_receiver import Receiver
from tokenward.dashboard.accounts import Role
from tokenward.webhooks.signing import verify_signature

from ..test_dashboard import PASSWORD, make_token, owner, person


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


async def test_add_test_and_remove_a_webhook(dash, clock, accounts, services, receiver):
    p = await owner(dash, clock, accounts)
    await make_token(services, "shop")
    await p.get("/dashboard/webhooks")
    added = await p.post(
        "/dashboard/webhooks",
        {"url": receiver.url, "project": "shop", "events": "token.revoked"},
    )
    assert added.status_code == 200
    secret = re.search(r'id="webhook-secret">([^<]+)<', added.text).group(1)
    assert secret.startswith("whsec_")
    page = await p.get("/dashboard/webhooks")
    assert secret not in page.text and receiver.url in page.text and "token.revoked" in page.text
    endpoint_id = re.search(r'id="webhook-(whk_[A-Za-z0-9]+)"', page.text).group(1)
    tested = await p.post(f"/dashboard/webhooks/{endpoint_id}/test")
    assert tested.status_code == 200 and "Test delivery delivered: HTTP 200" in tested.text
    [delivery] = receiver.received
    assert verify_signature(secret, delivery["raw"], delivery["headers"])
    assert "delivery-delivered" in tested.text  # the log shows it
    bad = await p.post("/dashboard/webhooks", {"url": "http://example.com/x"})
    assert bad.status_code == 422 and "https" in bad.text
    removed = await p.post(f"/dashboard/webhooks/{endpoint_id}/remove")
    assert removed.status_code == 303
    assert receiver.url not in (await p.get("/dashboard/webhooks")).text


async def test_members_see_their_projects_webhooks_only(dash, clock, accounts, services, receiver):
    p = await owner(dash, clock, accounts)
    await make_token(services, "shop")
    await make_token(services, "other")
    await p.get("/dashboard/webhooks")
    await p.post("/dashboard/webhooks", {"url": receiver.url + "/other", "project": "other"})
    await p.post("/dashboard/webhooks", {"url": receiver.url + "/all"})
    page = await p.get("/dashboard/webhooks")
    other_id = re.search(r'id="webhook-(whk_[A-Za-z0-9]+)"', page.text).group(1)
    shop = await services.store.get_project("shop")
    await accounts.create_user("vera", Role.VIEWER, password=PASSWORD, project_ids=[shop.id])
    v = person(dash, clock)
    await v.sign_in("vera")
    seen = await v.get("/dashboard/webhooks")
    assert seen.status_code == 200
    assert (
        "/other" not in seen.text and "/all" not in seen.text and "Add a webhook" not in seen.text
    )
    assert (await v.post("/dashboard/webhooks", {"url": receiver.url})).status_code == 403
    assert (await v.post(f"/dashboard/webhooks/{other_id}/test")).status_code == 403
