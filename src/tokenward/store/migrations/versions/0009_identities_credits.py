"""Identities and credits that refill.

``identities``: the owners of tokens, one per project and external id (``user_123``), with
metadata and a rate limit all their tokens share. ``tokens.identity_id`` (indexed) names a
token's identity. ``tokens.refill_amount``, ``refill_interval``, ``refill_day`` and
``refilled_at`` describe credits that are set back to an amount every hour, day or month.
Existing tokens have no identity and no refill: nothing changes for them.

Revision ID: 0009_identities_credits
Revises: 0008_rate_limit_key
"""

import sqlalchemy as sa
from alembic import op

from tokenward.store.tables import UTCDateTime

revision = "0009_identities_credits"
down_revision = "0008_rate_limit_key"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "identities",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("project_id", sa.String(32), sa.ForeignKey("projects.id"), nullable=False),
        sa.Column("external_id", sa.String(128), nullable=False),
        sa.Column("metadata", sa.JSON, nullable=False),
        sa.Column("rate_limit", sa.String(200), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.UniqueConstraint("project_id", "external_id", name="uq_identities_project_external"),
    )
    op.add_column("tokens", sa.Column("identity_id", sa.String(32), nullable=True))
    op.add_column("tokens", sa.Column("refill_amount", sa.Integer, nullable=True))
    op.add_column("tokens", sa.Column("refill_interval", sa.String(8), nullable=True))
    op.add_column("tokens", sa.Column("refill_day", sa.Integer, nullable=True))
    op.add_column("tokens", sa.Column("refilled_at", UTCDateTime(), nullable=True))
    op.create_index("ix_tokens_identity_id", "tokens", ["identity_id"])


def downgrade() -> None:
    op.drop_index("ix_tokens_identity_id", "tokens")
    with op.batch_alter_table("tokens") as batch:
        for name in ("refilled_at", "refill_day", "refill_interval", "refill_amount"):
            batch.drop_column(name)
        batch.drop_column("identity_id")
    op.drop_table("identities")
