"""Response bodies of the API, for its OpenAPI document.

The routes build their bodies from the domain (``record.public()`` and friends); these models
describe them and are never used to filter or re-validate what is sent (routes declare them
with ``responses=``, not ``response_model=``). The contract test (tests/api/test_contract.py)
checks every answer against them, so a field added or changed in the domain without its
model here fails CI.

Objects are open (``additionalProperties``): a client must ignore fields it does not know,
and a new field is not a breaking change. Every field listed is always present.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel

Timestamp = str  # RFC 3339, UTC, "Z"


class Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorDetail(Open):
    field: str = Field(description="Dotted path of the field, or 'body'.")
    problem: str = Field(description="The rule it broke (never the value given).")


class ErrorBody(Open):
    """Every error: a stable machine ``error`` code and a human ``message``."""

    model_config = ConfigDict(extra="allow", title="Error")
    error: str = Field(description="Stable machine-readable code.", examples=["invalid_request"])
    message: str = Field(description="What went wrong, for a person (never a secret).")
    details: list[ErrorDetail] | None = Field(None, description="One entry per invalid field.")
    error_description: str | None = Field(None, description="OAuth endpoints (RFC 6749 §5.2).")


class Health(Open):
    status: str


class Ready(Open):
    status: str
    checks: dict[str, str]


class Project(Open):
    id: str
    name: str
    created_at: Timestamp
    ip_allowlist: list[str]


class ProjectList(Open):
    projects: list[Project]
    limit: int
    next_cursor: str | None = Field(description="Pass as cursor for the next page.")


class TokenIdentityRef(Open):
    id: str
    external_id: str


class Refill(Open):
    """Credits that refill: ``remaining_uses`` is set back to ``amount`` every interval."""

    amount: int
    interval: Literal["hour", "day", "month"]
    day: int | None = Field(description="Day of the month of a monthly refill (UTC).")
    refilled_at: Timestamp | None = Field(description="The last refill (or the creation).")


class VerifiedIdentity(Open):
    id: str
    external_id: str
    metadata: dict[str, str]


class Identity(Open):
    """An identity (owner) of tokens: one per user, by the project's own external id."""

    id: str
    project: str
    external_id: str
    metadata: dict[str, str]
    rate_limit: str | None = Field(description="Counted once for all its tokens.")
    created_at: Timestamp
    updated_at: Timestamp


class IdentityView(Identity):
    tokens: int = Field(description="How many unrevoked tokens it has.")


class IdentityList(Open):
    identities: list[Identity]
    next: str | None = Field(description="Cursor of the next page (``after``), if any.")


class IdentityDeleted(Open):
    external_id: str
    revoked: list[str] = Field(description="Ids of the tokens revoked with it.")


class Token(Open):
    """What the API shows about a token: never its secret nor its hash."""

    id: str
    project: str | None
    environment: Literal["live", "test"]
    name: str
    kind: str
    principal: str | None
    scopes: list[str]
    hint: str
    created_at: Timestamp
    created_by: str | None
    not_before: Timestamp | None
    expires_at: Timestamp | None
    ip_allowlist: list[str]
    rate_limit: str | None
    remaining_uses: int | None
    rotated_from: str | None
    replaced_by: str | None
    grace_until: Timestamp | None
    revoked_at: Timestamp | None
    revoked_reason: str | None
    last_used_at: Timestamp | None
    last_used_ip: str | None
    metadata: dict[str, str]
    family_id: str | None
    dpop_jkt: str | None
    rotation_period: int | None = Field(description="Seconds.")
    quarantined_at: Timestamp | None
    quarantine_reason: str | None
    disabled_at: Timestamp | None = Field(description="Set while an admin has disabled it.")
    disabled_reason: str | None
    disabled_by: str | None = Field(description="Id of the credential that disabled it.")
    identity: TokenIdentityRef | None = Field(description="The identity (owner), if any.")
    refill: Refill | None = Field(description="Credits that refill, if any.")


class TokenView(Token):
    state: str = Field(description="active, expired, revoked, rotated, …")


class Notice(Open):
    code: str = Field(description="Stable: unknown_scope, never_expires.")
    message: str


class IssuedToken(Token):
    """A new token: the only answer that carries its secret."""

    token: str = Field(description="The secret, shown this once.")
    warning: str
    warnings: list[Notice] = Field(
        default_factory=list,
        description="What may be a mistake: a scope nothing uses (a typo?), no expiry.",
    )


class RotatedToken(IssuedToken):
    previous: dict[str, str | None] = Field(description="The old token's id and grace_until.")


class TokenList(Open):
    tokens: list[TokenView]
    limit: int
    next_cursor: str | None = Field(description="Pass as cursor for the next page.")


class RateLimitState(Open):
    limit: int
    remaining: int
    reset: int


