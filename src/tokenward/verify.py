"""The hot path: a presented credential becomes a :class:`Decision` (DESIGN.md §1).

:meth:`Verifier.verify` reads top to bottom in the order of the design: syntax and checksum,
keyed hash → cache → store, state, tenant/project/environment, IP allowlist, scope, rate
limit, remaining uses. Every outcome is a value with a stable reason; only a lost dependency
raises inside, and that becomes ``unavailable`` (fail closed).
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy.exc import SQLAlchemyError

from tokenward.clientip import parse_ip
from tokenward.errors import Unavailable
from tokenward.limits import RateLimiter, RateResult
from tokenward.oauth.dpop import DPoPChecker, DPoPError, DPoPRequest
from tokenward.store.repository import TokenStore
from tokenward.tokens.credits import available
from tokenward.tokens.format import TOKEN_LENGTH, TokenFormatError, parse_token
from tokenward.tokens.hashing import TokenHasher
from tokenward.tokens.model import STATE_REASONS, Reason, TokenKind, TokenRecord
from tokenward.tokens.scopes import scopes_allow

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
T = TypeVar("T")

#: HTTP status that goes with each deny reason (RFC 6750: 401 for a bad token, 403 for scope).
STATUS_BY_REASON: dict[Reason, int] = {
    Reason.OK: 200,
    Reason.INSUFFICIENT_SCOPE: 403,
    Reason.IP_NOT_ALLOWED: 403,
    Reason.WRONG_ENVIRONMENT: 403,
    Reason.WRONG_PROJECT: 403,
    Reason.IP_BLOCKED: 403,
    Reason.AMBIGUOUS_REQUEST: 403,
    Reason.RATE_LIMITED: 429,
    Reason.UNAVAILABLE: 503,
    Reason.NO_ROUTE: 404,
    Reason.TOO_MANY_FAILURES: 429,
}


#: Seconds a verification waits for the token store (a lookup, spending a use) before it
#: is denied ``unavailable``: a cache miss against a database that hangs is answered 503
#: within this bound, not when the driver gives up.
STORE_TIMEOUT = 3.0
#: reads of one token a cache fill makes when the token keeps changing while it is read
RELOADS = 3
#: invalidations remembered for reads in flight before the oldest are forgotten
EPOCH_HISTORY = 65_536


async def bounded(awaitable: Awaitable[T], limit: float | None) -> T:
    """``awaitable``'s result, or ``TimeoutError`` once ``limit`` seconds have passed.

    Unlike ``asyncio.timeout``, the caller does not wait for the abandoned work to unwind:
    a database call cancelled mid-query closes its connection on the way out, and the driver
    gives that close its own seconds against a database that does not answer. That happens
    in the background here, so the bound is the one the caller sees.
    """
    if limit is None:
        return await awaitable
    task = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait((task,), timeout=limit)
    except BaseException:
        task.cancel()
        raise
    if done:
        return task.result()
    task.cancel()
    task.add_done_callback(_retrieve)
    raise TimeoutError


def _retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()  # marked seen: nobody awaits an abandoned call


#: an invalidation message naming a project (its settings changed) rather than a token id
PROJECT_PREFIX = "project:"
#: an invalidation message naming an identity (changed or deleted): all its tokens
IDENTITY_PREFIX = "identity:"


def project_message(project_id: str) -> str:
    """The invalidation message (as the fan-out carries it) for every token of a project.

    A replica of an earlier release reads it as an unknown token id and drops nothing, as
    before: its cache TTL stays its bound for project changes.
    """
    return PROJECT_PREFIX + project_id


def identity_message(identity_id: str) -> str:
    """The invalidation message for every token of an identity (see :func:`project_message`:
    a replica of an earlier release drops nothing for it)."""
    return IDENTITY_PREFIX + identity_id


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(slots=True)
class Decision:
    allowed: bool
    reason: Reason
    token: TokenRecord | None = None
    ratelimit: RateResult | None = None
    remaining_uses: int | None = None

    @property
    def status(self) -> int:
        return STATUS_BY_REASON.get(self.reason, 401)

    def as_dict(self) -> dict[str, Any]:
        """The body of ``POST /v1/verify``."""
        token = self.token
        return {
            "valid": self.allowed,
            "reason": self.reason.value,
            "token_id": token.id if token else None,
            "project": token.project if token else None,
            "environment": token.environment if token else None,
            "principal": token.principal if token else None,
            "scopes": list(token.scopes) if token else [],
            "expires_at": (
                token.expires_at.isoformat().replace("+00:00", "Z")
                if token and token.expires_at
                else None
            ),
            "remaining_uses": self.remaining_uses if token else None,
            "ratelimit": self.ratelimit.as_dict() if self.ratelimit else None,
            # (an unknown token, a canary among them, reveals nothing of its owner)
            "identity": (
                token.identity.public()
                if token and token.identity and self.reason != Reason.UNKNOWN
                else None
            ),
        }


@dataclass(slots=True)
class _Entry:
    record: TokenRecord
    networks: tuple[IPNetwork, ...]
    fresh_until: float
    project_networks: tuple[IPNetwork, ...] = ()


def parse_networks(cidrs: Iterable[str]) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(c, strict=False) for c in cidrs)


def ip_allowed(ip: str | None, networks: tuple[IPNetwork, ...]) -> bool:
    address = parse_ip(ip) if ip is not None else None
    if address is None:
        return False
    return any(address in net for net in networks if net.version == address.version)


class Verifier:
    """Verifies credentials against the store, through a short-lived per-process cache.

    The cache is a safety net, not the source of truth: every change to a token (revoke,
    rotate) calls :meth:`invalidate` before the change is acknowledged, so a revoked token is
    never served from this process's cache after the revoke call returns.

    A change wins over any store read that started before it. Each invalidation is numbered
    (an *epoch*); a load remembers the epoch it started at and, when the token it read was
    invalidated meanwhile (by id, by project or by a :meth:`clear`), reads the store again
    instead of caching what may be the state from before the change. Without this, a read in
    flight when the revoke (or the fan-out message) arrives would put the pre-revoke state in
    the cache for a whole TTL (docs/decisions/0022-a-change-wins-over-a-read-in-flight.md).
    """

    def __init__(
        self,
        store: TokenStore,
        hasher: TokenHasher,
        limiter: RateLimiter,
        *,
        cache_ttl: float = 5.0,
        cache_size: int = 100_000,
        clock: Callable[[], datetime] = utcnow,
        store_timeout: float | None = None,
    ) -> None:
        self.store = store
        #: seconds a store lookup may take before the decision is ``unavailable``
        self.store_timeout = STORE_TIMEOUT if store_timeout is None else store_timeout
        self.hasher = hasher
        self.limiter = limiter
        self.cache_ttl = cache_ttl
        self.cache_size = cache_size
        self.clock = clock
        self._cache: dict[str, _Entry] = {}
        self._hash_by_id: dict[str, str] = {}
        self._seen: dict[str, tuple[datetime, str | None]] = {}
        self._cache_enabled = True
        self._loading: dict[str, asyncio.Future[_Entry | None]] = {}
        #: invalidation epochs: the counter, and the last epoch of each token id, project and
        #: clear (kept only while a load that started before them may still be in flight)
        self._epoch = 0
        self._changed: dict[str, int] = {}
        self._project_changed: dict[str, int] = {}
        self._identity_changed: dict[str, int] = {}
        self._cleared = 0
        self._load_started: dict[str, int] = {}
        self.hits = 0
        self.misses = 0
        #: checks proofs for DPoP-bound tokens (replaced by a Redis-backed one when configured)
        self.dpop = DPoPChecker()
        #: answers whether a client address is temporarily blocked (anomaly response)
        #: (address, project the verification is made for) -> refused?
        self.is_blocked: Callable[[str, str | None], bool] | None = None
        #: told after every invalidation, with (token id, project id): one of them set, or
        #: neither for a :meth:`clear`; holders of long-lived sessions (the PostgreSQL
        #: gateway) re-check the sessions it names
        self.invalidation_listeners: list[Callable[[str | None, str | None], None]] = []

    async def verify(
        self,
        credential: str,
        *,
        scope: str | None = None,
        ip: str | None = None,
        tenant: str | None = None,
        project: str | None = None,
        environment: str | None = None,
        consume: bool = True,
        route_limit: tuple[str, tuple[str, ...]] | None = None,
        dpop: DPoPRequest | None = None,
        cost: int = 1,
    ) -> Decision:
        """Decide whether ``credential`` may do ``scope`` from ``ip``.

        ``tenant`` is the project of the *caller* (a project-bound verify credential): a token
        of another project is reported ``unknown`` and nothing about it is revealed.
        ``project`` and ``environment`` are what a route requires. ``consume=False`` (for
        introspection) checks without counting a rate-limit hit or spending a use.
        ``route_limit`` is a route's own limit (key, windows), counted per token after the
        token's own limit and before a use is spent.
        ``dpop`` is the request's DPoP proof context (see :func:`tokenward.oauth.dpop_request`):
        a DPoP-bound token is allowed only with a fresh proof by its key.
        ``cost`` is the credits the request spends from a token with remaining uses (0: it
        needs one left and spends none).
        """
        if (
            ip is not None
            and self.is_blocked is not None
            and self.is_blocked(ip, tenant or project)
        ):
            return Decision(False, Reason.IP_BLOCKED)
        # 1. A token this process has seen lately is in the cache under its keyed hash (a
        # hash match means the very string whose syntax was checked when it was cached).
        # Only a string of a token's length and alphabet is hashed at all.
        token_hash = (
            self.hasher.hash(credential)
            if len(credential) == TOKEN_LENGTH and credential.isascii()
            else None
        )
        entry = self._fresh(token_hash) if token_hash is not None else None
        if entry is None:
            # 2. Syntax and checksum (no store is touched for garbage), then the store.
            try:
                parse_token(credential)
            except TokenFormatError as exc:
                return Decision(False, Reason(exc.reason))
            assert token_hash is not None  # a well-formed token is ASCII of TOKEN_LENGTH
            try:
                entry = await self._lookup(credential, token_hash)
            except Unavailable:
                return Decision(False, Reason.UNAVAILABLE)
        if entry is None:
            return Decision(False, Reason.UNKNOWN)
        record = entry.record
        if tenant is not None and record.project_id != tenant:
            return Decision(False, Reason.UNKNOWN)
        if record.kind == TokenKind.CANARY:
            # A canary is never legitimately used: to its presenter it looks unknown.
            return Decision(False, Reason.UNKNOWN, record)
        if record.kind == TokenKind.REFRESH:
            # A refresh token is good at the token endpoint only, never as a credential.
            return Decision(False, Reason.WRONG_TOKEN_TYPE, record)
        # 3. State: revoked, rotated out, expired, not yet valid.
        now = self.clock()
        reason = STATE_REASONS.get(record.state(now))
        if reason is not None:
            return Decision(False, reason, record)
        if record.quarantined_at is not None:
            return Decision(False, Reason.QUARANTINED, record)
        if record.disabled_at is not None:
            return Decision(False, Reason.DISABLED, record)
        # 4. The route's project and environment.
        if project is not None and record.project_id != project and record.project != project:
            return Decision(False, Reason.WRONG_PROJECT, record)
        if environment is not None and record.environment != environment:
            return Decision(False, Reason.WRONG_ENVIRONMENT, record)
        # 4b. Sender constraint (RFC 9449): a bound token needs a fresh proof by its key.
        if record.dpop_jkt is not None and consume:
            try:
                await self.dpop.check(
                    dpop, now=now, access_token=credential, expected_jkt=record.dpop_jkt
                )
            except DPoPError as exc:
                return Decision(False, Reason(exc.reason), record)
            except Unavailable:
                return Decision(False, Reason.UNAVAILABLE, record)
        # 5. IP allowlists, the token's own and its project's (an introspection without a
        # client IP asks about the token only).
        if entry.networks and (consume or ip is not None) and not ip_allowed(ip, entry.networks):
            return Decision(False, Reason.IP_NOT_ALLOWED, record)
        if (
            entry.project_networks
            and (consume or ip is not None)
            and not ip_allowed(ip, entry.project_networks)
        ):
            return Decision(False, Reason.IP_NOT_ALLOWED, record)
        # 6. Scope.
        if scope is not None and not scopes_allow(record.scopes, scope):
            return Decision(False, Reason.INSUFFICIENT_SCOPE, record)
        # 7. Rate limit, then remaining uses (a denied request spends no use).
        ratelimit = None
        if not consume:
            left = available(record.remaining_uses, record.refill, record.refilled_at, now)
            if left == 0 and record.replaced_by is None:
                return Decision(False, Reason.USES_EXHAUSTED, record, None, 0)
            return Decision(True, Reason.OK, record, None, left)
        if record.rate_limit:
            try:
                counter = record.rate_limit_counter  # shared by the token's lineage
                ratelimit = await self.limiter.hit(counter, tuple(record.rate_limit))
            except Unavailable:
                return Decision(False, Reason.UNAVAILABLE, record)
            if not ratelimit.allowed:
                return Decision(False, Reason.RATE_LIMITED, record, ratelimit)
        identity = record.identity
        if identity is not None and identity.rate_limit:
            try:  # one counter for all the identity's tokens, whatever their lineage
                owner_rate = await self.limiter.hit(identity.id, identity.rate_limit)
            except Unavailable:
                return Decision(False, Reason.UNAVAILABLE, record)
            if not owner_rate.allowed:
                return Decision(False, Reason.RATE_LIMITED, record, owner_rate)
            if ratelimit is None or owner_rate.remaining < ratelimit.remaining:
                ratelimit = owner_rate
        if route_limit is not None:
            try:
                route_key = f"{route_limit[0]}:{record.rate_limit_counter}"
                route_rate = await self.limiter.hit(route_key, route_limit[1])
            except Unavailable:
                return Decision(False, Reason.UNAVAILABLE, record)
            if not route_rate.allowed:
                return Decision(False, Reason.RATE_LIMITED, record, route_rate)
            if ratelimit is None or route_rate.remaining < ratelimit.remaining:
                ratelimit = route_rate
        remaining = record.remaining_uses
        if remaining is not None:
            try:
                spent = await self._guard(
                    self.store.consume_use(
                        record.id,
                        rotated=record.replaced_by is not None,
                        cost=cost,
                        refill=record.refill,
                        now=now,
                    )
                )
            except Unavailable:
                return Decision(False, Reason.UNAVAILABLE, record)
            # The cached record follows (introspection reads it without spending).
            if not spent.allowed:
                if record.refill is None:
                    record.remaining_uses = spent.remaining
                return Decision(False, Reason.USES_EXHAUSTED, record, ratelimit, spent.remaining)
            record.remaining_uses = remaining = spent.remaining
            if record.refill is not None:
                record.refilled_at = now  # in the current period: the refill is done
        self._seen[record.id] = (now, ip)
        return Decision(True, Reason.OK, record, ratelimit, remaining)

    @property
    def cache_enabled(self) -> bool:
        """Switched off by the revocation fan-out while it is not subscribed (fail safe).

        Switching it back on forgets everything cached meanwhile: those entries were filled
        while invalidations could be missed.
        """
        return self._cache_enabled

    @cache_enabled.setter
    def cache_enabled(self, enabled: bool) -> None:
        if enabled and not self._cache_enabled:
            self.clear()
        self._cache_enabled = enabled

    def _fresh(self, token_hash: str) -> _Entry | None:
        """The cached entry for ``token_hash`` while it is fresh (and the cache is on)."""
        entry = self._cache.get(token_hash) if self.cache_enabled else None
        if entry is not None and entry.fresh_until > time.monotonic():
            self.hits += 1
            return entry
        return None

    async def _lookup(self, credential: str, token_hash: str) -> _Entry | None:
        """The store's entry for a token the cache did not have fresh."""
        self.misses += 1
        # One store lookup per token at a time: concurrent misses (a cache entry expiring
        # under load) wait for the lookup in flight instead of each querying the store.
        pending = self._loading.get(token_hash)
        if pending is not None:
            return await asyncio.shield(pending)
        loading: asyncio.Future[_Entry | None] = asyncio.get_running_loop().create_future()
        self._loading[token_hash] = loading
        try:
            entry = await self._load(credential, token_hash)
        except BaseException as exc:
            loading.set_exception(exc)
            loading.exception()  # retrieved: waiters (if any) re-raise it themselves
            raise
        else:
            loading.set_result(entry)
        finally:
            del self._loading[token_hash]
        return entry

    async def _load(self, credential: str, token_hash: str) -> _Entry | None:
        hashes = [token_hash] if len(self.hasher.keys) == 1 else self.hasher.candidates(credential)
        for _ in range(RELOADS):
            started = self._load_started[token_hash] = self._epoch
            try:
                found = await self._guard(self.store.find_by_hash(hashes))
                changed = found is not None and self._changed_since(found[0], started)
            finally:
                del self._load_started[token_hash]
                if not self._load_started:
                    self._forget_epochs()
            if found is None:
                self._cache.pop(token_hash, None)
                return None
            record, _matched = found
            entry = _Entry(
                record,
                parse_networks(record.ip_allowlist),
                time.monotonic() + self.cache_ttl,
                parse_networks(record.project_ip_allowlist),
            )
            if not changed:
                break
            # The token changed while it was read: what was read may be the state from
            # before the change. Read again; a read that starts now sees the change.
        else:
            # Changed again during every read (a flood of changes to one token): answer with
            # the newest read, but cache nothing from it.
            return entry
        if not self._cache_enabled:
            return entry
        if len(self._cache) >= self.cache_size:
            oldest = next(iter(self._cache))
            self._hash_by_id.pop(self._cache.pop(oldest).record.id, None)
        self._cache[token_hash] = entry
        self._hash_by_id[record.id] = token_hash
        return entry

    def _changed_since(self, record: TokenRecord, epoch: int) -> bool:
        """Whether ``record`` was invalidated after ``epoch`` (by id, project or a clear)."""
        if self._epoch == epoch:
            return False
        return (
            self._cleared > epoch
            or self._changed.get(record.id, 0) > epoch
            or (
                record.project_id is not None
                and self._project_changed.get(record.project_id, 0) > epoch
            )
            or (
                record.identity_id is not None
                and self._identity_changed.get(record.identity_id, 0) > epoch
            )
        )

    def _next_epoch(self) -> int:
        self._epoch += 1
        remembered = len(self._changed) + len(self._project_changed) + len(self._identity_changed)
        if remembered >= EPOCH_HISTORY:
            # Past the bound, the history is summed up as one clear: every read still in
            # flight reads again (safe, only slower), and nothing more is remembered.
            self._cleared = self._epoch
            self._forget_epochs()
        return self._epoch

    def _forget_epochs(self) -> None:
        """No load is in flight: no read can predate an invalidation, so none is kept."""
        self._changed.clear()
        self._project_changed.clear()
        self._identity_changed.clear()

    async def _guard(self, awaitable: Any) -> Any:
        """``awaitable`` (a store call), bounded by ``store_timeout``: a store that fails or
        does not answer in time is ``Unavailable`` (the decision is ``unavailable``)."""
        try:
            return await bounded(awaitable, self.store_timeout)
        except (TimeoutError, SQLAlchemyError, OSError) as exc:
            raise Unavailable("store_unavailable", "the token store is unavailable") from exc

    def invalidate(self, token_id: str) -> None:
        """Forget a token's cached state (called on every change to it), and make every read
        of it still in flight read again."""
        if self._load_started:
            self._changed[token_id] = self._next_epoch()
        token_hash = self._hash_by_id.pop(token_id, None)
        if token_hash is not None:
            self._cache.pop(token_hash, None)
        self._notify(token_id, None)

    def _notify(self, token_id: str | None, project_id: str | None) -> None:
        for listener in self.invalidation_listeners:
            listener(token_id, project_id)

    def apply_invalidation(self, message: str) -> None:
        """Apply one invalidation message: a token id, or a :func:`project_message`."""
        if message.startswith(PROJECT_PREFIX):
            self.invalidate_project(message[len(PROJECT_PREFIX) :])
        elif message.startswith(IDENTITY_PREFIX):
            self.invalidate_identity(message[len(IDENTITY_PREFIX) :])
        else:
            self.invalidate(message)

    def invalidate_project(self, project_id: str) -> None:
        """Forget the cached state of every token of a project (its settings changed)."""
        if self._load_started:
            self._project_changed[project_id] = self._next_epoch()
        for token_hash, entry in list(self._cache.items()):
            if entry.record.project_id == project_id:
                self._cache.pop(token_hash, None)
                self._hash_by_id.pop(entry.record.id, None)
        self._notify(None, project_id)

    def invalidate_identity(self, identity_id: str) -> None:
        """Forget the cached state of every token of an identity (it changed or is gone).

        Holders of sessions are told as for a :meth:`clear` (they re-check all): they keep
        sessions by token, not by identity.
        """
        if self._load_started:
            self._identity_changed[identity_id] = self._next_epoch()
        for token_hash, entry in list(self._cache.items()):
            if entry.record.identity_id == identity_id:
                self._cache.pop(token_hash, None)
                self._hash_by_id.pop(entry.record.id, None)
        self._notify(None, None)

    def clear(self) -> None:
        """Forget every cached token, and make every read still in flight read again."""
        self._cleared = self._next_epoch()
        self._cache.clear()
        self._hash_by_id.clear()
        self._notify(None, None)

    async def flush_usage(self) -> None:
        """Write the buffered last-used times and IPs (called periodically and at shutdown)."""
        seen, self._seen = self._seen, {}
        try:
            await self.store.touch_many(seen)
        except (SQLAlchemyError, OSError):
            # Usage stamps are best-effort bookkeeping; keep them for the next try.
            for key, value in seen.items():
                self._seen.setdefault(key, value)
