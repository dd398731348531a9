"""One decision for one proxied request: route policy, credential, verifier, limits.

:meth:`Enforcement.decide` is the whole pipeline of the gateway and of ``/authz``, top to
bottom: brute-force guard for the client IP → canonical path → route → bearer credential →
:meth:`Verifier.verify` (state, project, environment, IP allowlists, scope, token and route
rate limits, remaining uses) → count a failure for the IP when the credential was bad.
:meth:`Enforcement.record` emits the one access event the decision owes the audit trail.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from urllib.parse import unquote

from tokenward.clientip import ClientIPResolver
from tokenward.events import AccessEvent, EventBus
from tokenward.failures import FailedCredentials
from tokenward.gateway.config import Policy, Route
from tokenward.limits import RateLimiter, RateResult
from tokenward.oauth.dpop import ALGORITHMS as DPOP_ALGORITHMS
from tokenward.oauth.dpop import DPoPRequest
from tokenward.tokens.format import bearer_credential, redact_tokens
from tokenward.tokens.hashing import TokenHasher
from tokenward.tokens.model import Reason, TokenRecord
from tokenward.verify import Decision, Verifier

_MESSAGES: dict[Reason, str] = {
    Reason.MISSING_CREDENTIAL: "send a token as 'Authorization: Bearer <token>'",
    Reason.MALFORMED: "the token is malformed",
    Reason.BAD_CHECKSUM: "the token is malformed",
    Reason.UNKNOWN: "the token is not known",
    Reason.REVOKED: "the token has been revoked",
    Reason.EXPIRED: "the token has expired",
    Reason.NOT_YET_VALID: "the token is not valid yet",
    Reason.ROTATED: "the token was rotated and its grace period is over",
    Reason.USES_EXHAUSTED: "the token has no uses left",
    Reason.INSUFFICIENT_SCOPE: "the token lacks the scope this route needs",
    Reason.IP_NOT_ALLOWED: "the token may not be used from this address",
    Reason.WRONG_PROJECT: "the token belongs to another project",
    Reason.WRONG_ENVIRONMENT: "the token belongs to another environment",
    Reason.RATE_LIMITED: "the rate limit is exhausted; retry later",
    Reason.TOO_MANY_FAILURES: "too many failed authentications from this address; retry later",
    Reason.UNAVAILABLE: "a dependency is unavailable; access denied",
    Reason.NO_ROUTE: "no route allows this method and path",
    Reason.AMBIGUOUS_REQUEST: "X-Original-*, X-Forwarded-* or the request line name "
    "different requests (or one of these headers repeats with another value); the proxy must "
    "remove the client's copy of the headers it does not set",
}
_MAX_BLOCKED = 100_000
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")  # never let a value break a header line
_CONTROL = re.compile(r"[\x00-\x1f\x7f\\]")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")  # a "%" not followed by two hex digits
#: Requests refused before any decision: error code → message (audited as ``malformed``).
DUPLICATE_AUTHORIZATION = "duplicate_authorization"
_REFUSALS: dict[str, str] = {
    DUPLICATE_AUTHORIZATION: "the request carries more than one Authorization header; "
    "send exactly one",
}


def canonical_path(raw: str) -> str | None:
    """The decoded path if it is canonical, else ``None`` (then no route can match).

    Dot segments, empty segments, encoded slashes or backslashes, control characters, raw
    non-ASCII bytes (HTTP wants them percent-encoded) and ``%`` not followed by two hex digits
    are refused rather than normalised: the upstream must see exactly the path that was
    matched, and a path that different servers would read differently is an attack, not a
    typo.
    """
    if not raw.startswith("/") or len(raw) > 4096 or not raw.isascii():
        return None
    path = raw
    if "%" in raw:
        lowered = raw.lower()
        if "%2f" in lowered or "%5c" in lowered or "%00" in lowered:
            return None
        if _BAD_ESCAPE.search(raw):
            return None
        try:
            path = unquote(raw, errors="strict")
        except UnicodeDecodeError:
            return None
    if _CONTROL.search(path):
        return None
    # An empty segment other than the last one ("//"), or a "." or ".." segment.
    if "//" in path or "/./" in path or "/../" in path or path.endswith(("/.", "/..")):
        return None
    return path


@dataclass(slots=True)
class Outcome:
    """A decision with what the HTTP answer needs."""

    decision: Decision
    route: Route | None = None
    scope: str | None = None
    credential: str | None = None
    failures: RateResult | None = None  # set when the IP is blocked for failed attempts
    refusal: str | None = None  # a request refused as malformed, before any decision

    @classmethod
    def refused(cls, code: str) -> Outcome:
        """A request refused before any decision (``400``, RFC 6750 ``invalid_request``);
        its audit event records ``malformed``."""
        return cls(Decision(False, Reason.MALFORMED), refusal=code)

    @property
    def allowed(self) -> bool:
        return self.decision.allowed

    @property
    def status(self) -> int:
        return 400 if self.refusal is not None else self.decision.status

    @property
    def error(self) -> str:
        if self.refusal is not None:
            return self.refusal
        reason = self.decision.reason
        if self.status == 401 and reason is not Reason.MISSING_CREDENTIAL:
            return "invalid_token"
        return reason.value

    @property
    def message(self) -> str:
        if self.refusal is not None:
            return _REFUSALS[self.refusal]
        return _MESSAGES.get(self.decision.reason, self.decision.reason.value)

    @property
    def ratelimit(self) -> RateResult | None:
        return self.failures or self.decision.ratelimit

    def body(self) -> dict[str, object]:
        body: dict[str, object] = {"error": self.error, "message": self.message}
        if self.error == "invalid_token":
            body["reason"] = self.decision.reason.value
        if self.decision.reason is Reason.INSUFFICIENT_SCOPE and self.scope:
            body["scope"] = self.scope
        return body

    def identity_headers(self) -> list[tuple[str, str]]:
        """Who the caller is, for the upstream (only for an allowed request)."""
        token = self.decision.token
        if not self.decision.allowed or token is None:
            return []
        headers = [
            ("X-Tokenward-Token-Id", token.id),
            ("X-Tokenward-Principal", _CONTROL_CHARS.sub("", token.principal)),
            ("X-Tokenward-Scopes", " ".join(token.scopes)),
            ("X-Tokenward-Project", token.project or ""),
            ("X-Tokenward-Environment", token.environment),
        ]
        if token.identity is not None:  # its external id: printable ASCII by construction
            headers.append(("X-Tokenward-Identity", token.identity.external_id))
        return headers

    def limit_headers(self) -> list[tuple[str, str]]:
        """``RateLimit-*``, ``Retry-After`` on 429, ``WWW-Authenticate`` on 401/scope."""
        decision = self.decision
        if decision.allowed:  # the common case: at most the RateLimit-* headers
            allowed = decision.ratelimit
            if allowed is None or not allowed.limit:
                return []
            return [
                ("RateLimit-Limit", str(allowed.limit)),
                ("RateLimit-Remaining", str(allowed.remaining)),
                ("RateLimit-Reset", str(allowed.reset)),
            ]
        if self.refusal is not None:
            return [
                (
                    "WWW-Authenticate",
                    f'Bearer realm="tokenward", error="invalid_request", '
                    f'error_description="{self.message}"',
                )
            ]
        out: list[tuple[str, str]] = []
        rate = self.ratelimit
        if rate is not None and rate.limit:
            out += [
                ("RateLimit-Limit", str(rate.limit)),
                ("RateLimit-Remaining", str(rate.remaining)),
                ("RateLimit-Reset", str(rate.reset)),
            ]
        if self.status == 429:
            out.append(("Retry-After", str(max(1, rate.reset if rate else 1))))
        elif self.status == 401:
            if decision.reason is Reason.MISSING_CREDENTIAL:
                out.append(("WWW-Authenticate", 'Bearer realm="tokenward"'))
            elif decision.reason in _DPOP_REASONS:
                # RFC 9449 §7.1: a DPoP-bound token is challenged with the DPoP scheme.
                error = (
                    "invalid_dpop_proof"
                    if decision.reason is Reason.INVALID_DPOP_PROOF
                    else ("invalid_token")
                )
                out.append(
                    (
                        "WWW-Authenticate",
                        f'DPoP realm="tokenward", error="{error}", '
                        f'error_description="{self.message}", algs="{_DPOP_ALGS}"',
                    )
                )
            else:
                out.append(
                    (
                        "WWW-Authenticate",
                        f'Bearer realm="tokenward", error="invalid_token", '
                        f'error_description="{self.message}"',
                    )
                )
        elif decision.reason is Reason.INSUFFICIENT_SCOPE:
            out.append(
                (
                    "WWW-Authenticate",
                    f'Bearer realm="tokenward", error="insufficient_scope", '
                    f'scope="{self.scope or ""}"',
                )
            )
        return out


_DPOP_REASONS = (Reason.DPOP_REQUIRED, Reason.INVALID_DPOP_PROOF)
_DPOP_ALGS = " ".join(DPOP_ALGORITHMS)


class _Identity:
    """A token's identity headers, as ASGI pairs and as HTTP/1.1 header lines."""

    __slots__ = ("lines", "pairs", "record")

    def __init__(self, record: TokenRecord, headers: list[tuple[str, str]]) -> None:
        self.record = record
        self.pairs = [(k.lower().encode(), v.encode()) for k, v in headers]
        self.lines = b"".join(f"{k}: {v}\r\n".encode() for k, v in headers)