class VerifyResult(Open):
    valid: bool
    reason: str
    token_id: str | None
    project: str | None
    environment: str | None
    principal: str | None
    scopes: list[str]
    expires_at: Timestamp | None
    remaining_uses: int | None = Field(
        description="Credits left (after this request's cost); null: unlimited."
    )
    ratelimit: dict[str, Any] | None
    identity: VerifiedIdentity | None = Field(description="The token's identity, if any.")


class Introspection(Open):
    """RFC 7662 §2.2: only ``active`` when the token is not active."""

    active: bool


class TokenResponse(Open):
    """RFC 6749 §5.1 / RFC 8693 §2.2.1."""

    access_token: str
    token_type: str
    expires_in: int
    scope: str
    issued_token_type: str | None = None
    refresh_token: str | None = None


class Revoked(Open):
    """RFC 7009 §2.2: an empty object, whether or not the token was known."""


class ProjectPolicy(Open):
    max_token_lifetime: int | None = Field(description="Seconds.")
    access_token_ttl: int | None = Field(description="Seconds.")
    require_dpop: bool
    expiry_warning_days: int | None
    leak_action: Literal["revoke", "quarantine"]


class TrustPolicy(Open):
    id: str
    project: str
    name: str
    issuer: str
    audience: str
    claims: dict[str, str]
    scopes: list[str]
    environment: str
    principal_claim: str
    max_ttl: int = Field(description="Seconds.")
    refresh_ttl: int | None = Field(description="Seconds.")
    created_at: Timestamp
    created_by: str | None


class TrustPolicyList(Open):
    trust_policies: list[TrustPolicy]


class Rotation(Open):
    token_id: str
    grace: int = Field(description="Seconds.")
    quiet: int | None = Field(description="Seconds.")
    webhook_url: str
    due_at: Timestamp
    previous_id: str | None
    attempts: int
    last_error: str | None


class RotationCreated(Rotation):
    webhook_secret: str = Field(description="The webhook signing secret, shown this once.")
    warning: str


class AuditEvent(Open):
    seq: int
    id: str
    at: Timestamp
    kind: str
    action: str
    decision: str | None
    reason: str | None


class AuditPage(Open):
    events: list[AuditEvent]
    limit: int
    next_cursor: str | None = Field(description="Pass as cursor for the next page.")


class AuditVerification(Open):
    ok: bool


class Alert(Open):
    id: str
    created_at: Timestamp
    project_id: str | None
    detector: str
    severity: str
    summary: str
    token_id: str | None
    client_ip: str | None
    request_id: str | None
    evidence: dict[str, Any]
    actions: list[Any]
    acknowledged_at: Timestamp | None
    acknowledged_by: str | None
    ack_note: str | None


class AlertDetail(Alert):
    deliveries: list[dict[str, Any]]


class AlertPage(Open):
    alerts: list[Alert]
    limit: int
    next_cursor: str | None = Field(description="Pass as cursor for the next page.")


class IpBlock(Open):
    id: str
    network: str
    reason: str
    alert_id: str | None
    created_at: Timestamp
    expires_at: Timestamp | None
    lifted_at: Timestamp | None


class IpBlockList(Open):
    blocks: list[IpBlock]


class LiftedBlock(Open):
    id: str
    lifted: bool


class AnomalySettings(Open):
    """The detectors' settings of one scope (global, or a project's overrides applied)."""


class AuthorizationServerMetadata(Open):
    """RFC 8414 §2."""

    issuer: str
    token_endpoint: str
    introspection_endpoint: str
    revocation_endpoint: str
    grant_types_supported: list[str]
    token_endpoint_auth_methods_supported: list[str]
    introspection_endpoint_auth_methods_supported: list[str]
    revocation_endpoint_auth_methods_supported: list[str]
    response_types_supported: list[str]


class TokenLookupEntry(Open):
    """What the server knows of one secret (never the secret): nulls when not found."""

    found: bool
    hint: str | None = Field(description="tw_live_…abcd, for a well-formed token.")
    id: str | None = None
    project: str | None = None
    name: str | None = None
    kind: str | None = None
    state: str | None = None
    quarantined: bool | None = None


class TokenLookup(Open):
    tokens: list[TokenLookupEntry]


class LeakedToken(TokenView):
    action: Literal["revoked", "quarantined", "none"] = Field(
        description="What the project's leak_action did (none: a canary, or no longer live)."
    )
    alert_id: str | None


class LeakVerdict(Open):
    """GitHub's partner feedback format: the token by its SHA-256, never itself."""

    token_hash: str = Field(description="Hex SHA-256 of the reported token.")
    token_type: str
    label: Literal["true_positive", "false_positive"]


class LeakVerdicts(RootModel[list[LeakVerdict]]):
    """One verdict per reported token, in the report's order."""
