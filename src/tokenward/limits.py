"""Rate limits: sliding window counters, one or more windows per key.

In memory by default (one process), through the ``limits`` library's storage. With a Redis
URL the counters live in Redis and every replica shares them; a check, all its windows, is
one script call, and checks made while a call is in flight share the next one (see
:data:`SLIDING_WINDOWS_LUA` for why that is our own script). A storage error raises
:class:`~tokenward.errors.Unavailable`: rate limiting fails closed, like the rest of
authentication.

Both stores count the same way, the ``limits`` library's sliding window counter: a window
of ``expiry`` seconds holds a current and a previous fixed window, and the count is the
current one plus the previous one weighted by how much of it still overlaps the sliding
window.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

from limits import RateLimitItem, parse_many
from limits.storage import MemoryStorage
from redis.asyncio import Redis

from tokenward import redisconn
from tokenward.errors import Unavailable


@dataclass(frozen=True, slots=True)
class RateResult:
    allowed: bool
    limit: int
    remaining: int
    reset: int  # seconds until the tightest window frees up

    def as_dict(self) -> dict[str, int]:
        return {"limit": self.limit, "remaining": self.remaining, "reset": self.reset}


@dataclass(frozen=True, slots=True)
class _Window:
    amount: int
    expiry: int  # seconds
    key: str  # the library's key for this window and identifier (``item.key_for``)


@dataclass(frozen=True, slots=True)
class _Call:
    """One check's part of a :data:`SLIDING_WINDOWS_LUA` call, encoded once."""

    windows: tuple[_Window, ...]
    keys: tuple[bytes, ...]
    args: tuple[bytes, ...]


@lru_cache(maxsize=4096)
def _items(rates: tuple[str, ...]) -> tuple[RateLimitItem, ...]:
    return tuple(item for rate in rates for item in parse_many(rate))


@lru_cache(maxsize=16_384)
def _windows(key: str, rates: tuple[str, ...]) -> tuple[_Window, ...]:
    windows = tuple(_Window(i.amount, i.get_expiry(), i.key_for(key)) for i in _items(rates))
    if not windows:
        raise ValueError("no rate limit to count against")
    return windows


@lru_cache(maxsize=16_384)
def _redis_call(prefix: str, key: str, rates: tuple[str, ...]) -> _Call:
    windows = _windows(key, rates)
    keys: list[bytes] = []
    args = [b"%d" % len(windows)]
    for window in windows:
        current = f"{prefix}{{{window.key}}}".encode()  # as the library names them
        keys += (current + b"/-1", current)
        args += (b"%d" % window.amount, b"%d" % window.expiry)
    return _Call(windows, tuple(keys), tuple(args))


def _unavailable() -> Unavailable:
    return Unavailable("rate_limit_unavailable", "the rate limit store is unavailable")


def _fail(future: asyncio.Future[RateResult], cause: BaseException | None) -> None:
    if not future.done():
        error = _unavailable()
        error.__cause__ = cause
        future.set_exception(error)


def _remaining(window: _Window, previous: int, previous_ttl: float, current: int) -> int:
    """What the library's ``get_window_stats`` reports as remaining (TTLs in seconds)."""
    weighted = previous * previous_ttl / window.expiry + current
    return max(0, window.amount - math.floor(weighted))


def _reset(
    window: _Window, previous: int, previous_ttl: float, current: int, current_ttl: float
) -> int:
    """Seconds until the window frees up, as the library's ``get_window_stats`` has it: the
    sooner of the previous window's weight dropping by one hit and the current window
    becoming the previous one (it lives twice the window's length)."""
    reset_in = math.inf
    if previous:
        reset_in = previous_ttl % (window.expiry / previous)
    if current:
        # The library takes current_ttl % expiry, which says 0 instead of a full window
        # when the TTL is read in the millisecond it was set.
        reset_in = min(reset_in, current_ttl - window.expiry)
    return 0 if reset_in == math.inf else max(0, math.ceil(reset_in))


