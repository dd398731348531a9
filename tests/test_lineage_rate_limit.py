"""A key's rate limit is one budget for the key and everything minted from it (exchange,
narrowing, refresh, rotation), counted in memory and in Redis, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import importlib.util
import secrets
from pathlib import Path

import pytest
from sqlalchemy import select, update

from tests.conftest import REDIS_URL
from tests.test_oauth_exchange import api_key, exchange, refresh
from tokenward.settings import Settings
from tokenward.store.engine import MIGRATIONS
from tokenward.store.tables import tokens


@pytest.fixture(params=["memory", "redis"])
def settings(request: pytest.FixtureRequest, database_url: str, tmp_path: Path) -> Settings:
    """This module's settings: the conftest ones, with in-process or Redis rate limits."""
    base = Settings(data_dir=tmp_path, database_url=database_url, secret_key=secrets.token_hex(32))
    if request.param == "memory":
        return base
    prefix = f"tw-lineage-{secrets.token_hex(4)}:"
    return base.model_copy(update={"redis_url": REDIS_URL, "redis_prefix": prefix})


async def allowed(services, secret: str, times: int) -> int:
    decisions = [await services.verifier.verify(secret) for _ in range(times)]
    return sum(d.allowed for d in decisions)


async def test_exchanged_tokens_share_the_keys_budget(api, services):
    """A key with 5/minute, exchanged 4 times: 5 requests in all, not 1 + 4 × 5."""
    key = await api_key(api, rate_limit="5/minute")
    bodies = []
    for _ in range(4):  # each exchange presents the key: 4 of its 5 hits
        response = await exchange(api, key["token"])
        assert response.status_code == 200, response.text
        bodies.append(response.json())
    total = await allowed(services, key["token"], 5)
    for body in bodies:
        total += await allowed(services, body["access_token"], 5)
    assert total == 1
    denied = await services.verifier.verify(bodies[0]["access_token"])
    assert denied.reason.value == "rate_limited" and denied.ratelimit.remaining == 0


async def test_the_whole_lineage_shares_one_counter(api, services):
    """Narrowed, refreshed and rotated descendants all count on the origin's counter."""
    key = await api_key(api, rate_limit="8/minute")
    first = (await exchange(api, key["token"])).json()  # hit 1
    narrowed = (await exchange(api, first["access_token"], scope="files:read")).json()  # 2
    refreshed = (await refresh(api, first["refresh_token"])).json()  # no hit: a refresh grant
    again = (await refresh(api, refreshed["refresh_token"])).json()
    rotated = await api.post(f"/v1/tokens/{key['id']}/rotate", json={"grace": "1h"})
    assert rotated.status_code == 201, rotated.text
    successor = rotated.json()
    from_successor = (await exchange(api, successor["token"])).json()  # 3
    lineage = [
        key["token"],
        successor["token"],
        first["access_token"],
        narrowed["access_token"],
        refreshed["access_token"],
        again["access_token"],
        from_successor["access_token"],
    ]
    total = 0
    for secret in lineage:
        total += await allowed(services, secret, 3)
    assert total == 8 - 3
    for body in (narrowed, refreshed, again, from_successor):
        record = await services.store.get_token(body["token_id"])
        assert record.rate_limit_counter == key["id"]


async def test_the_shared_budget_is_exact_under_concurrency(api, services):
    """Many verifications at once, spread over a key's lineage, allow exactly its limit."""
    key = await api_key(api, rate_limit="20/minute")
    bodies = [(await exchange(api, key["token"])).json() for _ in range(3)]  # 3 hits
    secrets_ = [key["token"], *(b["access_token"] for b in bodies)]
    decisions = await asyncio.gather(
        *(services.verifier.verify(secrets_[i % len(secrets_)]) for i in range(60))
    )
    assert sum(d.allowed for d in decisions) == 20 - 3


async def test_other_keys_keep_their_own_budget(api, services):
    one = await api_key(api, rate_limit="2/minute")
    other = await api_key(api, rate_limit="2/minute")
    body = (await exchange(api, one["token"])).json()
    assert await allowed(services, body["access_token"], 3) == 1
    assert await allowed(services, other["token"], 3) == 2


def _migration():
    path = Path(MIGRATIONS) / "versions" / "0008_rate_limit_key.py"
    spec = importlib.util.spec_from_file_location("migration_0008", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_migration_gives_existing_tokens_their_lineages_counter(api, services):
    key = await api_key(api, rate_limit="5/minute")
    first = (await exchange(api, key["token"])).json()
    narrowed = (await exchange(api, first["access_token"], scope="files:read")).json()
    refreshed = (await refresh(api, first["refresh_token"])).json()
    successor = (await api.post(f"/v1/tokens/{key['id']}/rotate", json={"grace": "1h"})).json()
    from_successor = (await exchange(api, successor["token"])).json()
    async with services.engine.begin() as conn:
        before = dict((await conn.execute(select(tokens.c.id, tokens.c.rate_limit_key))).all())
        await conn.execute(update(tokens).values(rate_limit_key=None))
        await conn.run_sync(_migration()._backfill)
        after = dict((await conn.execute(select(tokens.c.id, tokens.c.rate_limit_key))).all())
    assert after == before
    for body in (first, narrowed, refreshed, from_successor):
        assert after[body["token_id"]] == key["id"]
    assert after[successor["id"]] == key["id"] and after[key["id"]] is None
