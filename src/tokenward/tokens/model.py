"""The token as the domain sees it, and the rules of its life (no I/O here)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from tokenward.tokens.credits import Refill


class TokenKind(StrEnum):
    API_KEY = "api_key"
    ACCESS = "access"
    REFRESH = "refresh"
    CANARY = "canary"


#: the scope a canary gets when none is asked for (a canary authorises nothing: verify
#: answers "unknown" to whoever presents one, so its scopes are only what it looks like)
CANARY_SCOPE = "canary:none"


class TokenState(StrEnum):
    ACTIVE = "active"
    NOT_YET_VALID = "not_yet_valid"
    EXPIRED = "expired"
    REVOKED = "revoked"
    ROTATED_IN_GRACE = "rotated_in_grace"
    ROTATED = "rotated"


class Reason(StrEnum):
    """Stable machine-readable reasons of a verification decision."""

    OK = "ok"
    MALFORMED = "malformed"
    BAD_CHECKSUM = "bad_checksum"
    UNKNOWN = "unknown"
    REVOKED = "revoked"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    ROTATED = "rotated"
    INSUFFICIENT_SCOPE = "insufficient_scope"
    IP_NOT_ALLOWED = "ip_not_allowed"
    RATE_LIMITED = "rate_limited"
    USES_EXHAUSTED = "uses_exhausted"
    WRONG_ENVIRONMENT = "wrong_environment"
    WRONG_PROJECT = "wrong_project"
    UNAVAILABLE = "unavailable"
    NO_ROUTE = "no_route"
    MISSING_CREDENTIAL = "missing_credential"
    TOO_MANY_FAILURES = "too_many_failures"
    WRONG_TOKEN_TYPE = "wrong_token_type"  # noqa: S105 - a reason code
    DPOP_REQUIRED = "dpop_required"
    INVALID_DPOP_PROOF = "invalid_dpop_proof"
    QUARANTINED = "quarantined"
    IP_BLOCKED = "ip_blocked"
    AMBIGUOUS_REQUEST = "ambiguous_request"
    #: a spent refresh token presented again within the reuse grace: a race, not a leak
    ALREADY_REFRESHED = "already_refreshed"
    #: an admin switched the token off (reversible: ``enable``); not a quarantine
    DISABLED = "disabled"


@dataclass(frozen=True, slots=True)
class TokenIdentity:
    """The identity (owner) a token belongs to, as the verifier reads it with the token."""

    id: str
    external_id: str
    metadata: dict[str, str] = field(default_factory=dict)
    #: the identity's own rate limit, one counter for all its tokens (empty: none)
    rate_limit: tuple[str, ...] = ()

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "external_id": self.external_id, "metadata": dict(self.metadata)}


@dataclass(slots=True)
class TokenRecord:
    """One token's stored state (never its secret)."""

    id: str
    project_id: str | None
    project: str | None
    environment: str
    name: str
    kind: str
    principal: str
    scopes: list[str]
    created_at: datetime
    not_before: datetime | None = None
    expires_at: datetime | None = None
    ip_allowlist: list[str] = field(default_factory=list)
    rate_limit: list[str] = field(default_factory=list)
    #: the counter ``rate_limit`` is counted on, shared by a lineage (``None``: own id)
    rate_limit_key: str | None = None
    remaining_uses: int | None = None
    rotated_from: str | None = None
    replaced_by: str | None = None
    grace_until: datetime | None = None
    revoked_at: datetime | None = None
    revoked_reason: str | None = None
    last_used_at: datetime | None = None
    last_used_ip: str | None = None
    created_by: str | None = None
    hint: str = ""
    key_id: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    #: the allowlist of the token's project (both it and the token's own must pass)
    project_ip_allowlist: list[str] = field(default_factory=list)
    #: exchange/refresh lineage: every token minted from one grant shares it
    family_id: str | None = None
    #: RFC 7638 thumbprint of the key the token is bound to (DPoP, RFC 9449)
    dpop_jkt: str | None = None
    #: automatic rotation period, in seconds
    rotation_period: int | None = None
    #: set while the token is suspended (by anomaly handling or an admin); reversible
    quarantined_at: datetime | None = None
    quarantine_reason: str | None = None
    #: set while an admin has switched the token off (decision 0034); reversible
    disabled_at: datetime | None = None
    disabled_reason: str | None = None
    disabled_by: str | None = None
    #: the identity (owner) the token belongs to, if any, read with the token
    identity: TokenIdentity | None = None
    #: credits that refill: ``remaining_uses`` is set back to ``refill.amount`` each period
    refill: Refill | None = None
    #: when the credits were last refilled (or the token created with them)
    refilled_at: datetime | None = None

    @property
    def identity_id(self) -> str | None:
        return self.identity.id if self.identity is not None else None

    @property
    def rate_limit_counter(self) -> str:
        """The key the rate limit is counted on: the lineage's origin for a token minted by
        exchange, refresh or rotation (one budget for all of them), else the token's id."""
        return self.rate_limit_key or self.id

    def state(self, now: datetime) -> TokenState:
        """The token's state at ``now``: the order of checks is the order of precedence."""
        if self.revoked_at is not None:
            return TokenState.REVOKED
        rotated = self.replaced_by is not None
        if rotated and (self.grace_until is None or now >= self.grace_until):
            return TokenState.ROTATED
        # A grace period never extends a token's life past its own expiry.
        if self.expires_at is not None and now >= self.expires_at:
            return TokenState.EXPIRED
        if self.not_before is not None and now < self.not_before:
            return TokenState.NOT_YET_VALID
        return TokenState.ROTATED_IN_GRACE if rotated else TokenState.ACTIVE

    def public(self) -> dict[str, Any]:
        """What the API shows about a token (no secret, no hash)."""
        return {
            "id": self.id,
            "project": self.project,
            "environment": self.environment,
            "name": self.name,
            "kind": self.kind,
            "principal": self.principal,
            "scopes": list(self.scopes),
            "hint": self.hint,
            "created_at": _iso(self.created_at),
            "created_by": self.created_by,
            "not_before": _iso(self.not_before),
            "expires_at": _iso(self.expires_at),
            "ip_allowlist": list(self.ip_allowlist),
            "rate_limit": ";".join(self.rate_limit) or None,
            "remaining_uses": self.remaining_uses,
            "rotated_from": self.rotated_from,
            "replaced_by": self.replaced_by,
            "grace_until": _iso(self.grace_until),
            "revoked_at": _iso(self.revoked_at),
            "revoked_reason": self.revoked_reason,
            "last_used_at": _iso(self.last_used_at),
            "last_used_ip": self.last_used_ip,
            "metadata": dict(self.metadata),
            "family_id": self.family_id,
            "dpop_jkt": self.dpop_jkt,
            "rotation_period": self.rotation_period,
            "quarantined_at": _iso(self.quarantined_at),
            "quarantine_reason": self.quarantine_reason,
            "disabled_at": _iso(self.disabled_at),
            "disabled_reason": self.disabled_reason,
            "disabled_by": self.disabled_by,
            "identity": (
                {"id": self.identity.id, "external_id": self.identity.external_id}
                if self.identity is not None
                else None
            ),
            "refill": (
                {**self.refill.public(), "refilled_at": _iso(self.refilled_at)}
                if self.refill is not None
                else None
            ),
        }


STATE_REASONS = {
    TokenState.REVOKED: Reason.REVOKED,
    TokenState.ROTATED: Reason.ROTATED,
    TokenState.EXPIRED: Reason.EXPIRED,
    TokenState.NOT_YET_VALID: Reason.NOT_YET_VALID,
}


def _iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value is not None else None
