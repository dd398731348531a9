"""Lifecycle webhooks through the API: endpoints per project, signed deliveries, retries,
a queue that survives a restart and has a bound, the delivery log, tenant isolation."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import text

from tests.conftest import truncate_all
from tests.webhook_receiver import Receiver
from tokenward.app import open_services
from tokenward.service import TokenSpec, issue_bootstrap_record
from tokenward.webhooks.signing import verify_signature
from tokenward.webhooks.store import new_endpoint

from ..api.test_bad_input import assert_clean_error


@pytest.fixture
def receiver():
    server = Receiver()
    yield server
    server.close()


@pytest.fixture
def fast(services):
    services.webhooks.backoff = 0.01
    return services.webhooks


async def add(api, url, **body):
    response = await api.post("/v1/webhooks", json={"url": url, **body})
    assert response.status_code == 201, response.text
    return response.json()


async def project(api, name):
    assert (await api.post("/v1/projects", json={"name": name})).status_code in (201, 409)


async def token(api, name, **fields):
    response = await api.post("/v1/tokens", json={"project": name, "scopes": ["a:b"], **fields})
    assert response.status_code == 201, response.text
    return response.json()


async def test_lifecycle_events_are_signed_and_per_project(api, services, fast, receiver):
    await project(api, "shop")
    await project(api, "other")
    hook = await add(api, receiver.url, project="shop", events=["token.created", "token.revoked"])
    assert hook["secret"].startswith("whsec_") and hook["project"] == "shop"
    everything = await add(api, receiver.url, description="all projects")
    created = await token(api, "shop")
    await api.post(f"/v1/tokens/{created['id']}/revoke", json={"reason": "done"})
    await api.post(f"/v1/tokens/{created['id']}/rotate", json={"grace": "0"})  # refused: revoked
    await token(api, "other")
    await fast.drain()
    mine = [
        d for d in receiver.received if verify_signature(hook["secret"], d["raw"], d["headers"])
    ]
    assert sorted(d["body"]["type"] for d in mine) == ["token.created", "token.revoked"]
    assert all(d["body"]["data"]["token_id"] == created["id"] for d in mine)
    # the server-wide endpoint got all three (two projects), signed with its own secret
    wide = [
        d
        for d in receiver.received
        if verify_signature(everything["secret"], d["raw"], d["headers"])
    ]
    assert sorted(d["body"]["type"] for d in wide) == [
        "token.created",
        "token.created",
        "token.revoked",
    ]
    log = (await api.get(f"/v1/webhooks/{hook['id']}/deliveries")).json()["deliveries"]
    assert [(d["type"], d["status"], d["attempts"]) for d in log] == [
        ("token.revoked", "delivered", 1),
        ("token.created", "delivered", 1),
    ]
    # the secret is shown once and never stored in clear
    shown = (await api.get(f"/v1/webhooks/{hook['id']}")).json()
    assert "secret" not in shown
    async with services.engine.connect() as conn:
        dump = repr((await conn.execute(text("SELECT * FROM webhook_endpoints"))).all())
    assert hook["secret"] not in dump and everything["secret"] not in dump


async def test_retried_with_backoff_then_failed_after_the_bound(api, services, fast, receiver):
    await project(api, "shop")
    hook = await add(api, receiver.url, project="shop", events=["token.created"])
    receiver.statuses = [500, 502, 200]
    await token(api, "shop")
    await fast.drain()
    [delivery] = (await api.get(f"/v1/webhooks/{hook['id']}/deliveries")).json()["deliveries"]
    assert delivery["status"] == "delivered" and delivery["attempts"] == 3
    assert len({d["headers"]["webhook-id"] for d in receiver.received}) == 1  # one id
    fast.max_attempts = 2
    receiver.statuses = [503, 503]
    await token(api, "shop")
    await fast.drain()
    latest = (await api.get(f"/v1/webhooks/{hook['id']}/deliveries")).json()["deliveries"][0]
    assert latest["status"] == "failed" and latest["attempts"] == 2
    assert latest["last_status"] == 503 and latest["last_error"] == "HTTP 503"


async def test_backoff_grows_with_jitter(services):
    sender = services.webhooks
    sender.backoff = 1.0
    for attempt in (1, 2, 5, 30):
        base = min(2 ** (attempt - 1), 3600)
        delays = {sender.delay(attempt) for _ in range(20)}
        assert all(0.5 * base <= d <= 1.5 * base for d in delays) and len(delays) > 1


async def test_pending_deliveries_survive_a_restart(settings, receiver):
    first = await open_services(settings)
    await truncate_all(first)
    try:
        issued = issue_bootstrap_record(first.hasher, first.verifier.clock())
        await first.store.insert_token(issued.record, first.hasher.hash(issued.secret))
        await first.tokens.create_project(issued.record, "shop")
        shop = await first.store.get_project("shop")
        endpoint = new_endpoint(
            shop.id,
            receiver.url,
            ["token.created"],
            first.webhooks.sealer.seal("whsec_" + "QUJD"),
            "",
            first.verifier.clock(),
            None,
        )
        await first.webhooks.store.add_endpoint(endpoint)
        await first.tokens.create_token(issued.record, TokenSpec(project="shop", scopes=["a:b"]))
    finally:
        await first.close()  # nothing was sent: no dispatcher ran
    assert receiver.received == []
    second = await open_services(settings)
    try:
        await second.webhooks.drain()
    finally:
        await second.close()
    [delivery] = receiver.received
    assert delivery["body"]["type"] == "token.created"
    assert verify_signature("whsec_QUJD", delivery["raw"], delivery["headers"])


async def test_the_queue_is_bounded_per_endpoint(api, services, receiver):
    await project(api, "shop")
    hook = await add(api, receiver.url, project="shop", events=["token.created"])
    services.webhooks.queue_size = 2
    for _ in range(3):
        await token(api, "shop")
    log = (await api.get(f"/v1/webhooks/{hook['id']}/deliveries")).json()["deliveries"]
    assert sorted(d["status"] for d in log) == ["dropped", "pending", "pending"]
    assert [d["last_error"] for d in log if d["status"] == "dropped"] == ["queue full"]


async def test_test_delivery_and_removal(api, services, receiver):
    await project(api, "shop")
    hook = await add(api, receiver.url, project="shop")
    result = await api.post(f"/v1/webhooks/{hook['id']}/test")
    assert result.status_code == 200 and result.json()["status"] == "delivered"
    [delivery] = receiver.received
    assert delivery["body"]["type"] == "webhook.test"
    assert verify_signature(hook["secret"], delivery["raw"], delivery["headers"])
    listed = (await api.get("/v1/webhooks", params={"project": "shop"})).json()["webhooks"]
    assert [w["id"] for w in listed] == [hook["id"]]
    assert (await api.delete(f"/v1/webhooks/{hook['id']}")).status_code == 204
    assert_clean_error(await api.get(f"/v1/webhooks/{hook['id']}"), 404)
    assert_clean_error(await api.delete(f"/v1/webhooks/{hook['id']}"), 404)


async def test_a_project_bound_caller_sees_and_makes_its_own_only(api, services, admin, receiver):
    await project(api, "shop")
    await project(api, "other")
    theirs = await add(api, receiver.url, project="other")
    wide = await add(api, receiver.url)
    shop = await services.store.get_project("shop")
    writer = await services.tokens.create_token(
        admin.record, TokenSpec(project="shop", scopes=["admin:read", "admin:write"])
    )
    headers = {"Authorization": f"Bearer {writer.secret}"}
    mine = await api.post("/v1/webhooks", json={"url": receiver.url}, headers=headers)
    assert mine.status_code == 201 and mine.json()["project_id"] == shop.id
    listed = (await api.get("/v1/webhooks", headers=headers)).json()["webhooks"]
    assert [w["id"] for w in listed] == [mine.json()["id"]]
    for hook in (theirs, wide):
        assert_clean_error(await api.get(f"/v1/webhooks/{hook['id']}", headers=headers), 404)
        path = f"/v1/webhooks/{hook['id']}/deliveries"
        assert_clean_error(await api.get(path, headers=headers), 404)
    other = await api.post(
        "/v1/webhooks", json={"url": receiver.url, "project": "other"}, headers=headers
    )
    assert_clean_error(other, 404)


@pytest.mark.parametrize(
    "body",
    [
        {"url": "http://hooks.example.com/x"},
        {"url": "https://hooks.example.com/x", "events": ["token.exploded"]},
        {"url": "https://hooks.example.com/x", "events": []},
        {"url": "https://hooks.example.com/x", "colour": "red"},
        {"url": "https://hooks.example.com/x", "project": "nope"},
    ],
    ids=["plain-http", "unknown-event", "no-events", "unknown-field", "unknown-project"],
)
async def test_bad_endpoints_are_clear_errors(api, body):
    assert_clean_error(await api.post("/v1/webhooks", json=body), 404, 422)


async def test_alert_raised_goes_to_project_endpoints(api, services, fast, receiver):
    await project(api, "app")
    hook = await add(api, receiver.url, project="app", events=["alert.raised"])
    canary = await token(api, "app", kind="canary")
    await api.post("/v1/verify", json={"token": canary["token"]})
    await fast.drain()
    [delivery] = receiver.received
    body = delivery["body"]
    assert body["type"] == "alert.raised" and body["data"]["alert"]["detector"] == "canary"
    assert verify_signature(hook["secret"], delivery["raw"], delivery["headers"])
    assert json.dumps(body).find(canary["token"]) == -1
