"""Revocation fan-out: every change to a token reaches every replica's cache at once.

A replica that changes a token (revoke, rotate, quarantine) drops it from its own cache and
publishes the token id; every replica subscribed drops it too. Transports:

* Redis pub/sub when ``TOKENWARD_REDIS_URL`` is set;
* PostgreSQL ``LISTEN``/``NOTIFY`` when the store is PostgreSQL and there is no Redis;
* in-process only with SQLite (one process serves one SQLite file).

Fail-safe rule: while a replica is *not* subscribed (starting, connection lost), its verifier
cache is switched off, so nothing it serves can be staler than the store. The Redis
subscriber pings its connection every :data:`PING_SECONDS` and counts it lost when no answer
came for :data:`DEAD_AFTER_SECONDS`, so a silently dead subscription (no reset, no close)
switches the cache off too. It counts itself subscribed only once Redis confirmed the
subscription.

A publish is retried on a fresh connection (redis-py's retry, then once more here after
dropping the idle pooled connections). The change is committed already, so the call that made
it waits for the publish at most :data:`PUBLISH_WAIT_SECONDS` (a frozen Redis answers nothing
and a connect to it can hang with no timeout of the socket's firing): past that, or on an
error, the replica logs ``fanout_publish_failed`` at error level and the message keeps being
sent in the background for one cache TTL from the change. While such a message is pending, a
further change does not wait at all (a cascade of revocations answers within one wait, not one
per token). The other replicas, if they stayed subscribed, serve the old state for at most the
cache TTL (``TOKENWARD_CACHE_TTL``). That is the bound, documented in docs/architecture.md.

Redis channel: ``<TOKENWARD_REDIS_PREFIX>invalidate``, so that deployments sharing one Redis
do not see each other's invalidations; with the default prefix it stays
``tokenward_invalidate``, the name every earlier release used, so a rolling upgrade needs
nothing. A replica with another prefix also listens on ``tokenward_invalidate`` (for one
release), to hear replicas not yet upgraded; an extra invalidation only drops a cache entry.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import Any

import structlog
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from tokenward.verify import Verifier

#: the channel of earlier releases, and still of the default prefix
CHANNEL = "tokenward_invalidate"
DEFAULT_PREFIX = "tokenward:"
#: the subscriber pings its connection this often, and counts it lost after this long silent
PING_SECONDS = 1.0
DEAD_AFTER_SECONDS = 3.0
#: wait at most this long for Redis to confirm a subscription
SUBSCRIBE_TIMEOUT = 2.0
#: the call that changed a token waits at most this long for its publish (then: background)
PUBLISH_WAIT_SECONDS = 1.0
_PING = b"tokenward-fanout"
log = structlog.get_logger("tokenward.fanout")


def redis_channels(prefix: str = DEFAULT_PREFIX) -> tuple[str, tuple[str, ...]]:
    """The channel to publish on and the channels to listen on, for ``TOKENWARD_REDIS_PREFIX``.

    A trailing ``:`` is not doubled, as for the rate-limit keys.
    """
    if prefix in (DEFAULT_PREFIX, DEFAULT_PREFIX.rstrip(":")):
        return CHANNEL, (CHANNEL,)
    own = (prefix if prefix.endswith(":") else prefix + ":") + "invalidate"
    return own, (own, CHANNEL)


class Fanout:
    """Base: publishing is a no-op and nothing is subscribed (single process)."""

    def __init__(self, verifier: Verifier) -> None:
        self.verifier = verifier
        self._task: asyncio.Task[None] | None = None
        self.subscribed = asyncio.Event()

    async def publish(self, token_id: str) -> None:
        self.verifier.apply_invalidation(token_id)

    async def start(self) -> None:
        self.subscribed.set()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    # -- shared by the networked transports ----------------------------------------------
    def _received(self, token_id: str) -> None:
        self.verifier.apply_invalidation(token_id)

    def _connected(self) -> None:
        self.verifier.cache_enabled = True
        self.subscribed.set()

    def _disconnected(self) -> None:
        self.subscribed.clear()
        self.verifier.cache_enabled = False
        self.verifier.clear()

    async def _supervise(self, listen: Callable[[], Any]) -> None:
        delay = 0.1
        while True:
            try:
                await listen()
                delay = 0.1
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("fanout_disconnected", error_type=type(exc).__name__)
            self._disconnected()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _start_supervised(self, listen: Callable[[], Any]) -> None:
        self._disconnected()
        self._task = asyncio.create_task(self._supervise(listen))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.subscribed.wait(), 2.0)


class RedisFanout(Fanout):
    """Redis pub/sub. ``redis`` publishes (a client that retries, see
    :func:`tokenward.redisconn.connect`); ``subscriber``, which the fan-out owns and closes,
    listens: it must not retry or reconnect by itself, or a gap would go unnoticed."""

    def __init__(
        self,
        verifier: Verifier,
        redis: Redis,
        channel: str = CHANNEL,
        *,
        listen: tuple[str, ...] | None = None,
        subscriber: Redis | None = None,
    ) -> None:
        super().__init__(verifier)
        self.redis = redis
        self.channel = channel
        self.listen_channels = listen if listen is not None else (channel,)
        self.subscriber = subscriber
        self.publish_failures = 0
        self._retries: set[asyncio.Task[None]] = set()
        #: a publish missed its wait and nothing got through since: the next do not wait
        self._stalled = False

    async def publish(self, token_id: str) -> None:
        """Drop ``token_id`` here and tell every replica; never raises, never waits for long.

        The outcome of the first attempt is a future that the sender resolves (``None``:
        sent; otherwise the error's name) and that this call resolves itself when its wait is
        over, so that the sender knows a later success is late.
        """
        self.verifier.apply_invalidation(token_id)
        first: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(self._deliver(token_id, first))
        self._retries.add(task)
        task.add_done_callback(self._retries.discard)
        if not self._stalled:
            await asyncio.wait({first}, timeout=PUBLISH_WAIT_SECONDS)
        if not first.done():
            first.set_result("PublishWaitExceeded")
        error_type = first.result()
        if error_type is None:
            return
        # committed already: see the module's docstring
        self.publish_failures += 1
        self._stalled = True
        log.error(
            "fanout_publish_failed",
            token_id=token_id,
            error_type=error_type,
            stale_bound_seconds=self.verifier.cache_ttl,
        )

    async def _deliver(self, token_id: str, first: asyncio.Future[str | None]) -> None:
        """Send until Redis took it, for one cache TTL from the change: past that a late message
        changes nothing, every cache has expired the entry. Every attempt is bounded by the
        time left, whatever the sockets' timeouts do."""
        deadline = time.monotonic() + self.verifier.cache_ttl
        attempt = self._publish_once_more
        delay = 0.1
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                await asyncio.wait_for(attempt(token_id), left)
            except Exception as exc:
                if not first.done():
                    first.set_result(type(exc).__name__)
                log.debug("fanout_publish_retry_failed", error_type=type(exc).__name__)
            else:
                self._stalled = False
                if first.done():
                    log.warning("fanout_publish_late", token_id=token_id)
                else:
                    first.set_result(None)
                return
            attempt = self._publish
            if time.monotonic() + delay >= deadline:
                break
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
        log.error(
            "fanout_publish_abandoned", token_id=token_id, after_seconds=self.verifier.cache_ttl
        )

    async def _publish(self, token_id: str) -> None:
        await self.redis.publish(self.channel, token_id)

    async def _publish_once_more(self, token_id: str) -> None:
        try:
            await self._publish(token_id)
        except (RedisConnectionError, RedisTimeoutError):
            # The other idle connections are likely dead too (a restart): drop them, retry.
            with contextlib.suppress(Exception):
                await self.redis.connection_pool.disconnect(inuse_connections=False)
            await self._publish(token_id)

    async def start(self) -> None:
        await self._start_supervised(self._listen)

    async def stop(self) -> None:
        pending = list(self._retries)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=PUBLISH_WAIT_SECONDS)
        await super().stop()
        if self.subscriber is not None:
            await self.subscriber.aclose()

    async def _listen(self) -> None:
        pubsub = (self.subscriber or self.redis).pubsub()
        try:
            await pubsub.subscribe(*self.listen_channels)
            await self._confirmed(pubsub)
            self._connected()
            last_answer = last_ping = time.monotonic()
            while True:
                now = time.monotonic()
                if now - last_answer > DEAD_AFTER_SECONDS:
                    raise RedisConnectionError("fan-out subscription silent, counted lost")
                if now - last_ping >= PING_SECONDS:
                    await pubsub.ping(_PING)
                    last_ping = now
                message = await pubsub.get_message(timeout=PING_SECONDS / 4)
                if message is None:
                    continue
                last_answer = time.monotonic()
                self._handle(message)
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _confirmed(self, pubsub: Any) -> None:
        """Wait until Redis confirmed every channel: before that a publish could be missed."""
        deadline = time.monotonic() + SUBSCRIBE_TIMEOUT
        pending = {c.encode() for c in self.listen_channels}
        while pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RedisTimeoutError("fan-out subscription not confirmed")
            message = await pubsub.get_message(timeout=left)
            if message is None:
                continue
            if message["type"] == "subscribe":
                pending.discard(message["channel"])
            else:
                self._handle(message)

    def _handle(self, message: dict[str, Any]) -> None:
        if message["type"] == "message":
            data = message["data"]
            self._received(data.decode() if isinstance(data, bytes) else str(data))


