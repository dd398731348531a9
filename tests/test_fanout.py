"""Invariant 2: a revocation reaches every replica's cache at once (measured, bounded)."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.conftest import REDIS_URL, truncate_all, two_replicas
from tokenward.app import open_services
from tokenward.service import TokenSpec, issue_bootstrap_record
from tokenward.tokens.model import Reason


@pytest.fixture(params=["redis", "postgres-notify"])
async def replicas(request, pg_database, settings, tmp_path):
    """Two replicas on one PostgreSQL database, with a cache TTL far above the bound."""
    if request.param == "redis":
        settings = settings.model_copy(update={"redis_url": REDIS_URL})
    settings = settings.model_copy(update={"database_url": pg_database, "cache_ttl": 300.0})
    async with two_replicas(settings) as pair:
        yield pair


async def test_revocation_reaches_the_other_replica(replicas):
    a, b = replicas
    from tokenward.service import issue_bootstrap_record

    admin = issue_bootstrap_record(a.hasher, a.verifier.clock())
    await a.store.insert_token(admin.record, a.hasher.hash(admin.secret))
    await a.tokens.create_project(admin.record, "app")
    issued = await a.tokens.create_token(admin.record, TokenSpec(project="app", scopes=["x:y"]))
    assert (await b.verifier.verify(issued.secret)).allowed
    hits = b.verifier.hits
    assert (await b.verifier.verify(issued.secret)).allowed
    assert b.verifier.hits == hits + 1  # B serves it from its cache now

    started = time.perf_counter()
    await a.tokens.revoke_token(admin.record, issued.record.id, "leaked")
    while True:
        decision = await b.verifier.verify(issued.secret)
        if decision.reason is Reason.REVOKED:
            break
        assert time.perf_counter() - started < 2.0, "replica B still serves the revoked token"
        await asyncio.sleep(0.002)
    print(
        f"revocation visible on the other replica after "
        f"{(time.perf_counter() - started) * 1000:.1f} ms"
    )


async def test_cache_is_off_while_not_subscribed(settings):
    settings = settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    svc = await open_services(settings)  # Redis unreachable: never subscribed
    try:
        assert svc.verifier.cache_enabled is False
    finally:
        await svc.close()


async def test_every_redis_key_lives_under_the_configured_prefix(settings):
    """Rate-limit counters, like the revocation channel, sit under TOKENWARD_REDIS_PREFIX."""
    import secrets as _secrets

    from redis.asyncio import Redis

    prefix = f"twtest-{_secrets.token_hex(4)}:"
    settings = settings.model_copy(update={"redis_url": REDIS_URL, "redis_prefix": prefix})
    services = await open_services(settings)
    await truncate_all(services)
    try:
        admin = issue_bootstrap_record(services.hasher, services.verifier.clock())
        await services.store.insert_token(admin.record, services.hasher.hash(admin.secret))
        await services.tokens.create_project(admin.record, "app")
        issued = await services.tokens.create_token(
            admin.record, TokenSpec(project="app", scopes=["records:read"], rate_limit=["5/minute"])
        )
        decision = await services.verifier.verify(issued.secret, scope="records:read")
        assert decision.allowed and decision.ratelimit is not None
        redis = Redis.from_url(REDIS_URL)
        try:
            keys = [k.decode() async for k in redis.scan_iter(match=f"{prefix}*")]
            assert keys and any(issued.record.id in k for k in keys)
            await redis.delete(*keys)
        finally:
            await redis.aclose()
    finally:
        await services.close()
