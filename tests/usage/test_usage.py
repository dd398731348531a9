"""Usage analytics: counted once from the audit log, per minute/hour/day, tenant-bounded."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from sqlalchemy import func, insert, select

from tokenward.service import TokenSpec
from tokenward.tokens.format import generate_token
from tokenward.usage import UsageRollup
from tokenward.usage.rollup import epoch_minute
from tokenward.usage.tables import usage_hours, usage_minutes

from ..api.test_bad_input import assert_clean_error


async def make_token(services, admin, project, **fields):
    if await services.store.get_project(project) is None:
        await services.tokens.create_project(admin.record, project)
    fields.setdefault("scopes", ["records:read"])
    return await services.tokens.create_token(admin.record, TokenSpec(project=project, **fields))


@pytest.fixture
async def traffic(services, admin, api):
    """shop: 3 allowed, 2 denied for scope; other: 1 allowed; 1 unknown token."""
    shop = await make_token(services, admin, "shop")
    other = await make_token(services, admin, "other")
    calls = [(shop, "records:read")] * 3 + [(shop, "records:write")] * 2 + [(other, None)]
    for issued, scope in calls:
        body = {"token": issued.secret} | ({"scope": scope} if scope else {})
        assert (await api.post("/v1/verify", json=body)).status_code == 200
    await api.post("/v1/verify", json={"token": generate_token("live")})
    await services.audit.flush()
    await services.usage.catch_up()
    return shop, other


def _range(services, granularity):
    now = services.verifier.clock()
    return {
        "from": (now - timedelta(hours=2)).isoformat(),
        "to": (now + timedelta(minutes=1)).isoformat(),
        "granularity": granularity,
    }


@pytest.mark.parametrize("granularity", ["minute", "hour", "day"], ids=["minute", "hour", "day"])
async def test_counts_per_project_token_and_overall(api, services, traffic, granularity):
    shop, _ = traffic
    params = _range(services, granularity)
    everything = (await api.get("/v1/usage", params=params)).json()
    assert everything["totals"]["requests"] == 7
    assert everything["totals"]["denied_by_reason"] == {"insufficient_scope": 2, "unknown": 1}
    by_project = (await api.get("/v1/usage", params={**params, "project": "shop"})).json()
    assert by_project["totals"] == {
        "requests": 5,
        "allowed": 3,
        "denied": 2,
        "denied_by_reason": {"insufficient_scope": 2},
    }
    by_token = (await api.get("/v1/usage", params={**params, "token": shop.record.id})).json()
    assert by_token["totals"] == by_project["totals"]
    buckets = by_token["buckets"]
    assert by_token["granularity"] == granularity
    assert len({b["start"] for b in buckets}) == len(buckets)  # dense, one per bucket
    assert sum(b["requests"] for b in buckets) == 5
    step = {"minute": 60, "hour": 3600, "day": 86400}[granularity]
    assert len(buckets) * step >= 2 * 3600


async def test_each_event_is_counted_once_even_with_two_rollups(api, services, traffic):
    assert await services.usage.catch_up() == 0
    shop, _ = traffic
    for _ in range(4):
        await api.post("/v1/verify", json={"token": shop.secret, "scope": "records:read"})
    await services.audit.flush()
    other = UsageRollup(services.engine, services.verifier.clock, batch=1)
    await asyncio.gather(services.usage.catch_up(), other.catch_up(), other.catch_up())
    params = {**_range(services, "hour"), "project": "shop"}
    totals = (await api.get("/v1/usage", params=params)).json()["totals"]
    assert totals["allowed"] == 7 and totals["requests"] == 9


async def test_a_project_bound_caller_sees_its_project_only(api, services, admin, traffic):
    _, other = traffic
    reader = await make_token(services, admin, "shop", scopes=["admin:read"])
    headers = {"Authorization": f"Bearer {reader.secret}"}
    params = _range(services, "hour")
    mine = (await api.get("/v1/usage", params=params, headers=headers)).json()
    assert mine["totals"]["requests"] == 5  # not other's, not the unknown credential's
    foreign = await api.get(
        "/v1/usage", params={**params, "token": other.record.id}, headers=headers
    )
    assert_clean_error(foreign, 404)
    project = await api.get("/v1/usage", params={**params, "project": "other"}, headers=headers)
    assert_clean_error(project, 404)


@pytest.mark.parametrize(
    "params",
    [
        {"granularity": "week"},
        {"from": "2030-01-02T00:00:00Z", "to": "2030-01-01T00:00:00Z"},
        {"from": "2020-01-01T00:00:00Z", "to": "2030-01-01T00:00:00Z", "granularity": "minute"},
        {"from": "yesterday"},
        {"colour": "red"},
        {"token": "tok x"},
    ],
    ids=["granularity", "reversed", "too-many-buckets", "bad-time", "unknown", "bad-token"],
)
async def test_bad_ranges_and_parameters_are_clear_errors(api, params):
    assert_clean_error(await api.get("/v1/usage", params=params), 422)


async def test_identity_filter_is_refused_cleanly_without_identities(api, services):
    from tokenward.usage.query import identities_supported

    response = await api.get("/v1/usage", params={"identity": "idn_x"})
    if identities_supported():
        assert response.status_code == 200
        assert response.json()["totals"]["requests"] == 0
    else:
        assert_clean_error(response, 422)
        assert response.json()["error"] == "identities_unsupported"


async def test_old_counts_are_pruned(services):
    now = services.verifier.clock()
    old = epoch_minute(now - timedelta(days=services.usage.minute_days + 1))
    row = {"project_id": "p", "token_id": "t", "decision": "allow", "reason": "ok", "count": 1}
    async with services.engine.begin() as conn:
        await conn.execute(insert(usage_minutes).values(minute=old, **row))
        await conn.execute(insert(usage_minutes).values(minute=epoch_minute(now), **row))
        await conn.execute(insert(usage_hours).values(hour=0, **row))
    await services.usage.prune(now)
    async with services.engine.connect() as conn:
        minutes = (await conn.execute(select(func.count()).select_from(usage_minutes))).scalar()
        hours = (await conn.execute(select(func.count()).select_from(usage_hours))).scalar()
    assert minutes == 1 and hours == 0
