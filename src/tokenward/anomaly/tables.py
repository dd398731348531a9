"""Tables of anomaly handling: alerts, webhook deliveries, IP blocks, settings, networks."""

from __future__ import annotations

from sqlalchemy import JSON, Column, Index, Integer, String, Table, Text

from tokenward.store.tables import (
    RecordedJSON,
    RecordedText,
    TypedJSON,
    TypedText,
    UTCDateTime,
    metadata,
)

alerts = Table(
    "alerts",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("project_id", String(32), nullable=True),
    Column("detector", String(32), nullable=False),
    Column("severity", String(16), nullable=False),
    Column("summary", RecordedText(300), nullable=False),
    Column("token_id", String(32), nullable=True),
    Column("client_ip", String(64), nullable=True),
    Column("request_id", String(64), nullable=True),
    Column("evidence", RecordedJSON, nullable=False),
    Column("actions", JSON, nullable=False),
    Column("acknowledged_at", UTCDateTime(), nullable=True),
    Column("acknowledged_by", String(64), nullable=True),
    Column("ack_note", TypedText(300, "note"), nullable=True),
    Index("ix_alerts_project_created", "project_id", "created_at"),
)

webhook_deliveries = Table(
    "webhook_deliveries",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("alert_id", String(32), nullable=False),
    Column("project_id", String(32), nullable=True),
    Column("url", RecordedText(2048), nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("at", UTCDateTime(), nullable=False),
    Column("status_code", Integer, nullable=True),
    Column("error", RecordedText(300), nullable=True),
    Column("delivered", Integer, nullable=False),
    Index("ix_webhook_deliveries_alert", "alert_id"),
)

ip_blocks = Table(
    "ip_blocks",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("network", String(64), nullable=False),
    Column("reason", TypedText(300, "reason"), nullable=False),
    Column("alert_id", String(32), nullable=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("expires_at", UTCDateTime(), nullable=False),
    Column("lifted_at", UTCDateTime(), nullable=True),
    #: NULL: refused everywhere; a project id: refused in that project only (see docs/anomaly.md)
    Column("project_id", String(32), nullable=True),
    Index("ix_ip_blocks_expires", "expires_at"),
)

#: Detector settings: ``scope`` is ``*`` for the global defaults or a project id.
anomaly_settings = Table(
    "anomaly_settings",
    metadata,
    Column("scope", String(32), primary_key=True),
    Column("config", TypedJSON("settings"), nullable=False),
    Column("webhook_secret", Text, nullable=True),
    Column("updated_at", UTCDateTime(), nullable=False),
)

#: Networks (/24, /64) each token has been used from: the new-network detector's memory.
token_networks = Table(
    "token_networks",
    metadata,
    Column("token_id", String(32), primary_key=True),
    Column("network", String(64), primary_key=True),
    Column("first_seen", UTCDateTime(), nullable=False),
)