class Enforcement:
    """The route policy and the services a decision needs, shared by gateway and /authz."""

    def __init__(
        self,
        policy: Policy,
        verifier: Verifier,
        limiter: RateLimiter,
        events: EventBus,
        hasher: TokenHasher,
        resolver: ClientIPResolver,
        *,
        failure_limit: tuple[str, ...] = ("20/minute",),
        public_url: str | None = None,
    ) -> None:
        #: the base URL clients use (``TOKENWARD_PUBLIC_URL``), for DPoP ``htu`` checks
        self.public_url = public_url.rstrip("/") if public_url else None
        self.policy = policy
        self.verifier = verifier
        self.limiter = limiter
        self.events = events
        self.hasher = hasher
        self.resolver = resolver
        self.failure_limit = failure_limit
        #: the failed-credential limit of every entry point (see tokenward.failures)
        self.failures = FailedCredentials(limiter, failure_limit)
        #: token id → its identity headers, built once per cached token record
        self._identity: dict[str, _Identity] = {}

    def _identity_of(self, token: TokenRecord, outcome: Outcome) -> _Identity:
        cached = self._identity.get(token.id)
        if cached is None or cached.record is not token:
            if len(self._identity) >= _MAX_BLOCKED:
                self._identity.clear()
            cached = self._identity[token.id] = _Identity(token, outcome.identity_headers())
        return cached

    def raw_headers(self, outcome: Outcome) -> list[tuple[bytes, bytes]]:
        """Identity, then limit headers, as ASGI bytes; identity is built once per token."""
        out: list[tuple[bytes, bytes]] = []
        token = outcome.decision.token
        if outcome.allowed and token is not None:
            out += self._identity_of(token, outcome).pairs
        limits = outcome.limit_headers()
        if limits:
            out += [(k.lower().encode(), v.encode("latin-1", "replace")) for k, v in limits]
        return out

    def identity_lines(self, outcome: Outcome) -> bytes:
        """The identity headers as HTTP/1.1 header lines (for the upstream of an allowed
        request), built once per token."""
        token = outcome.decision.token
        if not outcome.allowed or token is None:
            return b""
        return self._identity_of(token, outcome).lines

    async def decide(
        self,
        method: str,
        raw_path: str,
        authorization: str | None,
        client_ip: str | None,
        *,
        proxied: bool = False,
        dpop_proof: str | None = None,
        url: str | None = None,
    ) -> Outcome:
        """Decide one request. ``dpop_proof`` is its ``DPoP`` header and ``url`` the URL the
        client called (scheme, host and path), which a DPoP proof's ``htu`` must name."""
        # 1. Brute-force guard: a blocked address gets 429 before any token lookup.
        blocked = self.failures.blocked_for(client_ip)
        if blocked is not None:
            return Outcome(Decision(False, Reason.TOO_MANY_FAILURES), failures=blocked)
        # 2. Route: canonical path, method, the scope it needs. Unmatched is denied.
        path = canonical_path(raw_path)
        match = self.policy.match(method, path, proxied=proxied) if path is not None else None
        if match is None:
            return Outcome(Decision(False, Reason.NO_ROUTE))
        route = match.route
        # 3. The bearer credential, verified for this route from this address.
        credential = bearer_credential(authorization)
        dpop = None
        if dpop_proof is not None or (authorization or "")[:5].lower() == "dpop ":
            # RFC 9449: ``Authorization: DPoP <token>`` with a ``DPoP`` proof header
            scheme, _, value = (authorization or "").partition(" ")
            credential = value.strip() or None if scheme.lower() in ("bearer", "dpop") else None
            base = self.public_url
            target = base + path if base and path is not None else (url or raw_path)
            dpop = DPoPRequest(dpop_proof, method, target)
        if credential is None:
            return Outcome(Decision(False, Reason.MISSING_CREDENTIAL), route, match.scope)
        decision = await self.verifier.verify(
            credential,
            dpop=dpop,
            scope=match.scope,
            ip=client_ip,
            project=route.project,
            environment=route.environment,
            route_limit=route.limit,
            cost=route.cost,
        )
        # 4. A credential that is no token at all counts against the address: its access
        # event does (see record() and tokenward.failures.FailureCounter).
        return Outcome(decision, route, match.scope, credential)

    def blocked(self, client_ip: str) -> RateResult | None:
        """The block in force on ``client_ip`` for failed credentials, if any (for listeners
        that decide without :meth:`decide`, such as the PostgreSQL gateway; their denials are
        counted from their access events, as every entry point's are)."""
        return self.failures.blocked_for(client_ip)

    async def record(
        self,
        outcome: Outcome,
        *,
        source: str,
        method: str,
        path: str,
        client_ip: str | None,
        request_id: str,
        user_agent: str | None,
        started: float,
    ) -> None:
        """Emit the access event of ``outcome`` (``started``: a ``perf_counter()`` reading)."""
        fingerprint = None
        if outcome.decision.token is None and outcome.credential:
            fingerprint = self.hasher.fingerprint(outcome.credential)
        await self.events.access(
            AccessEvent(
                at=self.verifier.clock(),
                source=source,
                decision=outcome.decision,
                request_id=request_id,
                client_ip=client_ip,
                user_agent=user_agent,
                method=method,
                # Every consumer (audit, detectors' evidence, alert webhooks) gets the path
                # with a pasted secret cut out, percent-encoded or not.
                path=redact_tokens(path[:8192])[:2048],
                scope=outcome.scope,
                latency_ms=(time.perf_counter() - started) * 1000,
                fingerprint=fingerprint,
            )
        )
