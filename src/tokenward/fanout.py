"""Revocation fan-out: every change to a token reaches every replica's cache at once.

A replica that changes a token (revoke, rotate, quarantine) drops it from its own cache and
publishes the token id; every replica subscribed drops it too. Transports:

* Redis pub/sub when ``TOKENWARD_REDIS_URL`` is set;
* PostgreSQL ``LISTEN``/``NOTIFY`` when the store is PostgreSQL and there is no Redis;
* in-process only with SQLite (one process serves one SQLite file).

Fail-safe rule: while a replica is *not* subscribed (starting, connection lost), its verifier
cache is switched off, so nothing it serves can be staler than the store. A lost publish
(the broker blipped between commit and publish) is bounded by the cache TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import structlog
from redis.asyncio import Redis
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from tokenward.verify import Verifier

CHANNEL = "tokenward_invalidate"
log = structlog.get_logger("tokenward.fanout")


class Fanout:
    """Base: publishing is a no-op and nothing is subscribed (single process)."""

    def __init__(self, verifier: Verifier) -> None:
        self.verifier = verifier
        self._task: asyncio.Task[None] | None = None
        self.subscribed = asyncio.Event()

    async def publish(self, token_id: str) -> None:
        self.verifier.invalidate(token_id)

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
        self.verifier.invalidate(token_id)

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
    def __init__(self, verifier: Verifier, redis: Redis, channel: str = CHANNEL) -> None:
        super().__init__(verifier)
        self.redis = redis
        self.channel = channel

    async def publish(self, token_id: str) -> None:
        self.verifier.invalidate(token_id)
        try:
            await self.redis.publish(self.channel, token_id)
        except Exception as exc:  # committed already; other replicas fall back on the TTL
            log.error("fanout_publish_failed", token_id=token_id, error_type=type(exc).__name__)

    async def start(self) -> None:
        await self._start_supervised(self._listen)

    async def _listen(self) -> None:
        pubsub = self.redis.pubsub()
        try:
            await pubsub.subscribe(self.channel)
            self._connected()
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if message is not None and message["type"] == "message":
                    data = message["data"]
                    self._received(data.decode() if isinstance(data, bytes) else str(data))
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]


class PostgresFanout(Fanout):
    def __init__(self, verifier: Verifier, engine: AsyncEngine, channel: str = CHANNEL) -> None:
        super().__init__(verifier)
        self.engine = engine
        self.channel = channel

    async def publish(self, token_id: str) -> None:
        self.verifier.invalidate(token_id)
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


def make_fanout(verifier: Verifier, engine: AsyncEngine, redis: Redis | None) -> Fanout:
    if redis is not None:
        return RedisFanout(verifier, redis)
    if engine.dialect.name == "postgresql":
        return PostgresFanout(verifier, engine)
    return Fanout(verifier)


async def announce(engine: AsyncEngine, redis_url: str | None, token_ids: list[str]) -> None:
    """Tell running replicas that tokens changed, from outside a server (``init --reset``)."""
    if not token_ids:
        return
    if redis_url is not None:
        client = Redis.from_url(redis_url)
        try:
            for token_id in token_ids:
                await client.publish(CHANNEL, token_id)
        finally:
            await client.aclose()
    elif engine.dialect.name == "postgresql":
        async with engine.begin() as conn:
            for token_id in token_ids:
                await conn.execute(
                    text("SELECT pg_notify(:c, :id)"), {"c": CHANNEL, "id": token_id}
                )
