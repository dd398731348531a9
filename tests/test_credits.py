"""Credits: a cost per request and remaining uses that refill, exact under concurrency across
replicas, on SQLite and PostgreSQL (the same tests as plain remaining uses)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from tests.conftest import two_replicas
from tests.gateway.support import use_policy
from tokenward.app import Services, create_asgi
from tokenward.gateway.config import ConfigError, parse_policy
from tokenward.service import Issued, TokenSpec, issue_bootstrap_record
from tokenward.tokens.credits import parse_refill
from tokenward.tokens.model import Reason


async def make(services: Services, admin: Issued, **fields) -> Issued:
    if await services.store.get_project("app") is None:
        await services.tokens.create_project(admin.record, "app")
    return await services.tokens.create_token(
        admin.record, TokenSpec(project="app", scopes=["records:read"], **fields)
    )


async def bootstrap(services: Services) -> Issued:
    admin = issue_bootstrap_record(services.hasher, services.verifier.clock())
    await services.store.insert_token(admin.record, services.hasher.hash(admin.secret))
    return admin


def patient(*replicas: Services) -> None:
    """These tests prove exactness, not speed: on a loaded machine, concurrent writers may
    wait for the database longer than the verifier's default bound (an ``unavailable``)."""
    for replica in replicas:
        replica.verifier.store_timeout = 60.0


def frozen(*replicas: Services, at: datetime) -> None:
    for replica in replicas:
        replica.verifier.clock = lambda: at


async def test_a_cost_spends_that_many_credits(services, admin):
    issued = await make(services, admin, uses=10)
    first = await services.verifier.verify(issued.secret, cost=4)
    assert first.allowed and first.remaining_uses == 6
    assert (await services.verifier.verify(issued.secret, cost=6)).remaining_uses == 0
    denied = await services.verifier.verify(issued.secret, cost=1)
    assert denied.reason is Reason.USES_EXHAUSTED and denied.remaining_uses == 0


async def test_a_cost_above_what_is_left_is_denied_and_spends_nothing(services, admin):
    issued = await make(services, admin, uses=5)
    denied = await services.verifier.verify(issued.secret, cost=6)
    assert denied.reason is Reason.USES_EXHAUSTED and denied.remaining_uses == 5
    assert denied.as_dict()["remaining_uses"] == 5
    assert (await services.store.get_token(issued.record.id)).remaining_uses == 5
    assert (await services.verifier.verify(issued.secret, cost=5)).remaining_uses == 0


async def test_cost_zero_needs_a_credit_and_spends_none(services, admin):
    issued = await make(services, admin, uses=1)
    assert (await services.verifier.verify(issued.secret, cost=0)).remaining_uses == 1
    assert (await services.verifier.verify(issued.secret)).remaining_uses == 0
    assert (await services.verifier.verify(issued.secret, cost=0)).reason is Reason.USES_EXHAUSTED


async def test_a_token_without_uses_ignores_the_cost(services, admin):
    issued = await make(services, admin)
    decision = await services.verifier.verify(issued.secret, cost=1000)
    assert decision.allowed and decision.remaining_uses is None


async def test_a_refill_sets_the_credits_back_at_the_boundary(services, admin):
    start = datetime(2026, 3, 4, 10, 30, tzinfo=UTC)
    frozen(services, at=start)
    issued = await make(services, admin, refill=parse_refill("3/hour"))
    assert issued.record.remaining_uses == 3  # uses default to the amount
    results = [await services.verifier.verify(issued.secret) for _ in range(4)]
    assert [r.allowed for r in results] == [True, True, True, False]
    frozen(services, at=datetime(2026, 3, 4, 10, 59, 59, 999999, tzinfo=UTC))
    assert (await services.verifier.verify(issued.secret)).reason is Reason.USES_EXHAUSTED
    frozen(services, at=datetime(2026, 3, 4, 11, tzinfo=UTC))
    refilled = await services.verifier.verify(issued.secret)
    assert refilled.allowed and refilled.remaining_uses == 2
    # Unused credits do not pile up: two hours later it is 3 again, not 3 + 2.
    frozen(services, at=datetime(2026, 3, 4, 13, 5, tzinfo=UTC))
    assert (await services.verifier.verify(issued.secret)).remaining_uses == 2
    record = await services.store.get_token(issued.record.id)
    assert record.refilled_at == datetime(2026, 3, 4, 13, tzinfo=UTC)
    assert record.public()["refill"] == {
        "amount": 3,
        "interval": "hour",
        "day": None,
        "refilled_at": "2026-03-04T13:00:00Z",
    }


