"""Database tables (SQLAlchemy Core). Alembic migrations in ``migrations/`` create them."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Column,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    TypeDecorator,
    UniqueConstraint,
)

from tokenward.errors import refuse_pasted_tokens
from tokenward.tokens.format import redact_all, redact_tokens


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every engine (SQLite keeps no zone of its own)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the store")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):  # pragma: no cover - defensive, SQLite returns datetimes
            value = datetime.fromisoformat(value)
        result: datetime = value
        return result.replace(tzinfo=UTC) if result.tzinfo is None else result.astimezone(UTC)


class TypedText(TypeDecorator[str]):
    """Text a caller typed (a name, a reason, a note, a URL): never stored when it holds a
    token (``400 token_in_field``, see :func:`tokenward.errors.refuse_pasted_tokens`).

    The services refuse such text where it enters, before anything changes; the column
    refuses it again, so that no path to the table can store one.
    """

    impl = String
    cache_ok = True

    def __init__(self, length: int | None = None, field: str = "text") -> None:
        super().__init__(length)
        self.length = length
        self.field = field

    def process_bind_param(self, value: str | None, dialect: Dialect) -> str | None:
        if value is not None:
            refuse_pasted_tokens(**{self.field: value})
        return value


class TypedJSON(TypeDecorator[Any]):
    """JSON a caller gave (metadata, claims, settings): refused like :class:`TypedText`
    when any string in it, keys included, holds a token."""

    impl = JSON
    cache_ok = True

    def __init__(self, field: str = "value") -> None:
        super().__init__()
        self.field = field

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        refuse_pasted_tokens(**{self.field: value})
        return value


class RecordedText(TypeDecorator[str]):
    """Text the server records about what happened (an error, a user agent, an alert's
    summary): a token-shaped string in it is cut to its public prefix, never stored."""

    impl = String
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Dialect) -> str | None:
        return redact_tokens(value) if value is not None else None


class RecordedJSON(TypeDecorator[Any]):
    """JSON the server records (an alert's evidence): every string redacted."""

    impl = JSON
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        return redact_all(value)


metadata = MetaData()

projects = Table(
    "projects",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("name", TypedText(64, "name"), nullable=False, unique=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("ip_allowlist", JSON, nullable=False, default=list),
    Column("settings", TypedJSON("settings"), nullable=False, default=dict),
)

tokens = Table(
    "tokens",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("project_id", String(32), ForeignKey("projects.id"), nullable=True),
    Column("environment", String(8), nullable=False),
    Column("name", TypedText(128, "name"), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("principal", TypedText(128, "principal"), nullable=False),
    Column("scopes", TypedJSON("scopes"), nullable=False),
    Column("token_hash", String(64), nullable=False, unique=True),
    Column("key_id", String(16), nullable=False),
    Column("hint", String(32), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("created_by", String(32), nullable=True),
    Column("not_before", UTCDateTime(), nullable=True),
    Column("expires_at", UTCDateTime(), nullable=True),
    Column("ip_allowlist", JSON, nullable=False),
    Column("rate_limit", String(200), nullable=True),
    #: the counter the rate limit is counted on (``NULL``: the token's own id); a token
    #: minted by a grant or a rotation counts on its lineage's, so the budget is shared
    Column("rate_limit_key", String(32), nullable=True),
    Column("remaining_uses", Integer, nullable=True),
    Column("rotated_from", String(32), nullable=True),
    Column("replaced_by", String(32), nullable=True),
    Column("grace_until", UTCDateTime(), nullable=True),
    Column("revoked_at", UTCDateTime(), nullable=True),
    Column("revoked_reason", TypedText(200, "reason"), nullable=True),
    Column("last_used_at", UTCDateTime(), nullable=True),
    Column("last_used_ip", String(64), nullable=True),
    Column("metadata", TypedJSON("metadata"), nullable=False),
    Column("family_id", String(32), nullable=True),
    Column("dpop_jkt", String(64), nullable=True),
    Column("rotation_period", Integer, nullable=True),
    Column("expiry_warned_at", UTCDateTime(), nullable=True),
    Column("quarantined_at", UTCDateTime(), nullable=True),
    Column("quarantine_reason", TypedText(300, "reason"), nullable=True),
    #: the identity (owner) of the token; its rate limit is shared by all its tokens
    Column("identity_id", String(32), nullable=True),
    #: credits that refill: ``remaining_uses`` is set back to ``refill_amount`` every
    #: ``refill_interval`` (hour, day, month on ``refill_day``); ``refilled_at`` is the last
    Column("refill_amount", Integer, nullable=True),
    Column("refill_interval", String(8), nullable=True),
    Column("refill_day", Integer, nullable=True),
    Column("refilled_at", UTCDateTime(), nullable=True),
    #: set while an admin has switched the token off (decision 0034); reversible
    Column("disabled_at", UTCDateTime(), nullable=True),
    Column("disabled_reason", TypedText(300, "reason"), nullable=True),
    Column("disabled_by", String(32), nullable=True),
    Index("ix_tokens_project_id", "project_id"),
    Index("ix_tokens_family_id", "family_id"),
    # the token search (migration 0009): keyset order, name prefix, principal, cut-offs
    Index("ix_tokens_created", "created_at", "id"),
    Index("ix_tokens_project_created", "project_id", "created_at", "id"),
    Index(
        "ix_tokens_project_name",
        "project_id",
        "name",
        postgresql_ops={"name": "varchar_pattern_ops"},
    ),
    Index("ix_tokens_project_principal", "project_id", "principal", "created_at", "id"),
    Index("ix_tokens_expires_at", "expires_at"),
    Index("ix_tokens_last_used_at", "last_used_at"),
    Index("ix_tokens_identity_id", "identity_id"),
)

#: identities (owners) of tokens: one per user of a project's API, by the project's own id
identities = Table(
    "identities",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("project_id", String(32), ForeignKey("projects.id"), nullable=False),
    Column("external_id", TypedText(128, "external_id"), nullable=False),
    Column("metadata", TypedJSON("metadata"), nullable=False),
    Column("rate_limit", String(200), nullable=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
    UniqueConstraint("project_id", "external_id", name="uq_identities_project_external"),
)
