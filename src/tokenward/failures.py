"""The failed-credential limit: one per client address, wherever a credential is accepted.

A presented credential that is no token at all (malformed, bad checksum, unknown) counts
against the address it came from, in ``TOKENWARD_AUTH_FAILURE_LIMIT`` windows (shared
through Redis when configured). Once a window is full the address gets ``429
too_many_failures`` with ``Retry-After`` *before any lookup*, at every entry point:

* the gateway and ``/authz`` (:meth:`tokenward.gateway.enforce.Enforcement.decide`);
* every bearer-authenticated admin call, the verify API's and RFC 7662/7009 callers, OAuth
  client secrets (:func:`tokenward.api.auth.authenticate_credential`);
* ``POST /v1/token`` (subject and refresh tokens, CI identity tokens).

Counting has one place too: :class:`FailureCounter` is an event-bus subscriber, and every
access decision already makes exactly one access event (invariant 4). An event counts when
its address is the presenter's own, i.e. not the ``ip`` a verify caller reports about its
client nor the subject of an introspection: those answer for another party's credential.

The block itself is kept in this process, so the guard costs a dict lookup, not a round
trip. Replicas share the count: each one blocks the address at its own next failure once the
shared window is full.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from tokenward.errors import TooManyRequests, Unavailable
from tokenward.events import AccessEvent, AdminEvent, SecurityEvent
from tokenward.limits import RateLimiter, RateResult
from tokenward.tokens.model import Reason

#: Presented credentials that are not tokens at all: what a guesser produces.
FAILURE_REASONS = frozenset({Reason.MALFORMED, Reason.BAD_CHECKSUM, Reason.UNKNOWN})
#: access events whose address and credential belong to different parties
REPORTED_SOURCES = frozenset({"verify_api", "introspect"})
MESSAGE = "too many failed authentications from this address; retry later"
_MAX_BLOCKED = 100_000


class FailedCredentials:
    """Counts failures per address; answers whether an address is blocked, and for how long."""

    def __init__(self, limiter: RateLimiter, limit: tuple[str, ...] = ("20/minute",)) -> None:
        self.limiter = limiter
        self.limit = limit
        #: client IP → (monotonic time its block ends, the limit it exceeded)
        self._blocked: dict[str, tuple[float, int]] = {}

    def blocked_for(self, client_ip: str | None) -> RateResult | None:
        """The refusal of ``client_ip`` (``reset``: seconds left), or ``None``."""
        if not self._blocked or not client_ip:
            return None
        entry = self._blocked.get(client_ip)
        if entry is None:
            return None
        left = entry[0] - time.monotonic()
        if left <= 0:
            del self._blocked[client_ip]
            return None
        return RateResult(False, entry[1], 0, math.ceil(left))

    async def count(self, client_ip: str) -> None:
        """Count a failure; block the address when a window is full."""
        if not self.limit:
            return
        try:
            result = await self.limiter.hit("authfail:" + client_ip, self.limit)
        except Unavailable:
            return  # already a deny; the token lookups fail closed while the store is down
        if result.allowed and result.remaining > 0:
            return
        if len(self._blocked) >= _MAX_BLOCKED:
            now = time.monotonic()
            self._blocked = {ip: e for ip, e in self._blocked.items() if e[0] > now}
            while len(self._blocked) >= _MAX_BLOCKED:
                self._blocked.pop(next(iter(self._blocked)))
        self._blocked[client_ip] = (time.monotonic() + max(1, result.reset), result.limit)


def failures_of(services: Any) -> FailedCredentials | None:
    """The guard every entry point checks: the one of the services' current enforcement."""
    enforcement = getattr(services, "enforcement", None)
    return enforcement.failures if enforcement is not None else None


def too_many_failures(blocked: RateResult) -> TooManyRequests:
    refused = TooManyRequests("too_many_failures", MESSAGE)
    refused.retry_after = max(1, blocked.reset)
    return refused


class FailureCounter:
    """The event sink that counts failed credentials into the current guard (the one of the
    services' current enforcement, which a reload of the route policy may replace)."""

    def __init__(self, guard: Callable[[], FailedCredentials | None]) -> None:
        self.guard = guard

    def access_nowait(self, event: AccessEvent) -> bool:
        """Nothing to count (``True``), or a failure to count (``False``: awaited)."""
        return event.decision.reason not in FAILURE_REASONS

    async def access(self, event: AccessEvent) -> None:
        if (
            event.decision.reason in FAILURE_REASONS
            and event.client_ip
            and event.source not in REPORTED_SOURCES
        ):
            guard = self.guard()
            if guard is not None:
                await guard.count(event.client_ip)

    async def admin(self, event: AdminEvent) -> None:
        return None

    async def security(self, event: SecurityEvent) -> None:
        return None
