"""Rate limits, in memory and in a real Redis: counting, windows, sharing, expiry, failure."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator

import pytest
from limits import parse
from limits.aio.storage import RedisStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from redis.asyncio import Redis

from tests.conftest import REDIS_URL
from tokenward.errors import Unavailable
from tokenward.limits import RateLimiter, RateResult


@pytest.fixture
def namespace() -> str:
    return "tw-test-" + secrets.token_hex(6)


@pytest.fixture
async def redis() -> AsyncIterator[Redis]:
    client = Redis.from_url(REDIS_URL)
    yield client
    await client.aclose()


@pytest.fixture(params=["memory", "redis"])
async def limiter(request: pytest.FixtureRequest, namespace: str) -> AsyncIterator[RateLimiter]:
    made = RateLimiter(REDIS_URL if request.param == "redis" else None, namespace=namespace)
    yield made
    await made.reset()
    await made.aclose()


async def keys_under(redis: Redis, namespace: str) -> list[bytes]:
    return [key async for key in redis.scan_iter(match=namespace + ":*")]


async def test_counts_down_then_denies(limiter):
    results = [await limiter.hit("tok", ("3/hour",)) for _ in range(4)]
    assert [(r.allowed, r.limit, r.remaining) for r in results] == [
        (True, 3, 2),
        (True, 3, 1),
        (True, 3, 0),
        (False, 3, 0),
    ]
    assert all(0 < r.reset <= 3600 for r in results)


async def test_keys_are_counted_apart(limiter):
    assert (await limiter.hit("a", ("1/hour",))).allowed
    assert (await limiter.hit("b", ("1/hour",))).allowed
    assert not (await limiter.hit("a", ("1/hour",))).allowed


async def test_the_tightest_window_is_reported(limiter):
    first = await limiter.hit("tok", ("10/hour", "3/day", "5/minute"))
    assert first == RateResult(True, 3, 2, first.reset)


async def test_denied_as_soon_as_any_window_is_full(limiter):
    rates = ("10/hour", "2/day", "5/minute")
    assert [(await limiter.hit("tok", rates)).allowed for _ in range(3)] == [True, True, False]
    denied = await limiter.hit("tok", rates)
    assert (denied.allowed, denied.limit, denied.remaining) == (False, 2, 0)
    assert denied.reset > 0
    # Windows before the full one kept their hits (4 of 10), the ones after it did not (2 of 5).
    assert (await limiter.hit("tok", ("10/hour",))).remaining == 10 - 5
    assert (await limiter.hit("tok", ("5/minute",))).remaining == 5 - 3


@pytest.mark.parametrize("windows", [("20/hour",), ("100/minute", "20/hour", "50/day")])
async def test_concurrent_hits_allow_exactly_the_limit(limiter, windows):
    results = await asyncio.gather(*(limiter.hit("tok", windows) for _ in range(60)))
    assert sum(r.allowed for r in results) == 20
    assert sorted(r.remaining for r in results if r.allowed) == list(range(20))


async def test_concurrent_hits_from_replicas_allow_exactly_the_limit(namespace):
    replicas = [RateLimiter(REDIS_URL, namespace=namespace) for _ in range(3)]
    try:
        results = await asyncio.gather(
            *(replicas[i % 3].hit("tok", ("25/hour", "1000/day")) for i in range(90))
        )
        assert sum(r.allowed for r in results) == 25
    finally:
        await replicas[0].reset()
        for replica in replicas:
            await replica.aclose()


async def script_calls(redis: Redis, namespace: str, work) -> list[str]:
    """The commands (not the script's own) that touch ``namespace`` while ``work`` runs."""
    async with redis.monitor() as monitor:
        await work()
        end = f"{namespace}:end"
        await redis.get(end)
        sent = []
        while True:
            command = await asyncio.wait_for(monitor.next_command(), 5)
            if end in command["command"]:
                return sent
            if namespace in command["command"] and command["client_type"] != "lua":
                sent.append(command["command"].split()[0].upper())


async def test_a_check_is_one_round_trip_whatever_its_windows(namespace, redis):
    limiter = RateLimiter(REDIS_URL, namespace=namespace)

    async def work():
        await limiter.hit("tok", ("10/second", "100/hour", "1000/day"))
        await limiter.hit("tok", ("10/second", "100/hour", "1000/day"))
        await limiter.hit("tok", ("5/minute",))

    try:
        await limiter.hit("warm-up", ("1/hour",))  # the script is loaded
        assert await script_calls(redis, namespace, work) == ["EVALSHA"] * 3
    finally:
        await limiter.reset()
        await limiter.aclose()


async def test_concurrent_checks_share_a_round_trip(namespace, redis):
    limiter = RateLimiter(REDIS_URL, namespace=namespace)
    results = []

    async def work():
        results.extend(
            await asyncio.gather(
                *(limiter.hit(f"tok{i % 4}", ("5/hour", "100/day")[: 1 + i % 2]) for i in range(40))
            )
        )

    try:
        await limiter.hit("warm-up", ("1/hour",))
        assert await script_calls(redis, namespace, work) == ["EVALSHA"]
        assert sum(r.allowed for r in results) == 4 * 5
        assert [r.remaining for r in results[:8]] == [4, 4, 4, 4, 3, 3, 3, 3]
    finally:
        await limiter.reset()
        await limiter.aclose()


async def test_a_check_that_fails_does_not_fail_the_others(namespace, redis):
    limiter = RateLimiter(REDIS_URL, namespace=namespace)
    await redis.hset(f"{namespace}:{{LIMITER/bad/5/1/hour}}", "not", "a counter")
    try:
        bad, good = await asyncio.gather(
            limiter.hit("bad", ("5/hour",)),
            limiter.hit("good", ("5/hour",)),
            return_exceptions=True,
        )
        assert isinstance(bad, Unavailable)
        assert good == RateResult(True, 5, 4, 3600)
    finally:
        await limiter.reset()
        await limiter.aclose()


async def test_a_check_cancelled_before_it_is_sent_is_not_counted(namespace):
    limiter = RateLimiter(REDIS_URL, namespace=namespace)
    try:
        first = asyncio.ensure_future(limiter.hit("tok", ("5/hour",)))
        second = asyncio.ensure_future(limiter.hit("tok", ("5/hour",)))
        await asyncio.sleep(0)  # both are queued, the call is not sent yet
        first.cancel()
        assert await second == RateResult(True, 5, 4, 3600)
        assert (await limiter.hit("tok", ("5/hour",))).remaining == 3
        assert first.cancelled()
    finally:
        await limiter.reset()
        await limiter.aclose()


async def test_redis_keys_live_under_the_namespace_and_expire(namespace, redis):
    limiter = RateLimiter(REDIS_URL, namespace=namespace + ":")  # the colon is not doubled
    try:
        await limiter.hit("tok", ("1/second", "5/minute"))
        await asyncio.sleep(1.1)  # the one-second window moves on: current → previous
        await limiter.hit("tok", ("1/second", "5/minute"))
        keys = await keys_under(redis, namespace)
        assert len(keys) == 3  # the second's previous and current, the minute's current
        assert all(key.startswith(f"{namespace}:{{".encode()) for key in keys)
        for key in keys:
            window = 1 if b"/second" in key else 60
            assert 0 < await redis.pttl(key) <= 2 * window * 1000
        await asyncio.sleep(2.1)
        assert not any(b"/second" in key for key in await keys_under(redis, namespace))
    finally:
        await limiter.reset()
        await limiter.aclose()


async def test_counters_are_shared_with_the_library_strategy(namespace):
    """Same keys and arithmetic as ``limits``: replicas of an older release count along."""
    ours = RateLimiter(REDIS_URL, namespace=namespace)
    storage = RedisStorage(f"async+{REDIS_URL}", implementation="redispy", key_prefix=namespace)
    library = SlidingWindowCounterRateLimiter(storage)
    item = parse("4/hour")
    try:
        assert await library.hit(item, "tok")
        assert (await ours.hit("tok", ("4/hour",))).remaining == 2
        assert await library.hit(item, "tok")
        stats = await library.get_window_stats(item, "tok")
        assert stats.remaining == 1
        assert (await ours.hit("tok", ("4/hour",))).remaining == 0
        assert not await library.hit(item, "tok")
        assert not (await ours.hit("tok", ("4/hour",))).allowed
    finally:
        await ours.reset()
        await ours.aclose()
        await storage.bridge.storage.aclose()


async def test_reset_forgets_every_count(limiter):
    assert (await limiter.hit("tok", ("1/hour",))).allowed
    await limiter.reset()
    assert (await limiter.hit("tok", ("1/hour",))).allowed


async def test_redis_down_fails_closed():
    limiter = RateLimiter("redis://127.0.0.1:9/0")
    try:
        with pytest.raises(Unavailable):
            await limiter.hit("tok", ("3/minute",))
        together = await asyncio.gather(
            *(limiter.hit(f"tok{i}", ("3/minute",)) for i in range(5)), return_exceptions=True
        )
        assert all(isinstance(r, Unavailable) for r in together)
    finally:
        await limiter.aclose()


async def test_a_rate_the_library_cannot_read_is_unavailable(limiter):
    with pytest.raises(Unavailable):
        await limiter.hit("tok", ("often",))
    with pytest.raises(Unavailable):
        await limiter.hit("tok", ())
