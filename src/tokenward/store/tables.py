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
)


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


metadata = MetaData()

projects = Table(
    "projects",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(64), nullable=False, unique=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("ip_allowlist", JSON, nullable=False, default=list),
    Column("settings", JSON, nullable=False, default=dict),
)

tokens = Table(
    "tokens",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("project_id", String(32), ForeignKey("projects.id"), nullable=True),
    Column("environment", String(8), nullable=False),
    Column("name", String(128), nullable=False),
    Column("kind", String(16), nullable=False),
    Column("principal", String(128), nullable=False),
    Column("scopes", JSON, nullable=False),
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
    Column("revoked_reason", String(200), nullable=True),
    Column("last_used_at", UTCDateTime(), nullable=True),
    Column("last_used_ip", String(64), nullable=True),
    Column("metadata", JSON, nullable=False),
    Column("family_id", String(32), nullable=True),
    Column("dpop_jkt", String(64), nullable=True),
    Column("rotation_period", Integer, nullable=True),
    Column("expiry_warned_at", UTCDateTime(), nullable=True),
    Column("quarantined_at", UTCDateTime(), nullable=True),
    Column("quarantine_reason", String(300), nullable=True),
    Index("ix_tokens_project_id", "project_id"),
    Index("ix_tokens_family_id", "family_id"),
)
