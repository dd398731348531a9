"""Audit log (hash-chained), alerts, webhook deliveries, IP blocks, quarantine.

Revision ID: 0004_audit
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

from tokenward.store.tables import UTCDateTime

revision = "0004_audit"
down_revision = "0001"
branch_labels = None
depends_on = None

SEQ = sa.BigInteger().with_variant(sa.Integer, "sqlite")


def upgrade() -> None:
    op.create_table(
        "audit_events",
        sa.Column("seq", SEQ, primary_key=True, autoincrement=False),
        sa.Column("id", sa.String(32), nullable=False, unique=True),
        sa.Column("at", UTCDateTime(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("source", sa.String(32), nullable=True),
        sa.Column("request_id", sa.String(64), nullable=True),
        sa.Column("project_id", sa.String(32), nullable=True),
        sa.Column("environment", sa.String(8), nullable=True),
        sa.Column("actor_id", sa.String(64), nullable=True),
        sa.Column("token_id", sa.String(32), nullable=True),
        sa.Column("principal", sa.String(128), nullable=True),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("method", sa.String(16), nullable=True),
        sa.Column("resource", sa.String(512), nullable=True),
        sa.Column("scope", sa.String(128), nullable=True),
        sa.Column("decision", sa.String(8), nullable=True),
        sa.Column("reason", sa.String(64), nullable=True),
        sa.Column("client_ip", sa.String(64), nullable=True),
        sa.Column("user_agent", sa.String(256), nullable=True),
        sa.Column("latency_us", sa.BigInteger, nullable=True),
        sa.Column("fingerprint", sa.String(32), nullable=True),
        sa.Column("detail", sa.JSON, nullable=False),
        sa.Column("key_id", sa.String(16), nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )
    op.create_index("ix_audit_events_at", "audit_events", ["at"])
    op.create_index("ix_audit_events_project_seq", "audit_events", ["project_id", "seq"])
    op.create_index("ix_audit_events_token_seq", "audit_events", ["token_id", "seq"])
    op.create_table(
        "audit_head",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )
    op.create_table(
        "audit_checkpoints",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.Column("pruned", sa.BigInteger, nullable=False),
        sa.Column("before", UTCDateTime(), nullable=False),
    )
    op.create_table(
        "alerts",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("project_id", sa.String(32), nullable=True),
        sa.Column("detector", sa.String(32), nullable=False),
        sa.Column("severity", sa.String(16), nullable=False),
        sa.Column("summary", sa.String(300), nullable=False),
        sa.Column("token_id", sa.String(32), nullable=True),
        sa.Column("client_ip", sa.String(64), nullable=True),
        sa.Column("request_id", sa.String(64), nullable=True),
        sa.Column("evidence", sa.JSON, nullable=False),
        sa.Column("actions", sa.JSON, nullable=False),
        sa.Column("acknowledged_at", UTCDateTime(), nullable=True),
        sa.Column("acknowledged_by", sa.String(64), nullable=True),
        sa.Column("ack_note", sa.String(300), nullable=True),
    )
    op.create_index("ix_alerts_project_created", "alerts", ["project_id", "created_at"])
    op.create_table(
        "webhook_deliveries",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("alert_id", sa.String(32), nullable=False),
        sa.Column("project_id", sa.String(32), nullable=True),
        sa.Column("url", sa.String(2048), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("at", UTCDateTime(), nullable=False),
        sa.Column("status_code", sa.Integer, nullable=True),
        sa.Column("error", sa.String(300), nullable=True),
        sa.Column("delivered", sa.Integer, nullable=False),
    )
    op.create_index("ix_webhook_deliveries_alert", "webhook_deliveries", ["alert_id"])
    op.create_table(
        "ip_blocks",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("network", sa.String(64), nullable=False),
        sa.Column("reason", sa.String(300), nullable=False),
        sa.Column("alert_id", sa.String(32), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("expires_at", UTCDateTime(), nullable=False),
        sa.Column("lifted_at", UTCDateTime(), nullable=True),
    )
    op.create_index("ix_ip_blocks_expires", "ip_blocks", ["expires_at"])
    op.create_table(
        "anomaly_settings",
        sa.Column("scope", sa.String(32), primary_key=True),
        sa.Column("config", sa.JSON, nullable=False),
        sa.Column("webhook_secret", sa.Text, nullable=True),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
    )
    op.create_table(
        "token_networks",
        sa.Column("token_id", sa.String(32), primary_key=True),
        sa.Column("network", sa.String(64), primary_key=True),
        sa.Column("first_seen", UTCDateTime(), nullable=False),
    )
    op.add_column("tokens", sa.Column("quarantined_at", UTCDateTime(), nullable=True))
    op.add_column("tokens", sa.Column("quarantine_reason", sa.String(300), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("tokens") as batch:
        batch.drop_column("quarantine_reason")
        batch.drop_column("quarantined_at")
    for name in (
        "token_networks",
        "anomaly_settings",
        "ip_blocks",
        "webhook_deliveries",
        "alerts",
        "audit_checkpoints",
        "audit_head",
        "audit_events",
    ):
        op.drop_table(name)
