"""An update or a disable made on one replica holds on the other at once (Redis fan-out),
however long the other's cache would have kept the old settings."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import httpx
import pytest

from tests.conftest import REDIS_URL, two_replicas
from tokenward.app import Services, create_asgi
from tokenward.service import issue_bootstrap_record

#: how long the test waits for the other replica at most (its cache TTL is 300 s)
PATIENCE = 2.0


@contextlib.asynccontextmanager
async def http(services: Services, secret: str) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=create_asgi(services=services), client=("10.1.1.1", 1))
    async with httpx.AsyncClient(
        transport=transport,
        base_url="http://tokenward.test",
        headers={"Authorization": f"Bearer {secret}"},
    ) as client:
        yield client


@pytest.fixture
async def pair(pg_database, settings):
    """Two app instances on one PostgreSQL database, sharing one Redis."""
    settings = settings.model_copy(
        update={"database_url": pg_database, "redis_url": REDIS_URL, "cache_ttl": 300.0}
    )
    async with two_replicas(settings) as (a, b):
        admin = issue_bootstrap_record(a.hasher, a.verifier.clock())
        await a.store.insert_token(admin.record, a.hasher.hash(admin.secret))
        async with http(a, admin.secret) as api_a, http(b, admin.secret) as api_b:
            yield a, b, api_a, api_b


async def until_b_says(api_b: httpx.AsyncClient, secret: str, want: str, **fields) -> None:
    """Verify on B until it answers ``want``; the fan-out is a message, so it may take a
    moment, never the cache TTL."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + PATIENCE
    while True:
        body = (await api_b.post("/v1/verify", json={"token": secret, **fields})).json()
        if body["reason"] == want:
            return
        assert loop.time() < deadline, f"replica B still answers {body['reason']}"
        await asyncio.sleep(0.005)


async def test_update_and_disable_reach_the_other_replica_at_once(pair):
    a, b, api_a, api_b = pair
    await api_a.post("/v1/projects", json={"name": "app"})
    made = await api_a.post(
        "/v1/tokens", json={"project": "app", "scopes": ["records:read", "records:write"]}
    )
    token = made.json()
    secret, path = token["token"], f"/v1/tokens/{token['id']}"
    for _ in range(2):
        allowed = await api_b.post("/v1/verify", json={"token": secret, "scope": "records:write"})
        assert allowed.json()["valid"]
    assert b.verifier.hits >= 1  # B serves the token from its cache

    narrowed = await api_a.patch(path, json={"scopes": ["records:read"]})
    assert narrowed.status_code == 200, narrowed.text
    await until_b_says(api_b, secret, "insufficient_scope", scope="records:write")

    await api_b.post("/v1/verify", json={"token": secret})  # cached again on B
    assert (await api_a.post(f"{path}/disable", json={"reason": "on hold"})).status_code == 200
    await until_b_says(api_b, secret, "disabled")

    assert (await api_a.post(f"{path}/enable", json={})).status_code == 200
    await until_b_says(api_b, secret, "ok")
