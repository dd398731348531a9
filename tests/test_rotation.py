"""Automatic rotation, early retirement, expiry warnings, and one runner across replicas."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from sqlalchemy import text

from tests.webhook_receiver import Receiver
from tokenward.oauth.webhooks import verify_signature
from tokenward.rotation.scheduler import LOCK_KEY
from tokenward.tokens.model import Reason


async def tick(services, scheduler, when):
    """One scheduler round with the whole service's clock at ``when``."""
    services.verifier.clock = lambda: when
    return await scheduler.tick()


@pytest.fixture
def receiver():
    server = Receiver()
    yield server
    server.close()


@pytest.fixture
def scheduler(services):
    scheduler = services.sessions.scheduler
    scheduler.sender.backoff = 0.01
    return scheduler


async def rotating_key(api, receiver, **rotation):
    await api.post("/v1/projects", json={"name": "shop"})
    key = (
        await api.post(
            "/v1/tokens", json={"project": "shop", "scopes": ["records:*"], "ttl": "90d"}
        )
    ).json()
    body = {"period": "1d", "grace": "1h", "webhook_url": receiver.url, **rotation}
    response = await api.put(f"/v1/tokens/{key['id']}/rotation", json=body)
    assert response.status_code == 200, response.text
    return key, response.json()


async def test_rotation_delivers_a_signed_successor_and_keeps_the_old_one_in_grace(
    api, services, scheduler, receiver
):
    key, rotation = await rotating_key(api, receiver)
    secret = rotation["webhook_secret"]
    assert secret.startswith("whsec_")
    shown = (await api.get(f"/v1/tokens/{key['id']}/rotation")).json()
    assert "webhook_secret" not in shown and shown["grace"] == 3600
    created = services.verifier.clock()
    early = await tick(services, scheduler, created + timedelta(hours=22))
    assert early.rotated == [] and receiver.received == []

    due = created + timedelta(hours=23, seconds=1)
    report = await tick(services, scheduler, due)
    assert report.rotated == [key["id"]]
    [delivery] = receiver.received
    assert delivery["headers"]["Tokenward-Event"] == "token.rotated"
    assert verify_signature(secret, delivery["raw"], delivery["headers"]["Tokenward-Signature"])
    assert not verify_signature(
        "whsec_wrong", delivery["raw"], delivery["headers"]["Tokenward-Signature"]
    )
    payload = delivery["body"]
    assert payload["previous_id"] == key["id"]
    new_token = payload["token"]
    verifier = services.verifier
    verifier.clock = lambda: due + timedelta(minutes=1)
    assert (await verifier.verify(new_token)).allowed
    assert (await verifier.verify(key["token"])).allowed  # in grace
    verifier.clock = lambda: due + timedelta(hours=1, seconds=1)
    assert (await verifier.verify(key["token"])).reason is Reason.ROTATED
    # The rotation moved to the successor and is due again a period later.
    moved = (await api.get(f"/v1/tokens/{payload['token_id']}/rotation")).json()
    assert moved["previous_id"] == key["id"]
    successor = await services.store.get_token(payload["token_id"])
    assert successor.rotation_period == 86400
    assert (await api.get(f"/v1/tokens/{key['id']}/rotation")).status_code == 404
    # The secret appears in the webhook body only, never in the database.
    async with services.engine.connect() as conn:
        rows = (await conn.execute(text("SELECT * FROM token_rotations"))).all()
    assert secret not in repr(rows) and new_token not in repr(rows)


async def test_quiet_predecessor_is_retired_early(api, services, scheduler, receiver):
    key, _ = await rotating_key(api, receiver, grace="12h", quiet="10m")
    created = services.verifier.clock()
    due = created + timedelta(hours=12, seconds=1)
    assert (await tick(services, scheduler, due)).rotated == [key["id"]]
    assert (await tick(services, scheduler, due + timedelta(minutes=5))).retired == []
    later = due + timedelta(minutes=11)
    report = await tick(services, scheduler, later)
    assert report.retired == [key["id"]]
    services.verifier.clock = lambda: later + timedelta(seconds=1)
    assert (await services.verifier.verify(key["token"])).reason is Reason.ROTATED


async def test_predecessor_in_use_is_not_retired_early(api, services, scheduler, receiver):
    key, _ = await rotating_key(api, receiver, grace="12h", quiet="10m")
    created = services.verifier.clock()
    due = created + timedelta(hours=12, seconds=1)
    await tick(services, scheduler, due)
    in_use = due + timedelta(minutes=9)
    services.verifier.clock = lambda: in_use
    assert (await services.verifier.verify(key["token"])).allowed
    report = await tick(services, scheduler, due + timedelta(minutes=11))
    assert report.retired == []


async def test_failed_delivery_undoes_the_rotation(api, services, scheduler, receiver, events):
    key, _ = await rotating_key(api, receiver)
    receiver.statuses = [500, 502, 503]
    due = services.verifier.clock() + timedelta(hours=23, seconds=1)
    report = await tick(services, scheduler, due)
    assert report.failed == [key["id"]] and len(receiver.received) == 3
    undelivered = receiver.received[0]["body"]["token"]
    assert (await services.verifier.verify(undelivered)).reason is Reason.REVOKED
    old = await services.store.get_token(key["id"])
    assert old.replaced_by is None and old.grace_until is None
    assert (await services.verifier.verify(key["token"])).allowed
    [alert] = [e for e in events.security_events if e.kind == "rotation_delivery_failed"]
    assert alert.token_id == key["id"] and alert.evidence["attempts"] == 1
    rotation = (await api.get(f"/v1/tokens/{key['id']}/rotation")).json()
    assert rotation["attempts"] == 1 and rotation["last_error"] == "HTTP 503"
    # Retried later, with backoff; this time the receiver answers.
    assert (await tick(services, scheduler, due + timedelta(seconds=30))).rotated == []
    assert (await tick(services, scheduler, due + timedelta(minutes=3))).rotated == [key["id"]]


