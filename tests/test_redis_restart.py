"""Redis restarts and silences, against a Redis server of the test's own that it kills.

Invariant 2 across a Redis restart: a revocation made right after the restart reaches the
other replica at once; rate-limited checks and the readiness ping do not fail once per dead
pooled connection; a dead or silent subscription switches the cache off until resubscribed;
deployments with different ``TOKENWARD_REDIS_PREFIX`` do not share invalidations.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from tests.conftest import REDIS_URL, owns_listener, start_on_some_port, two_replicas
from tokenward import redisconn
from tokenward.app import open_services
from tokenward.errors import Unavailable
from tokenward.fanout import CHANNEL, DEAD_AFTER_SECONDS, RedisFanout, redis_channels
from tokenward.limits import RateLimiter
from tokenward.service import TokenSpec, issue_bootstrap_record
from tokenward.tokens.model import Reason

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="no redis-server")


class OwnRedis:
    """A redis-server of this test's own, to kill, freeze and restart.

    redis-server can neither take a socket bound for it nor report the port it bound: the
    first start retries on "address already in use" (:func:`start_on_some_port`); a restart
    needs the same port (the clients keep their URL) and fails plainly if it was taken."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.port = 0
        self.url = ""
        self.process: subprocess.Popen[bytes] | None = None

    def _spawn(self, port: int) -> subprocess.Popen[bytes]:
        with self.log.open("wb") as out:
            return subprocess.Popen(
                ["redis-server", "--port", str(port), "--save", "", "--appendonly", "no"],
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def start(self) -> None:
        if not self.port:
            self.process, self.port = start_on_some_port(self._spawn, self._said, timeout=5)
            self.url = f"redis://127.0.0.1:{self.port}/0"
            return
        self.process = self._spawn(self.port)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and self.process.poll() is None:
            if owns_listener(self.process.pid, self.port):
                return
            time.sleep(0.02)
        raise RuntimeError(f"redis-server did not start again: {self._said()}")

    def _said(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self.process = None

    async def restart(self, down: float = 0.3) -> None:
        """SIGKILL, down for ``down`` seconds (the clients see the connections close), start."""
        self.kill()
        await asyncio.sleep(down)
        self.start()

    def freeze(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.process is not None:
            self.thaw()
            self.kill()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    server = OwnRedis(tmp_path / "redis.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def _wait_for(predicate: Any, within: float, step: float = 0.01) -> float:
    started = time.perf_counter()
    while not predicate():
        if time.perf_counter() - started > within:
            raise AssertionError(f"not within {within} s")
        await asyncio.sleep(step)
    return time.perf_counter() - started


async def _fill_pool(client: Redis, n: int = 4) -> None:
    """Several pooled connections, as a replica under load has."""
    await asyncio.gather(*(client.ping() for _ in range(n)))
    assert len(client.connection_pool._available_connections) >= 2  # type: ignore[attr-defined]


@pytest.fixture
async def replicas(pg_database, settings, own_redis) -> AsyncIterator[tuple[Any, Any]]:
    settings = settings.model_copy(
        update={"database_url": pg_database, "cache_ttl": 300.0, "redis_url": own_redis.url}
    )
    async with two_replicas(settings) as pair:
        yield pair


async def test_revoke_right_after_a_restart_reaches_the_other_replica(replicas, own_redis):
    a, b = replicas
    admin = issue_bootstrap_record(a.hasher, a.verifier.clock())
    await a.store.insert_token(admin.record, a.hasher.hash(admin.secret))
    await a.tokens.create_project(admin.record, "app")
    issued = await a.tokens.create_token(admin.record, TokenSpec(project="app", scopes=["x:y"]))
    await _fill_pool(a.redis)

    await own_redis.restart()
    assert not b.verifier.cache_enabled  # B saw its subscription go, and its cache with it
    await asyncio.wait_for(b.fanout.subscribed.wait(), 10)
    await asyncio.wait_for(a.fanout.subscribed.wait(), 10)
    assert (await b.verifier.verify(issued.secret)).allowed
    hits = b.verifier.hits
    assert (await b.verifier.verify(issued.secret)).allowed
    assert b.verifier.hits == hits + 1  # B serves it from its cache again

    started = time.perf_counter()
    await a.tokens.revoke_token(admin.record, issued.record.id, "leaked")
    while (await b.verifier.verify(issued.secret)).reason is not Reason.REVOKED:
        assert time.perf_counter() - started < 0.5, "replica B still serves the revoked token"
        await asyncio.sleep(0.002)
    took = (time.perf_counter() - started) * 1e3
    print(f"after a restart: revocation seen by B in {took:.1f} ms")
    assert a.fanout.publish_failures == 0
    # and the readiness ping of both replicas answers on its first try
    assert await a.redis.ping() and await b.redis.ping()


async def test_readiness_ping_survives_a_restart(own_redis):
    client = redisconn.connect(own_redis.url)
    try:
        await _fill_pool(client)
        await own_redis.restart()
        assert [await client.ping() for _ in range(4)] == [True] * 4
    finally:
        await client.aclose()


async def test_rate_limited_checks_after_a_restart_do_not_fail(own_redis):
    limiter = RateLimiter(own_redis.url, namespace="tw-restart")
    try:
        # several checks at once: more than one pooled connection
        await asyncio.gather(*(limiter.hit(f"k{i}", ("100/minute",)) for i in range(8)))
        await asyncio.gather(*(limiter._redis.ping() for _ in range(4)))  # type: ignore[union-attr]
        await own_redis.restart()
        results = [await limiter.hit("tok", ("100/minute",)) for _ in range(4)]
        assert [r.allowed for r in results] == [True] * 4
        assert [r.remaining for r in results] == [99, 98, 97, 96]  # each hit counted once
    finally:
        await limiter.aclose()


async def test_a_sent_rate_limit_check_is_not_repeated(own_redis):
    """The script counts a hit: once it was sent, an error fails the check (503), no retry."""
    limiter = RateLimiter(own_redis.url, namespace="tw-restart")
    try:
        retry = limiter._redis.get_retry()  # type: ignore[union-attr]
        assert retry is not None and retry.get_retries() == 0
        assert (await limiter.hit("tok", ("5/minute",))).allowed
        own_redis.freeze()  # the script is sent and never answered
        started = time.perf_counter()
        with pytest.raises(Unavailable):
            await limiter.hit("tok", ("5/minute",))
        assert time.perf_counter() - started < redisconn.SOCKET_TIMEOUT + 1
        own_redis.thaw()
        # the lost reply's hit counted once (it ran when Redis woke up), not twice
        assert (await limiter.hit("tok", ("5/minute",))).remaining == 5 - 3
    finally:
        own_redis.thaw()
        await limiter.aclose()


class _Verifier:
    """What the fan-out uses of a verifier."""

    def __init__(self) -> None:
        self.cache_enabled = True
        self.cache_ttl = 5.0
        self.invalidated: list[str] = []

    def invalidate(self, token_id: str) -> None:
        self.invalidated.append(token_id)

    def apply_invalidation(self, message: str) -> None:
        self.invalidate(message)

    def clear(self) -> None:
        pass


def _fanout(url: str, prefix: str = "tokenward:") -> tuple[RedisFanout, _Verifier]:
    verifier = _Verifier()
    channel, listen = redis_channels(prefix)
    fanout = RedisFanout(
        verifier,  # type: ignore[arg-type]
        redisconn.connect(url),
        channel,
        listen=listen,
        subscriber=redisconn.connect(url, retries=0),
    )
    return fanout, verifier


async def _close(*fanouts: RedisFanout) -> None:
    for fanout in fanouts:
        await fanout.stop()
        await fanout.redis.aclose()


async def test_subscriber_switches_the_cache_off_at_once_when_redis_dies(own_redis):
    fanout, verifier = _fanout(own_redis.url)
    await fanout.start()
    try:
        assert verifier.cache_enabled
        own_redis.kill()
        took = await _wait_for(lambda: not verifier.cache_enabled, within=0.5)
        print(f"cache off {took * 1e3:.1f} ms after Redis died")
        await asyncio.sleep(0.3)
        assert not verifier.cache_enabled  # stays off while Redis is away
        own_redis.start()
        await _wait_for(lambda: verifier.cache_enabled, within=6)
        assert fanout.subscribed.is_set()
    finally:
        await _close(fanout)


async def test_subscriber_notices_a_silent_subscription(own_redis):
    """No reset, no close, no answer (a frozen server, a dropped route): counted lost."""
    fanout, verifier = _fanout(own_redis.url)
    await fanout.start()
    try:
        own_redis.freeze()
        took = await _wait_for(lambda: not verifier.cache_enabled, within=DEAD_AFTER_SECONDS + 2)
        print(f"silent subscription counted lost after {took:.2f} s")
        own_redis.thaw()
        await _wait_for(lambda: verifier.cache_enabled, within=8)
    finally:
        own_redis.thaw()
        await _close(fanout)


async def test_failed_publish_is_reported_and_sent_late(own_redis, caplog):
    fanout, verifier = _fanout(own_redis.url)
    other, seen = _fanout(own_redis.url)
    await fanout.start()
    try:
        own_redis.kill()
        await fanout.publish("tok_1")  # committed already: must not raise
        assert fanout.publish_failures == 1
        assert verifier.invalidated == ["tok_1"]  # its own cache dropped it at once
        own_redis.start()
        await other.start()
        await _wait_for(lambda: "tok_1" in seen.invalidated, within=verifier.cache_ttl)
    finally:
        await _close(fanout, other)


async def test_the_prefix_isolates_deployments_on_one_redis():
    one_a, seen_one_a = _fanout(REDIS_URL, "tw-qa1:")
    one_b, seen_one_b = _fanout(REDIS_URL, "tw-qa1:")
    two, seen_two = _fanout(REDIS_URL, "tw-qa2:")
    for fanout in (one_a, one_b, two):
        await fanout.start()
    try:
        assert one_a.channel == "tw-qa1:invalidate" and two.channel == "tw-qa2:invalidate"
        await one_a.publish("tok_one")
        await two.publish("tok_two")
        await _wait_for(lambda: "tok_one" in seen_one_b.invalidated, within=1)
        await _wait_for(lambda: "tok_two" in seen_two.invalidated, within=1)
        await asyncio.sleep(0.1)
        assert "tok_one" not in seen_two.invalidated
        assert "tok_two" not in seen_one_b.invalidated
    finally:
        await _close(one_a, one_b, two)


def test_the_default_prefix_keeps_the_channel_of_earlier_releases():
    assert redis_channels("tokenward:") == (CHANNEL, (CHANNEL,)) == redis_channels("tokenward")
    # another prefix also hears replicas not yet upgraded (they publish on the old channel)
    assert redis_channels("qa2:") == ("qa2:invalidate", ("qa2:invalidate", CHANNEL))
    assert redis_channels("qa2") == redis_channels("qa2:")


async def test_services_use_the_prefixed_channel(settings, own_redis):
    settings = settings.model_copy(update={"redis_url": own_redis.url, "redis_prefix": "qa2:"})
    services = await open_services(settings)
    try:
        assert isinstance(services.fanout, RedisFanout)
        assert services.fanout.channel == "qa2:invalidate"
    finally:
        await services.close()
