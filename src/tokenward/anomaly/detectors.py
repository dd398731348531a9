"""The detectors: small state machines fed the live stream of access events.

Each ``observe`` looks at one event (and the project's settings for its detector) and
returns a :class:`Finding` or ``None``. Detectors do no I/O except the new-network detector,
which asks the engine for what it remembers of a token. State is kept per key (a network or
a token) in bounded maps, so memory stays flat under any traffic; windows are measured in
event time, so the same stream always gives the same findings.
"""

from __future__ import annotations

import ipaddress
import math
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Generic, TypeVar

from tokenward.anomaly.config import (
    Action,
    BruteForce,
    Canary,
    LeakedToken,
    NewNetwork,
    ScopeProbing,
    VolumeSpike,
)
from tokenward.clientip import parse_ip
from tokenward.events import AccessEvent
from tokenward.tokens.model import Reason, TokenKind

K = TypeVar("K")
V = TypeVar("V")

MAX_KEYS = 100_000

#: denials that mean "this is not a real token": what a guesser gets
FAILED_GUESS = frozenset({Reason.MALFORMED, Reason.BAD_CHECKSUM, Reason.UNKNOWN})
#: a real token that should no longer be in anyone's hands
LEAK_SIGNS = frozenset({Reason.REVOKED, Reason.EXPIRED, Reason.ROTATED})


@dataclass(slots=True)
class Finding:
    detector: str
    severity: str
    key: str  # what cooldowns are counted per (a network, a token)
    summary: str
    actions: list[Action]
    cooldown_seconds: float
    project_id: str | None = None
    token_id: str | None = None
    client_ip: str | None = None
    network: str | None = None
    request_id: str | None = None
    evidence: dict[str, Any] = field(default_factory=dict)
    block_seconds: float | None = None
    #: a block this finding makes is scoped to this project (its evidence is that project's
    #: caller's word, see :attr:`tokenward.events.AccessEvent.ip_reported_by`)
    block_project_id: str | None = None


class Bounded(OrderedDict[K, V], Generic[K, V]):
    """A dict that forgets its least recently used keys beyond ``limit``."""

    def __init__(self, limit: int = MAX_KEYS) -> None:
        super().__init__()
        self.limit = limit

    def touch(self, key: K, default: Callable[[], V]) -> V:
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = self[key] = default()
        if len(self) > self.limit:
            self.popitem(last=False)
        return value


@lru_cache(maxsize=65_536)
def network_of(ip: str | None, v4_prefix: int, v6_prefix: int) -> str | None:
    """The ``/v4_prefix`` or ``/v6_prefix`` network around ``ip`` (``None`` if not an IP)."""
    address = parse_ip(ip) if ip else None
    if address is None:
        return None
    prefix = v4_prefix if address.version == 4 else v6_prefix
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))


def _base(event: AccessEvent) -> dict[str, Any]:
    token = event.decision.token
    return {
        "project_id": token.project_id if token else event.ip_reported_by,
        "token_id": token.id if token else None,
        "client_ip": event.client_ip,
        "request_id": event.request_id,
        "block_project_id": event.ip_reported_by,
    }


class BruteForceDetector:
    name = "brute_force"

    def __init__(self) -> None:
        self.windows: Bounded[str, deque[tuple[float, str | None]]] = Bounded()

    def observe(self, event: AccessEvent, cfg: BruteForce) -> Finding | None:
        if event.decision.reason not in FAILED_GUESS:
            return None
        network = network_of(event.client_ip, cfg.ipv4_prefix, cfg.ipv6_prefix)
        if network is None:
            return None
        now = event.at.timestamp()
        # one project's reports never add up with another's, nor with the server's own
        key = f"{event.ip_reported_by}:{network}" if event.ip_reported_by else network
        window = self.windows.touch(key, deque)
        window.append((now, event.fingerprint))
        while window and window[0][0] <= now - cfg.window_seconds:
            window.popleft()
        if len(window) < cfg.threshold:
            return None
        distinct = len({fp for _, fp in window if fp})
        return Finding(
            self.name,
            cfg.severity,
            key,
            f"{len(window)} failed verifications from {network} in {cfg.window_seconds:g}s",
            list(cfg.actions),
            cfg.cooldown_seconds,
            network=network,
            evidence={
                "failures": len(window),
                "window_seconds": cfg.window_seconds,
                "distinct_credentials": distinct,
                "last_reason": event.decision.reason.value,
            },
            block_seconds=cfg.block_seconds,
            **_base(event),
        )


class LeakedTokenDetector:
    name = "leaked_token"

    def observe(self, event: AccessEvent, cfg: LeakedToken) -> Finding | None:
        token = event.decision.token
        reason = event.decision.reason
        if token is None or reason not in LEAK_SIGNS:
            return None
        return Finding(
            self.name,
            cfg.severity,
            token.id,
            f"{reason.value} token {token.id} was presented",
            list(cfg.actions),
            cfg.cooldown_seconds,
            evidence={"reason": reason.value, "hint": token.hint, "principal": token.principal},
            **_base(event),
        )