class PostgresFanout(Fanout):
    def __init__(self, verifier: Verifier, engine: AsyncEngine, channel: str = CHANNEL) -> None:
        super().__init__(verifier)
        self.engine = engine
        self.channel = channel

    async def publish(self, token_id: str) -> None:
        self.verifier.apply_invalidation(token_id)
        try:
            async with self.engine.begin() as conn:
                await conn.execute(
                    text("SELECT pg_notify(:c, :id)"), {"c": self.channel, "id": token_id}
                )
        except Exception as exc:
            log.error("fanout_publish_failed", token_id=token_id, error_type=type(exc).__name__)

    async def start(self) -> None:
        await self._start_supervised(self._listen)

    async def _listen(self) -> None:
        import asyncpg

        url = make_url(self.engine.url)
        conn = await asyncpg.connect(
            host=url.host,
            port=url.port or 5432,
            user=url.username,
            password=url.password,
            database=url.database,
        )
        lost = asyncio.Event()
        conn.add_termination_listener(lambda _c: lost.set())
        try:
            await conn.add_listener(
                self.channel, lambda _c, _pid, _ch, payload: self._received(payload)
            )
            self._connected()
            while not lost.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(lost.wait(), 2.0)
                if not lost.is_set():
                    await conn.execute("SELECT 1")  # notice a silently dead connection
            raise ConnectionError("LISTEN connection lost")
        finally:
            with contextlib.suppress(Exception):
                await conn.close(timeout=1)