async def test_a_monthly_refill_on_its_day(services, admin):
    frozen(services, at=datetime(2026, 1, 20, tzinfo=UTC))
    issued = await make(services, admin, uses=1, refill=parse_refill("100/month", 15))
    assert (await services.verifier.verify(issued.secret)).remaining_uses == 0
    frozen(services, at=datetime(2026, 2, 14, 23, 59, tzinfo=UTC))
    assert not (await services.verifier.verify(issued.secret)).allowed
    frozen(services, at=datetime(2026, 2, 15, tzinfo=UTC))
    assert (await services.verifier.verify(issued.secret, cost=10)).remaining_uses == 90


async def test_introspection_counts_a_refill_that_is_due(services, admin):
    frozen(services, at=datetime(2026, 3, 4, 10, tzinfo=UTC))
    issued = await make(services, admin, refill=parse_refill("1/day"))
    assert (await services.verifier.verify(issued.secret)).allowed
    peek = await services.verifier.verify(issued.secret, consume=False)
    assert peek.reason is Reason.USES_EXHAUSTED
    frozen(services, at=datetime(2026, 3, 5, tzinfo=UTC))
    peek = await services.verifier.verify(issued.secret, consume=False)
    assert peek.allowed and peek.remaining_uses == 1


async def test_a_rotated_token_keeps_its_refill_and_shares_the_budget(services, admin):
    frozen(services, at=datetime(2026, 3, 4, 10, tzinfo=UTC))
    old = await make(services, admin, refill=parse_refill("4/day"))
    assert (await services.verifier.verify(old.secret)).remaining_uses == 3
    new, _ = await services.tokens.rotate_token(admin.record, old.record.id, timedelta(hours=1))
    assert new.record.refill == old.record.refill
    assert (await services.verifier.verify(old.secret)).remaining_uses == 2
    assert (await services.verifier.verify(new.secret, cost=2)).remaining_uses == 0
    frozen(services, at=datetime(2026, 3, 5, tzinfo=UTC))
    assert (await services.verifier.verify(new.secret)).remaining_uses == 3


async def test_costs_are_exact_across_two_replicas(settings):
    """N concurrent requests on two replicas spend exactly the credits, never below zero."""
    async with two_replicas(settings) as (a, b):
        patient(a, b)
        admin = await bootstrap(a)
        issued = await make(a, admin, uses=100)
        decisions = await asyncio.gather(
            *(
                (a if i % 2 else b).verifier.verify(issued.secret, cost=7)
                for i in range(40)  # 280 asked for, 100 there: 14 requests fit
            )
        )
        allowed = [d for d in decisions if d.allowed]
        assert len(allowed) == 14
        assert sorted(d.remaining_uses for d in allowed) == sorted(
            100 - 7 * n for n in range(1, 15)
        )
        assert {d.reason for d in decisions if not d.allowed} == {Reason.USES_EXHAUSTED}
        assert all(d.remaining_uses == 2 for d in decisions if not d.allowed)
        assert (await a.store.get_token(issued.record.id)).remaining_uses == 2


