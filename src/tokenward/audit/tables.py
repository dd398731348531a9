"""Tables of the audit log: the hash-chained events, the chain head and prune checkpoints."""

from __future__ import annotations

from sqlalchemy import JSON, BigInteger, Column, Index, Integer, String, Table

from tokenward.store.tables import UTCDateTime, metadata

#: One row per decision or admin action. ``seq`` is the chain order (1, 2, 3, …); each row
#: stores the hash of the previous one (``prev_hash``) and its own (``hash``).
audit_events = Table(
    "audit_events",
    metadata,
    Column(
        "seq", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=False
    ),
    Column("id", String(32), nullable=False, unique=True),
    Column("at", UTCDateTime(), nullable=False),
    Column("kind", String(16), nullable=False),  # access | admin | security
    Column("source", String(32), nullable=True),  # verify_api | authz | gateway | …
    Column("request_id", String(64), nullable=True),
    Column("project_id", String(32), nullable=True),
    Column("environment", String(8), nullable=True),
    Column("actor_id", String(64), nullable=True),
    Column("token_id", String(32), nullable=True),
    Column("principal", String(128), nullable=True),
    Column("action", String(64), nullable=False),
    Column("method", String(16), nullable=True),
    Column("resource", String(512), nullable=True),
    Column("scope", String(128), nullable=True),
    Column("decision", String(8), nullable=True),  # allow | deny (access events)
    Column("reason", String(64), nullable=True),
    Column("client_ip", String(64), nullable=True),
    Column("user_agent", String(256), nullable=True),
    Column("latency_us", BigInteger, nullable=True),
    Column("fingerprint", String(32), nullable=True),
    Column("detail", JSON, nullable=False),
    Column("key_id", String(16), nullable=False),
    Column("prev_hash", String(64), nullable=False),
    Column("hash", String(64), nullable=False),
    Index("ix_audit_events_at", "at"),
    Index("ix_audit_events_project_seq", "project_id", "seq"),
    Index("ix_audit_events_token_seq", "token_id", "seq"),
)

#: A single row (id = 1): the last written event. Writers lock it for the length of a batch,
#: which serialises chain appends across processes on SQLite and PostgreSQL alike.
audit_head = Table(
    "audit_head",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("seq", BigInteger, nullable=False),
    Column("hash", String(64), nullable=False),
)

#: Written when old events are pruned: the chain stays verifiable from the last checkpoint.
audit_checkpoints = Table(
    "audit_checkpoints",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("hash", String(64), nullable=False),
    Column("pruned", BigInteger, nullable=False),
    Column("before", UTCDateTime(), nullable=False),
)