SLIDING_WINDOWS_LUA = """
-- For each check of a batch, count one hit against each of its sliding window counters.
-- ARGV, per check: its number of windows n, then per window its limit and its length in
-- seconds.  KEYS, per window: its previous and its current counter.
-- A check's windows are counted in order, and counting stops at the first full one (the
-- windows before it keep their hit).
-- Reply: one string, the checks' answers joined by ';'.  An answer is, per window counted,
-- 'allowed (0/1),previous count,previous TTL ms,current count,current TTL ms', joined by
-- ','; or '!' when the check failed (a key holding something else), so that one bad check
-- does not fail the others.
-- Per window this is the `limits` library's acquire_sliding_window.lua followed by its
-- sliding_window.lua (the stats), on the same keys, with the same arithmetic and expiry.

local function count(previous_key, current_key, limit, expiry)
    local current_ttl = redis.call('pttl', current_key)
    if current_ttl > 0 and current_ttl < expiry then
        -- the current window is over: it becomes the previous one
        redis.call('rename', current_key, previous_key)
        redis.call('set', current_key, 0, 'PX', string.format('%d', current_ttl + expiry))
    end
    local previous_count = tonumber(redis.call('get', previous_key)) or 0
    local previous_ttl = math.max(redis.call('pttl', previous_key), 0)
    local current_count = tonumber(redis.call('get', current_key)) or 0
    current_ttl = redis.call('pttl', current_key)

    local allowed = math.floor(previous_count * previous_ttl / expiry) + current_count < limit
    if allowed then
        if current_ttl == -2 then
            -- a new current window lives twice its length (the second half as the previous)
            current_ttl = expiry * 2
            redis.call('set', current_key, 1, 'PX', string.format('%d', current_ttl))
            current_count = 1
        else
            current_count = redis.call('incrby', current_key, 1)
        end
    end
    return allowed, string.format('%d,%d,%d,%d,%d', allowed and 1 or 0,
        previous_count, previous_ttl, current_count, math.max(current_ttl, 0))
end

local function check(k, a, n)
    local counted = {}
    for w = 0, n - 1 do
        local allowed, stats = count(KEYS[k + 2 * w], KEYS[k + 2 * w + 1],
            tonumber(ARGV[a + 2 * w]), tonumber(ARGV[a + 2 * w + 1]) * 1000)
        counted[w + 1] = stats
        if not allowed then
            break
        end
    end
    return table.concat(counted, ',')
end

local answers = {}
local k, a = 1, 1
while a <= #ARGV do
    local n = tonumber(ARGV[a])
    local ok, answer = pcall(check, k, a + 1, n)
    answers[#answers + 1] = ok and answer or '!'
    k = k + 2 * n
    a = a + 1 + 2 * n
end
return table.concat(answers, ';')
"""
"""The Redis side of :meth:`RateLimiter.hit`.

Why our own script: the library's ``hit`` answers only allowed/denied, so each window cost
a second round trip for ``get_window_stats`` (remaining and reset, which the ``RateLimit-*``
headers need), and it has no call that takes several windows or several keys: a check with
two windows was four round trips. This script is the library's two scripts for one window,
run for every window of a check in one ``EVALSHA``, on the library's keys
(``{prefix}:{LIMITER/…}`` and ``…/-1``) with its arithmetic and expiry (a current window
lives twice its length, a previous one what is left of that), so replicas running the
library's strategy share the counters. The memory store stays on the library.

Checks that arrive while a call is in flight wait for it and go together in the next call,
in arrival order; each check is still counted atomically. Under load this divides the
client's cost per check several times over; alone, a check waits for no one. The reply
is one string rather than an array because redis-py, without hiredis, parses an array
element by element in Python: five numbers per window cost more than the script.

All the keys of a call must live on one Redis node: plain Redis (``redis://``,
``rediss://``, ``unix://``), not Redis Cluster.
"""

#: most checks in one script call (the script blocks Redis while it runs)
_MAX_BATCH = 256


