"""Tables of the audit log: the events (one hash chain per writer), the writers' chain
checkpoints, and the bases left by pruning.

Each writer (a replica, or one worker process of it) appends to a chain of its own: its own
``chain_id`` and ``seq``, no row shared with another writer (decision 0021). The events
table is keyed by ``(chain_id, seq)``; on SQLite it has no separate row id (``WITHOUT
ROWID``), so a row touches four B-trees: the table, time, project and token.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Index,
    Integer,
    PrimaryKeyConstraint,
    String,
    Table,
)

from tokenward.store.tables import UTCDateTime, metadata

#: The chain of the events written before chains were per writer (migration 0008).
LEGACY_CHAIN = "legacy"

#: One row per decision or admin action. ``seq`` is the position in the writer's chain (1,
#: 2, 3, …); each row stores the hash of the previous one in its chain (``prev_hash``) and
#: its own (``hash``). Reads merge the chains in ``(at, chain_id, seq)`` order.
audit_events = Table(
    "audit_events",
    metadata,
    Column("chain_id", String(32), nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("id", String(32), nullable=False),
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
    PrimaryKeyConstraint("chain_id", "seq", name="pk_audit_events"),
    Index("ix_audit_events_at", "at", "chain_id", "seq"),
    Index("ix_audit_events_project_at", "project_id", "at", "chain_id", "seq"),
    Index("ix_audit_events_token_at", "token_id", "at", "chain_id", "seq"),
    sqlite_with_rowid=False,
)

#: What each writer records of its own chain now and then (every few seconds, and when it
#: closes): the chain's head then, and the latest checkpoint of every other chain it saw
#: (``witness``), all under the chain key (``mac``) and chained to the writer's previous
#: checkpoint (``prev_mac``). Verification cross-checks them: a chain cut below a checkpoint
#: is truncated, a chain a checkpoint names but the log no longer holds was removed.
audit_chain_checkpoints = Table(
    "audit_chain_checkpoints",
    metadata,
    Column("chain_id", String(32), nullable=False),
    Column("n", BigInteger, nullable=False),  # 1, 2, 3, … per chain
    Column("at", UTCDateTime(), nullable=False),
    Column("seq", BigInteger, nullable=False),  # the chain's head when it was taken
    Column("hash", String(64), nullable=False),
    Column("closed", Boolean, nullable=False),  # the writer closed its chain cleanly
    Column("writer", String(128), nullable=False),  # host and process, for people
    Column("witness", JSON, nullable=False),  # {chain: [n, seq, hash]} of the others
    Column("key_id", String(16), nullable=True),
    Column("prev_mac", String(64), nullable=False),
    Column("mac", String(64), nullable=True),  # NULL only for the migrated legacy head
    PrimaryKeyConstraint("chain_id", "n", name="pk_audit_chain_checkpoints"),
    Index("ix_audit_chain_checkpoints_at", "at"),
)

#: Written when old events are pruned, one row per chain cut: the chain stays verifiable
#: from the newest deleted event (its position and hash).
audit_checkpoints = Table(
    "audit_checkpoints",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("chain_id", String(32), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("seq", BigInteger, nullable=False),
    Column("hash", String(64), nullable=False),
    Column("pruned", BigInteger, nullable=False),
    Column("before", UTCDateTime(), nullable=False),
    Index("ix_audit_checkpoints_chain_seq", "chain_id", "seq"),
)
