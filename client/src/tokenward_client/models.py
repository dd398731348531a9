"""The admin and verify APIs' answers, as typed dictionaries.

They mirror the server's response models (``tokenward.api.responses``, published in
``/openapi.json``). At run time they are the plain dicts decoded from JSON, so an answer can
be printed or re-serialised as it is; a type checker sees their fields. Times are RFC 3339
strings (``2026-01-31T12:00:00Z``), durations are seconds. A newer server may add fields.
"""

from __future__ import annotations

from typing import Any, Literal, NotRequired, TypedDict


class Project(TypedDict):
    id: str
    name: str
    created_at: str
    ip_allowlist: list[str]


class Token(TypedDict):
    """A token's settings and state, never its secret."""

    id: str
    project: str | None
    environment: Literal["live", "test"]
    name: str
    kind: str
    principal: str | None
    scopes: list[str]
    hint: str
    created_at: str
    created_by: str | None
    not_before: str | None
    expires_at: str | None
    ip_allowlist: list[str]
    rate_limit: str | None
    remaining_uses: int | None
    rotated_from: str | None
    replaced_by: str | None
    grace_until: str | None
    revoked_at: str | None
    revoked_reason: str | None
    last_used_at: str | None
    last_used_ip: str | None
    metadata: dict[str, str]
    family_id: str | None
    dpop_jkt: str | None
    rotation_period: int | None
    quarantined_at: str | None
    quarantine_reason: str | None
    #: set while an admin has disabled the token (``disable_token``; servers before 0.1: absent)
    disabled_at: NotRequired[str | None]
    disabled_reason: NotRequired[str | None]
    disabled_by: NotRequired[str | None]
    #: the identity (owner): ``{"id", "external_id"}`` (servers with identities)
    identity: NotRequired[dict[str, str] | None]
    #: credits that refill: ``{"amount", "interval", "day", "refilled_at"}``
    refill: NotRequired[dict[str, Any] | None]
    #: active, expired, revoked, rotated, … (in lists and ``get_token``)
    state: NotRequired[str]


class Notice(TypedDict):
    """Something that may be a mistake: ``code`` is ``unknown_scope`` or ``never_expires``."""

    code: str
    message: str


class IssuedToken(Token):
    """A new token: ``token`` is the secret, shown this once."""

    token: str
    warning: str
    #: what may be a mistake: a scope that no route policy and no token of the project
    #: uses (a typo?), a token that never expires
    warnings: NotRequired[list[Notice]]


class RotatedToken(IssuedToken):
    previous: dict[str, str | None]


class TokenPage(TypedDict):
    tokens: list[Token]
    limit: int
    next_cursor: str | None


class VerifyResult(TypedDict):
    valid: bool
    reason: str
    token_id: str | None
    project: str | None
    environment: str | None
    principal: str | None
    scopes: list[str]
    expires_at: str | None
    remaining_uses: int | None
    ratelimit: dict[str, Any] | None
    #: the token's identity: ``{"id", "external_id", "metadata"}`` (servers with identities)
    identity: NotRequired[dict[str, Any] | None]


class Introspection(TypedDict):
    """RFC 7662 §2.2: ``active``, and the token's claims when it is active."""

    active: bool
    scope: NotRequired[str]
    client_id: NotRequired[str]
    token_type: NotRequired[str]
    exp: NotRequired[int]
    iat: NotRequired[int]
    sub: NotRequired[str]


class TokenResponse(TypedDict):
    """The token endpoint's answer (RFC 6749 §5.1, RFC 8693 §2.2.1)."""

    access_token: str
    token_type: str
    expires_in: int
    scope: str
    issued_token_type: NotRequired[str | None]
    refresh_token: NotRequired[str | None]


class ProjectPolicy(TypedDict):
    max_token_lifetime: int | None
    access_token_ttl: int | None
    require_dpop: bool
    expiry_warning_days: int | None


class TrustPolicy(TypedDict):
    id: str
    project: str
    name: str
    issuer: str
    audience: str
    claims: dict[str, str]
    scopes: list[str]
    environment: str
    principal_claim: str
    max_ttl: int
    refresh_ttl: int | None
    created_at: str
    created_by: str | None


class Rotation(TypedDict):
    token_id: str
    grace: int
    quiet: int | None
    webhook_url: str
    due_at: str
    previous_id: str | None
    attempts: int
    last_error: str | None
    #: the webhook signing secret, shown once, when the rotation is set up
    webhook_secret: NotRequired[str]
    warning: NotRequired[str]


class AuditEvent(TypedDict):
    seq: int
    id: str
    at: str
    kind: str
    action: str
    decision: str | None
    reason: str | None


class AuditPage(TypedDict):
    events: list[AuditEvent]
    limit: int
    next_cursor: str | None


class Alert(TypedDict):
    id: str
    created_at: str
    project_id: str | None
    detector: str
    severity: str
    summary: str
    token_id: str | None
    client_ip: str | None
    request_id: str | None
    evidence: dict[str, Any]
    actions: list[Any]
    acknowledged_at: str | None
    acknowledged_by: str | None
    ack_note: str | None
    deliveries: NotRequired[list[dict[str, Any]]]


class AlertPage(TypedDict):
    alerts: list[Alert]
    limit: int
    next_cursor: str | None


class TokenLookup(TypedDict):
    """What the server knows of one secret (``POST /v1/tokens/lookup``); never the secret."""

    found: bool
    hint: str | None
    id: str | None
    project: str | None
    name: str | None
    kind: str | None
    state: str | None
    quarantined: bool | None


class LeakReport(Token):
    """The token after a leak report, with what was done (revoked, quarantined or nothing)."""

    action: str
    alert_id: str | None


class ErrorBody(TypedDict):
    error: str
    message: str
    details: NotRequired[list[dict[str, str]] | None]