class RateLimiter:
    """Counts hits per key against one or more windows (``["10/second", "1000/hour"]``).

    ``namespace`` prefixes every Redis key (``namespace:…``; a trailing ``:`` is not doubled,
    so ``TOKENWARD_REDIS_PREFIX`` can be passed as it is).
    """

    def __init__(self, redis_url: str | None = None, namespace: str = "tokenward") -> None:
        self.shared = redis_url is not None
        self._prefix = namespace if namespace.endswith(":") else namespace + ":"
        self._memory: MemoryStorage | None = None
        self._redis: Redis | None = None
        if redis_url is None:
            self._memory = MemoryStorage()
        else:
            # No retry of a sent command: the script counts a hit, and a retry after a lost
            # reply would count it twice. A pooled connection the server closed is replaced
            # before anything is written to it (see tokenward.redisconn).
            self._redis = redisconn.connect(redis_url, retries=0)
            self._script = self._redis.register_script(SLIDING_WINDOWS_LUA)
        self._queue: list[tuple[_Call, asyncio.Future[RateResult]]] = []
        self._sender: asyncio.Task[None] | None = None

    async def hit(self, key: str, rates: tuple[str, ...]) -> RateResult:
        """Count one hit for ``key``. Denied as soon as any window is full.

        The result describes the first full window or, when allowed, the window with the
        fewest hits left (the first of them on a tie).
        """
        try:
            if self._memory is not None:
                return _hit_memory(self._memory, _windows(key, rates))
            call = _redis_call(self._prefix, key, rates)
        except Exception as exc:
            raise _unavailable() from exc
        future: asyncio.Future[RateResult] = asyncio.get_running_loop().create_future()
        self._queue.append((call, future))
        if self._sender is None:
            self._sender = asyncio.create_task(self._send())
        return await future

    async def _send(self) -> None:
        """Send the queued checks in one script call, and again while more queued up."""
        batch: list[tuple[_Call, asyncio.Future[RateResult]]] = []
        try:
            while self._queue:
                batch, self._queue = self._queue[:_MAX_BATCH], self._queue[_MAX_BATCH:]
                batch = [(call, future) for call, future in batch if not future.done()]
                if not batch:  # every request of it went away before it was sent
                    continue
                keys: list[bytes] = []
                args: list[bytes] = []
                for call, _ in batch:
                    keys += call.keys
                    args += call.args
                try:
                    reply: bytes = await self._script(keys, args)
                except Exception as exc:  # the storage backend is down or unreachable
                    for _, future in batch:
                        _fail(future, exc)
                    continue
                answers = reply.split(b";")
                for i, (call, future) in enumerate(batch):
                    if future.done():  # its request went away after it was sent
                        continue
                    try:
                        future.set_result(_answer(call.windows, answers[i]))
                    except Exception as exc:  # this check's keys hold something else
                        _fail(future, exc)
        finally:
            self._sender = None
            for _, future in batch + self._queue:  # cancelled: fail what would hang
                _fail(future, None)
            self._queue = []

    async def aclose(self) -> None:
        """Close the Redis connections (nothing to do in memory)."""
        if self._redis is not None:
            await self._redis.aclose()

    async def reset(self) -> None:
        """Forget every count (in Redis: every key under the namespace)."""
        if self._memory is not None:
            self._memory.reset()
        elif self._redis is not None:
            async for found in self._redis.scan_iter(match=self._prefix + "*", count=1000):
                await self._redis.unlink(found)


def _hit_memory(storage: MemoryStorage, windows: tuple[_Window, ...]) -> RateResult:
    """The library strategy's ``hit`` and ``get_window_stats``, without the strategy."""
    tightest: tuple[_Window, int, float, int, float] | None = None
    least = 0
    for window in windows:
        allowed = storage.acquire_sliding_window_entry(window.key, window.amount, window.expiry)
        stats = storage.get_sliding_window(window.key, window.expiry)
        remaining = _remaining(window, *stats[:3])
        if not allowed:
            return RateResult(False, window.amount, remaining, _reset(window, *stats))
        if tightest is None or remaining < least:
            tightest, least = (window, *stats), remaining
    assert tightest is not None
    return RateResult(True, tightest[0].amount, least, _reset(*tightest))


def _answer(windows: tuple[_Window, ...], answer: bytes) -> RateResult:
    """Read one check's answer from :data:`SLIDING_WINDOWS_LUA` (TTLs in milliseconds)."""
    if answer == b"!":
        raise RuntimeError("the rate limit script failed on this check's keys")
    numbers: Sequence[int] = [int(n) for n in answer.split(b",")]
    tightest = 0
    least = 0
    for i, window in enumerate(windows):
        allowed, previous, previous_ttl, current, current_ttl = numbers[5 * i : 5 * i + 5]
        remaining = _remaining(window, previous, previous_ttl / 1000, current)
        if not allowed:
            reset = _reset(window, previous, previous_ttl / 1000, current, current_ttl / 1000)
            return RateResult(False, window.amount, remaining, reset)
        if i == 0 or remaining < least:
            tightest, least = i, remaining
    window = windows[tightest]
    _, previous, previous_ttl, current, current_ttl = numbers[5 * tightest : 5 * tightest + 5]
    reset = _reset(window, previous, previous_ttl / 1000, current, current_ttl / 1000)
    return RateResult(True, window.amount, least, reset)
