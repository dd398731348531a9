"""Tables of webhooks: the endpoints, and the deliveries (queue and log in one).

An endpoint belongs to a project (or, with ``project_id`` NULL, to the whole server: every
project's events). A delivery is one event for one endpoint: ``pending`` while it waits for
its next attempt (``next_attempt_at``), ``delivered`` or ``failed`` once done; a replica
sending it holds ``lease_until`` so no other replica sends it at the same time. Deliveries to
a URL that is not an endpoint (a token's rotation target, the alert URL of the detector
settings) name the URL and carry their own sealed secret.
"""

from __future__ import annotations

from sqlalchemy import JSON, Column, Index, Integer, String, Table, Text

from tokenward.store.tables import RecordedJSON, RecordedText, TypedText, UTCDateTime, metadata

webhook_endpoints = Table(
    "webhook_endpoints",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("project_id", String(32), nullable=True),
    Column("url", TypedText(2048, "url"), nullable=False),
    Column("events", JSON, nullable=False),  # list of event types, or ["*"]
    Column("secret", Text, nullable=False),  # sealed (tokenward.sealing, purpose webhook)
    Column("description", TypedText(200, "description"), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("created_by", String(64), nullable=True),
    Index("ix_webhook_endpoints_project", "project_id"),
)

webhook_messages = Table(
    "webhook_messages",
    metadata,
    Column("id", String(40), primary_key=True),  # msg_…: the webhook-id header
    Column("endpoint_id", String(32), nullable=True),
    Column("project_id", String(32), nullable=True),
    Column("url", RecordedText(2048), nullable=False),
    Column("secret", Text, nullable=True),  # sealed; only for deliveries without an endpoint
    Column("type", String(40), nullable=False),
    Column("subject", String(32), nullable=True),  # the token or alert it is about
    Column("payload", RecordedJSON, nullable=False),
    Column("status", String(12), nullable=False),  # pending | delivered | failed | dropped
    Column("attempts", Integer, nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("next_attempt_at", UTCDateTime(), nullable=True),
    Column("lease_until", UTCDateTime(), nullable=True),
    Column("last_attempt_at", UTCDateTime(), nullable=True),
    Column("last_status", Integer, nullable=True),
    Column("last_error", RecordedText(300), nullable=True),
    Index("ix_webhook_messages_due", "status", "next_attempt_at"),
    Index("ix_webhook_messages_endpoint", "endpoint_id", "created_at"),
    Index("ix_webhook_messages_subject", "subject"),
)