class NewNetworkDetector:
    """Learns each token's networks; alerts when a token shows up somewhere new.

    ``load`` gives what was learnt about a token before (the engine reads it from the store
    once per token); ``remember`` stores a newly seen network.
    """

    name = "new_network"

    def __init__(
        self,
        load: Callable[[str], Awaitable[set[str]]],
        remember: Callable[[str, str, AccessEvent], Awaitable[None]],
    ) -> None:
        self.load = load
        self.remember = remember
        self.known: Bounded[str, set[str]] = Bounded()

    async def observe(self, event: AccessEvent, cfg: NewNetwork) -> Finding | None:
        token = event.decision.token
        if token is None or token.kind == TokenKind.CANARY:
            return None
        network = network_of(event.client_ip, cfg.ipv4_prefix, cfg.ipv6_prefix)
        if network is None:
            return None
        known = self.known.get(token.id)
        if known is None:
            known = self.known.touch(token.id, set)
            known.update(await self.load(token.id))
        if network in known:
            return None
        learning = (event.at - token.created_at).total_seconds() < cfg.learning_seconds
        first = not known
        known.add(network)
        await self.remember(token.id, network, event)
        if learning or first:
            return None
        return Finding(
            self.name,
            cfg.severity,
            f"{token.id}:{network}",
            f"token {token.id} used from a new network {network}",
            list(cfg.actions),
            cfg.cooldown_seconds,
            network=network,
            evidence={"network": network, "known_networks": sorted(known - {network})[:20]},
            **_base(event),
        )


@dataclass(slots=True)
class _Rate:
    bucket: int
    count: int = 0
    mean: float = 0.0
    var: float = 0.0
    intervals: int = 0
    fired: bool = False


class VolumeSpikeDetector:
    """Requests per interval against an EWMA of the token's own past intervals."""

    name = "volume_spike"

    def __init__(self) -> None:
        self.rates: Bounded[str, _Rate] = Bounded()

    @staticmethod
    def _close(rate: _Rate, count: int, alpha: float) -> None:
        if rate.intervals == 0:
            rate.mean = float(count)
        else:
            diff = count - rate.mean
            increment = alpha * diff
            rate.mean += increment
            rate.var = (1 - alpha) * (rate.var + diff * increment)
        rate.intervals += 1

    def observe_many(self, events: list[AccessEvent], cfg: VolumeSpike) -> Finding | None:
        """The events of one token, in order (a batch of allowed decisions): the first
        finding they make, if any."""
        found = None
        for event in events:
            finding = self.observe(event, cfg)
            if found is None:
                found = finding
        return found

    def observe(self, event: AccessEvent, cfg: VolumeSpike) -> Finding | None:
        token = event.decision.token
        if token is None:
            return None
        bucket = int(event.at.timestamp() // cfg.interval_seconds)
        rate = self.rates.touch(token.id, lambda: _Rate(bucket))
        if bucket > rate.bucket:
            self._close(rate, rate.count, cfg.alpha)
            for _ in range(min(bucket - rate.bucket - 1, 100)):  # quiet intervals count as 0
                self._close(rate, 0, cfg.alpha)
            rate.bucket, rate.count, rate.fired = bucket, 0, False
        elif bucket < rate.bucket:
            return None  # a late event from an interval already closed
        rate.count += 1
        if rate.fired or rate.intervals < cfg.warmup_intervals or rate.count < cfg.min_count:
            return None
        spread = max(math.sqrt(rate.var), math.sqrt(rate.mean), 1.0)
        limit = rate.mean + cfg.deviations * spread
        if rate.count <= limit:
            return None
        rate.fired = True
        return Finding(
            self.name,
            cfg.severity,
            token.id,
            f"token {token.id}: {rate.count} requests in {cfg.interval_seconds:g}s, "
            f"baseline {rate.mean:.1f}",
            list(cfg.actions),
            cfg.cooldown_seconds,
            evidence={
                "count": rate.count,
                "interval_seconds": cfg.interval_seconds,
                "baseline": round(rate.mean, 2),
                "stddev": round(math.sqrt(rate.var), 2),
                "threshold": round(limit, 2),
            },
            **_base(event),
        )


class ScopeProbingDetector:
    name = "scope_probing"

    def __init__(self) -> None:
        self.windows: Bounded[str, deque[tuple[float, str | None]]] = Bounded()

    def observe(self, event: AccessEvent, cfg: ScopeProbing) -> Finding | None:
        token = event.decision.token
        if token is None or event.decision.reason != Reason.INSUFFICIENT_SCOPE:
            return None
        now = event.at.timestamp()
        window = self.windows.touch(token.id, deque)
        window.append((now, event.scope))
        while window and window[0][0] <= now - cfg.window_seconds:
            window.popleft()
        if len(window) < cfg.threshold:
            return None
        tried = sorted({s for _, s in window if s})
        return Finding(
            self.name,
            cfg.severity,
            token.id,
            f"token {token.id} denied {len(window)} times for scopes it lacks",
            list(cfg.actions),
            cfg.cooldown_seconds,
            evidence={"denials": len(window), "scopes_tried": tried[:20], "held": token.scopes},
            **_base(event),
        )


class CanaryDetector:
    name = "canary"

    def observe(self, event: AccessEvent, cfg: Canary) -> Finding | None:
        token = event.decision.token
        if token is None or token.kind != TokenKind.CANARY:
            return None
        return Finding(
            self.name,
            cfg.severity,
            f"{token.id}:{event.client_ip}",
            f"canary token {token.id} ({token.name or token.hint}) was used",
            list(cfg.actions),
            cfg.cooldown_seconds,
            evidence={
                "name": token.name,
                "hint": token.hint,
                "source": event.source,
                "user_agent": event.user_agent,
                "path": event.path,
            },
            **_base(event),
        )