def make_fanout(
    verifier: Verifier,
    engine: AsyncEngine,
    redis: Redis | None,
    *,
    prefix: str = DEFAULT_PREFIX,
    subscriber: Redis | None = None,
) -> Fanout:
    if redis is not None:
        channel, listen = redis_channels(prefix)
        return RedisFanout(verifier, redis, channel, listen=listen, subscriber=subscriber)
    if engine.dialect.name == "postgresql":
        return PostgresFanout(verifier, engine)
    return Fanout(verifier)


async def announce(
    engine: AsyncEngine,
    redis_url: str | None,
    token_ids: list[str],
    prefix: str = DEFAULT_PREFIX,
) -> None:
    """Tell running replicas that tokens changed, from outside a server (``init --reset``)."""
    if not token_ids:
        return
    if redis_url is not None:
        from tokenward.redisconn import connect

        client = connect(redis_url)
        channel, _ = redis_channels(prefix)
        try:
            for token_id in token_ids:
                await client.publish(channel, token_id)
        finally:
            await client.aclose()
    elif engine.dialect.name == "postgresql":
        async with engine.begin() as conn:
            for token_id in token_ids:
                await conn.execute(
                    text("SELECT pg_notify(:c, :id)"), {"c": CHANNEL, "id": token_id}
                )
