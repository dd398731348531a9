"""Tables of the dashboard: admin users, their project memberships, sessions, recovery codes.

Alembic revision ``0006_users`` creates them.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, ForeignKey, Index, String, Table

from tokenward.store.tables import RecordedText, TypedText, UTCDateTime, metadata

admin_users = Table(
    "admin_users",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("login", TypedText(64, "login"), nullable=False, unique=True),
    Column("password_hash", String(255), nullable=False),
    Column("role", String(16), nullable=False),
    Column("totp_secret", String(255), nullable=True),  # AES-GCM sealed, see security.py
    Column("totp_last_step", BigInteger, nullable=True),  # refuses replay of a used code
    Column("created_at", UTCDateTime(), nullable=False),
    Column("password_changed_at", UTCDateTime(), nullable=False),
)

admin_memberships = Table(
    "admin_memberships",
    metadata,
    Column(
        "user_id", String(32), ForeignKey("admin_users.id", ondelete="CASCADE"), primary_key=True
    ),
    Column(
        "project_id", String(32), ForeignKey("projects.id", ondelete="CASCADE"), primary_key=True
    ),
)

admin_sessions = Table(
    "admin_sessions",
    metadata,
    Column("id_hash", String(64), primary_key=True),
    Column("user_id", String(32), ForeignKey("admin_users.id", ondelete="CASCADE"), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("last_seen_at", UTCDateTime(), nullable=False),
    Column("mfa_at", UTCDateTime(), nullable=True),  # None: password only, second factor due
    Column("pending_totp", String(255), nullable=True),  # enrolment in progress, sealed
    Column("client_ip", String(64), nullable=True),
    Column("user_agent", RecordedText(256), nullable=True),
    Index("ix_admin_sessions_user_id", "user_id"),
)

admin_recovery_codes = Table(
    "admin_recovery_codes",
    metadata,
    Column(
        "user_id", String(32), ForeignKey("admin_users.id", ondelete="CASCADE"), primary_key=True
    ),
    Column("code_hash", String(64), primary_key=True),
    Column("used_at", UTCDateTime(), nullable=True),
)