async def test_retries_until_delivered(api, services, scheduler, receiver):
    key, _ = await rotating_key(api, receiver)
    receiver.statuses = [500]
    report = await tick(
        services, scheduler, services.verifier.clock() + timedelta(hours=23, seconds=1)
    )
    assert report.rotated == [key["id"]] and len(receiver.received) == 2


async def test_expiry_warning_is_sent_once(api, services, scheduler, receiver, events):
    await api.post("/v1/projects", json={"name": "shop"})
    soon = (
        await api.post("/v1/tokens", json={"project": "shop", "scopes": ["a:b"], "ttl": "3d"})
    ).json()
    later = (
        await api.post("/v1/tokens", json={"project": "shop", "scopes": ["a:b"], "ttl": "30d"})
    ).json()
    report = await scheduler.tick()
    assert report.warned == [soon["id"]]
    [warning] = [e for e in events.security_events if e.kind == "token_expiring"]
    assert warning.token_id == soon["id"] and warning.evidence["seconds_left"] > 2 * 86400
    assert (await scheduler.tick()).warned == []
    await api.put("/v1/projects/shop/policy", json={"expiry_warning_days": 31})
    assert (await scheduler.tick()).warned == [later["id"]]


async def test_rotation_settings_are_checked(api, receiver):
    await api.post("/v1/projects", json={"name": "shop"})
    key = (await api.post("/v1/tokens", json={"project": "shop", "scopes": ["a:b"]})).json()
    for body, code in [
        ({"period": "1h", "grace": "2h"}, "invalid_grace"),
        ({"period": "30s", "grace": "1s"}, "invalid_period"),
        ({"period": "1d", "webhook_url": "http://example.com/hook"}, "invalid_webhook_url"),
    ]:
        response = await api.put(
            f"/v1/tokens/{key['id']}/rotation", json={"webhook_url": receiver.url, **body}
        )
        assert response.status_code == 422 and response.json()["error"] == code, response.text
    missing = await api.put(
        "/v1/tokens/tok_nope/rotation", json={"period": "1d", "webhook_url": receiver.url}
    )
    assert missing.status_code == 404
    ok = await api.put(
        f"/v1/tokens/{key['id']}/rotation", json={"period": "1d", "webhook_url": receiver.url}
    )
    assert ok.status_code == 200
    assert (await api.delete(f"/v1/tokens/{key['id']}/rotation")).status_code == 204
    assert (await api.get(f"/v1/tokens/{key['id']}/rotation")).status_code == 404


async def test_one_runner_across_replicas(api, services, scheduler, receiver, settings):
    key, _ = await rotating_key(api, receiver)
    due = services.verifier.clock() + timedelta(hours=23, seconds=1)
    if services.engine.dialect.name != "postgresql":
        # SQLite: one process is the runner; overlapping ticks in it do not both run.
        results = await asyncio.gather(
            tick(services, scheduler, due), tick(services, scheduler, due)
        )
        assert sorted(r is None for r in results) == [False, True]
        assert len(receiver.received) == 1
        return
    from tokenward.app import open_services

    replica = await open_services(settings)
    try:
        other = replica.sessions.scheduler
        replica.verifier.clock = lambda: due
        # Another replica holds the lock: this one skips its tick.
        async with replica.engine.connect() as conn:
            await conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": LOCK_KEY})
            assert await tick(services, scheduler, due) is None
            await conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": LOCK_KEY})
        # Both replicas tick at once: the token is rotated exactly once.
        results = await asyncio.gather(tick(services, scheduler, due), other.tick(due))
        rotated = [r.rotated for r in results if r is not None]
        assert sum(len(r) for r in rotated) == 1
        assert len(receiver.received) == 1
    finally:
        await replica.close()


async def test_schedule_follows_a_manual_rotation(api, services, scheduler, receiver):
    key, _ = await rotating_key(api, receiver)
    manual = (await api.post(f"/v1/tokens/{key['id']}/rotate", json={"grace": "0"})).json()
    due = services.verifier.clock() + timedelta(hours=23, seconds=1)
    report = await tick(services, scheduler, due)
    assert report.rotated == [] and receiver.received == []
    moved = (await api.get(f"/v1/tokens/{manual['id']}/rotation")).json()
    assert moved["token_id"] == manual["id"]
    report = await tick(services, scheduler, due + timedelta(days=1))
    assert report.rotated == [manual["id"]]
    assert receiver.received[0]["body"]["previous_id"] == manual["id"]


async def test_no_expiry_warning_for_a_token_rotated_in_time(api, services, scheduler, receiver):
    await api.post("/v1/projects", json={"name": "shop"})
    key = (
        await api.post("/v1/tokens", json={"project": "shop", "scopes": ["a:b"], "ttl": "3d"})
    ).json()
    await api.put(
        f"/v1/tokens/{key['id']}/rotation",
        json={"period": "2d", "grace": "1h", "webhook_url": receiver.url},
    )
    report = await tick(services, scheduler, services.verifier.clock())
    assert report.warned == []
    await api.put(
        f"/v1/tokens/{key['id']}/rotation",
        json={"period": "5d", "grace": "1h", "webhook_url": receiver.url},
    )
    report = await tick(services, scheduler, services.verifier.clock())
    assert report.warned == [key["id"]]
    [delivery] = receiver.received
    assert delivery["body"]["event"] == "token.expiring"
    assert delivery["headers"]["Tokenward-Event"] == "token.expiring"
