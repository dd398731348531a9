"""Usage analytics: access decisions counted per minute and per hour, and the rollup's
watermark per audit chain (tokenward.usage).

Revision ID: 0036_usage
Revises: 0004_audit
"""

import sqlalchemy as sa
from alembic import op

from tokenward.store.tables import UTCDateTime

revision = "0036_usage"
down_revision = "0004_audit"
branch_labels = None
depends_on = None


def _counts(name: str, bucket: str) -> None:
    op.create_table(
        name,
        sa.Column(bucket, sa.BigInteger, nullable=False),
        sa.Column("project_id", sa.String(32), nullable=False),
        sa.Column("token_id", sa.String(32), nullable=False),
        sa.Column("decision", sa.String(8), nullable=False),
        sa.Column("reason", sa.String(64), nullable=False),
        sa.Column("count", sa.BigInteger, nullable=False),
        sa.PrimaryKeyConstraint(
            "project_id", "token_id", bucket, "decision", "reason", name=f"pk_{name}"
        ),
        sqlite_with_rowid=False,
    )
    op.create_index(f"ix_{name}_token", name, ["token_id", bucket])


def upgrade() -> None:
    _counts("usage_minutes", "minute")
    _counts("usage_hours", "hour")
    op.create_table(
        "usage_chains",
        sa.Column("chain_id", sa.String(32), primary_key=True),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("usage_chains")
    op.drop_table("usage_hours")
    op.drop_table("usage_minutes")
