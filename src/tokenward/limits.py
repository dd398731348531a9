"""Rate limits, through the ``limits`` library.

In memory by default (one process); with a Redis URL the counters live in Redis and every
replica shares them. A storage error raises :class:`~tokenward.errors.Unavailable`: rate
limiting fails closed, like the rest of authentication.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import lru_cache

from limits import RateLimitItem, parse_many
from limits.aio.storage import RedisStorage as AsyncRedisStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter as AsyncLimiter
from limits.storage import MemoryStorage
from limits.strategies import SlidingWindowCounterRateLimiter

from tokenward.errors import Unavailable


@dataclass(frozen=True, slots=True)
class RateResult:
    allowed: bool
    limit: int
    remaining: int
    reset: int  # seconds until the tightest window frees up

    def as_dict(self) -> dict[str, int]:
        return {"limit": self.limit, "remaining": self.remaining, "reset": self.reset}


@lru_cache(maxsize=4096)
def _items(rates: tuple[str, ...]) -> tuple[RateLimitItem, ...]:
    return tuple(item for rate in rates for item in parse_many(rate))


class RateLimiter:
    """Counts hits per key against one or more windows (``["10/second", "1000/hour"]``)."""

    def __init__(self, redis_url: str | None = None, namespace: str = "tokenward") -> None:
        self.shared = redis_url is not None
        if redis_url is None:
            self._sync = SlidingWindowCounterRateLimiter(MemoryStorage())
            self._async: AsyncLimiter | None = None
        else:
            uri = "async+" + redis_url if not redis_url.startswith("async+") else redis_url
            storage = AsyncRedisStorage(
                uri, implementation="redispy", key_prefix=namespace, wrap_exceptions=True
            )
            self._async = AsyncLimiter(storage)

    async def hit(self, key: str, rates: tuple[str, ...]) -> RateResult:
        """Count one hit for ``key``. Denied as soon as any window is full."""
        tightest: RateResult | None = None
        try:
            for item in _items(rates):
                if self._async is not None:
                    allowed = await self._async.hit(item, key)
                    stats = await self._async.get_window_stats(item, key)
                else:
                    allowed = self._sync.hit(item, key)
                    stats = self._sync.get_window_stats(item, key)
                reset = max(0, math.ceil(stats.reset_time - time.time()))
                result = RateResult(allowed, item.amount, stats.remaining, reset)
                if not allowed:
                    return result
                if tightest is None or result.remaining < tightest.remaining:
                    tightest = result
        except Exception as exc:  # the storage backend is down or unreachable
            raise Unavailable(
                "rate_limit_unavailable", "the rate limit store is unavailable"
            ) from exc
        assert tightest is not None
        return tightest

    async def aclose(self) -> None:
        """Close the Redis connections (nothing to do in memory)."""
        if self._async is not None:
            bridge = getattr(self._async.storage, "bridge", None)
            client = getattr(bridge, "storage", None)
            if client is not None:
                await client.aclose()

    async def reset(self) -> None:
        if self._async is not None:
            await self._async.storage.reset()
        else:
            self._sync.storage.reset()
