"""Tables of short-lived-token sessions: trust policies, seen ``jti`` values, rotations."""

from __future__ import annotations

from sqlalchemy import Boolean, Column, ForeignKey, Index, Integer, String, Table, Text

from tokenward.store.tables import RecordedText, TypedJSON, TypedText, UTCDateTime, metadata

trust_policies = Table(
    "trust_policies",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("project_id", String(32), ForeignKey("projects.id"), nullable=False),
    Column("name", TypedText(64, "name"), nullable=False),
    Column("issuer", TypedText(512, "issuer"), nullable=False),
    Column("audience", TypedText(256, "audience"), nullable=False),
    Column("claims", TypedJSON("claims"), nullable=False),
    Column("scopes", TypedJSON("scopes"), nullable=False),
    Column("environment", String(8), nullable=False),
    Column("principal_claim", TypedText(64, "principal_claim"), nullable=False),
    Column("max_ttl", Integer, nullable=False),
    Column("refresh_ttl", Integer, nullable=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("created_by", String(32), nullable=True),
    Index("ux_trust_policies_project_name", "project_id", "name", unique=True),
    Index("ix_trust_policies_issuer", "issuer"),
)

#: one row per accepted (issuer, jti): an identity token is accepted once
seen_jtis = Table(
    "seen_jtis",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("expires_at", UTCDateTime(), nullable=False),
    Index("ix_seen_jtis_expires_at", "expires_at"),
)

#: how a token with a rotation period is rotated (moves to the successor on each rotation)
token_rotations = Table(
    "token_rotations",
    metadata,
    Column("token_id", String(32), ForeignKey("tokens.id"), primary_key=True),
    Column("grace", Integer, nullable=False),
    Column("quiet", Integer, nullable=True),
    Column("webhook_url", TypedText(2048, "webhook_url"), nullable=True),
    Column("webhook_secret", Text, nullable=True),
    Column("due_at", UTCDateTime(), nullable=False),
    Column("previous_id", String(32), nullable=True),
    Column("attempts", Integer, nullable=False, default=0),
    Column("last_error", RecordedText(200), nullable=True),
    Column("enabled", Boolean, nullable=False, default=True),
    Index("ix_token_rotations_due_at", "due_at"),
)

#: one row per token minted by a grant (exchange, refresh): which credential minted it
#: (``parent_id``: a token id, or a trust policy id for workload identity) and the long-lived
#: token at the root of the grant (``origin_id``; ``None`` for workload identity). Revoking
#: or quarantining a token revokes every row that descends from it (see
#: ``TokenStore.revoke_descendants``); a refresh checks its origin is still valid.
token_grants = Table(
    "token_grants",
    metadata,
    Column("token_id", String(32), ForeignKey("tokens.id"), primary_key=True),
    Column("parent_id", String(32), nullable=False),
    Column("origin_id", String(32), nullable=True),
    Index("ix_token_grants_parent_id", "parent_id"),
    Index("ix_token_grants_origin_id", "origin_id"),
)
