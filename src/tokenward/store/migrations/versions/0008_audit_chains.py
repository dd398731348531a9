"""One audit chain per writer (decision 0021).

The events are keyed by ``(chain_id, seq)`` (on SQLite without a separate row id) and read
in ``(at, chain_id, seq)`` order; the single chain written so far becomes chain ``legacy``,
its events unchanged (they still verify, with the hash they were written with). The shared
head row goes: its last value becomes the legacy chain's closing checkpoint. Prune bases
name their chain. The copy rewrites the events table once (a large log takes a while).

Revision ID: 0008_audit_chains
Revises: 0004_audit
"""

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

from tokenward.store.tables import UTCDateTime

revision = "0008_audit_chains"
down_revision = "0004_audit"
branch_labels = None
depends_on = None

LEGACY = "legacy"
GENESIS = "0" * 64

_FIELDS = (
    "id",
    "at",
    "kind",
    "source",
    "request_id",
    "project_id",
    "environment",
    "actor_id",
    "token_id",
    "principal",
    "action",
    "method",
    "resource",
    "scope",
    "decision",
    "reason",
    "client_ip",
    "user_agent",
    "latency_us",
    "fingerprint",
    "detail",
    "key_id",
    "prev_hash",
    "hash",
)


def _events_table(name: str) -> None:
    op.create_table(
        name,
        sa.Column("chain_id", sa.String(32), nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("id", sa.String(32), nullable=False),
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
        sa.PrimaryKeyConstraint("chain_id", "seq", name="pk_audit_events"),
        sqlite_with_rowid=False,
    )


def upgrade() -> None:
    conn = op.get_bind()
    _events_table("audit_events_chained")
    columns = ", ".join(_FIELDS)
    conn.execute(
        sa.text(
            f"INSERT INTO audit_events_chained (chain_id, seq, {columns}) "  # noqa: S608 (no input)
            f"SELECT '{LEGACY}', seq, {columns} FROM audit_events"
        )
    )
    op.drop_index("ix_audit_events_at", "audit_events")
    op.drop_index("ix_audit_events_project_seq", "audit_events")
    op.drop_index("ix_audit_events_token_seq", "audit_events")
    op.drop_table("audit_events")
    op.rename_table("audit_events_chained", "audit_events")
    op.create_index("ix_audit_events_at", "audit_events", ["at", "chain_id", "seq"])
    op.create_index(
        "ix_audit_events_project_at", "audit_events", ["project_id", "at", "chain_id", "seq"]
    )
    op.create_index(
        "ix_audit_events_token_at", "audit_events", ["token_id", "at", "chain_id", "seq"]
    )

    checkpoints = op.create_table(
        "audit_chain_checkpoints",
        sa.Column("chain_id", sa.String(32), nullable=False),
        sa.Column("n", sa.BigInteger, nullable=False),
        sa.Column("at", UTCDateTime(), nullable=False),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.Column("closed", sa.Boolean, nullable=False),
        sa.Column("writer", sa.String(128), nullable=False),
        sa.Column("witness", sa.JSON, nullable=False),
        sa.Column("key_id", sa.String(16), nullable=True),
        sa.Column("prev_mac", sa.String(64), nullable=False),
        sa.Column("mac", sa.String(64), nullable=True),
        sa.PrimaryKeyConstraint("chain_id", "n", name="pk_audit_chain_checkpoints"),
    )
    assert checkpoints is not None
    op.create_index("ix_audit_chain_checkpoints_at", "audit_chain_checkpoints", ["at"])
    # The old head row (not under the chain key, as it never was) closes the legacy chain.
    head = conn.execute(sa.text("SELECT seq, hash FROM audit_head WHERE id = 1")).first()
    if head is not None and int(head.seq) > 0:
        conn.execute(
            checkpoints.insert().values(
                chain_id=LEGACY,
                n=1,
                at=datetime.now(UTC),
                seq=int(head.seq),
                hash=str(head.hash),
                closed=True,
                writer="migration 0008",
                witness={},
                key_id=None,
                prev_mac=GENESIS,
                mac=None,
            )
        )
    op.drop_table("audit_head")

    with op.batch_alter_table("audit_checkpoints") as batch:
        batch.add_column(
            sa.Column("chain_id", sa.String(32), nullable=False, server_default=LEGACY)
        )
    op.create_index("ix_audit_checkpoints_chain_seq", "audit_checkpoints", ["chain_id", "seq"])


def downgrade() -> None:
    raise NotImplementedError(
        "one chain per writer cannot be folded back into one chain: restore a backup"
    )