async def test_a_refill_at_the_boundary_is_counted_once_across_replicas(settings):
    """Both replicas see the period end at once: the refill happens once, not per replica
    nor per request, and exactly the refilled credits are spent."""
    async with two_replicas(settings) as (a, b):
        patient(a, b)
        frozen(a, b, at=datetime(2026, 3, 4, 23, 59, tzinfo=UTC))
        admin = await bootstrap(a)
        issued = await make(a, admin, refill=parse_refill("10/day"))
        for replica in (a, b):  # both replicas have it cached, with its old state
            assert (await replica.verifier.verify(issued.secret)).allowed
        gone = await asyncio.gather(*(b.verifier.verify(issued.secret) for _ in range(12)))
        assert sum(d.allowed for d in gone) == 8
        assert {d.reason for d in gone if not d.allowed} == {Reason.USES_EXHAUSTED}
        frozen(a, b, at=datetime(2026, 3, 5, 0, 0, tzinfo=UTC))
        decisions = await asyncio.gather(
            *((a if i % 2 else b).verifier.verify(issued.secret, cost=2) for i in range(30))
        )
        allowed = [d for d in decisions if d.allowed]
        assert {d.reason for d in decisions if not d.allowed} == {Reason.USES_EXHAUSTED}
        assert len(allowed) == 5
        assert sorted(d.remaining_uses for d in allowed) == [0, 2, 4, 6, 8]
        assert (await a.store.get_token(issued.record.id)).remaining_uses == 0


COSTLY_POLICY = """
[[routes]]
path = "/search/{rest:path}"
methods = ["GET"]
scope = "records:read"
cost = 5

[[routes]]
path = "/free/{rest:path}"
methods = ["GET"]
scope = "records:read"
cost = 0
"""


async def test_authz_names_the_identity_to_the_upstream(services, admin):
    use_policy(services, COSTLY_POLICY)
    await services.tokens.create_project(admin.record, "app")
    await services.identities.create(admin.record, "app", "user_123")
    issued = await make(services, admin, identity="user_123")
    plain = await make(services, admin)
    transport = httpx.ASGITransport(app=create_asgi(services=services), client=("127.0.0.1", 1))
    async with httpx.AsyncClient(transport=transport, base_url="http://tokenward.test") as c:
        asked = {"X-Original-Method": "GET", "X-Original-URI": "/free/x"}
        owned = await c.get("/authz", headers={**asked, "Authorization": f"Bearer {issued.secret}"})
        other = await c.get("/authz", headers={**asked, "Authorization": f"Bearer {plain.secret}"})
    assert owned.headers["x-tokenward-identity"] == "user_123"
    assert "x-tokenward-identity" not in other.headers


async def test_a_gateway_route_spends_its_cost(services, admin):
    """``cost = 5`` on a route: /authz spends five credits per allowed request."""
    use_policy(services, COSTLY_POLICY)
    issued = await make(services, admin, uses=12)
    transport = httpx.ASGITransport(app=create_asgi(services=services), client=("127.0.0.1", 1))
    headers = {"Authorization": f"Bearer {issued.secret}", "X-Original-Method": "GET"}
    async with httpx.AsyncClient(transport=transport, base_url="http://tokenward.test") as c:
        statuses = [
            (await c.get("/authz", headers={**headers, "X-Original-URI": "/search/x"})).status_code
            for _ in range(3)
        ]
        free = await c.get("/authz", headers={**headers, "X-Original-URI": "/free/x"})
    assert statuses == [200, 200, 401]  # 12 - 5 - 5 = 2 left: not enough for a third
    assert free.status_code == 200  # cost 0: a credit is left (2), none spent
    assert (await services.store.get_token(issued.record.id)).remaining_uses == 2


def test_a_route_cost_must_be_a_small_whole_number():
    assert parse_policy(COSTLY_POLICY, "t.toml").routes[0].cost == 5
    for bad in ("-1", "1.5", '"5"', "true", "1000001"):
        with pytest.raises(ConfigError, match="routes\\[0\\].cost: must be an integer"):
            parse_policy(COSTLY_POLICY.replace("cost = 5", f"cost = {bad}"), "t.toml")
