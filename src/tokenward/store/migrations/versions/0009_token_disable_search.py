"""Tokens can be disabled (a reversible switch of an admin, with a reason), and searched.

``disabled_at``/``disabled_reason``/``disabled_by`` hold the switch (decision 0034: distinct
from quarantine). The indexes serve the token search (``GET /v1/tokens``): the keyset order
per project and overall (``created_at``, ``id``), a name prefix and a principal within a
project, and the expiry and last-use cut-offs. On PostgreSQL the name column of its index uses
``varchar_pattern_ops``, so that ``name LIKE 'prefix%'`` is an index range whatever the
database's collation.

Revision ID: 0009_token_disable_search
Revises: 0008_rate_limit_key
"""

import sqlalchemy as sa
from alembic import op

from tokenward.store.tables import UTCDateTime

revision = "0009_token_disable_search"
down_revision = "0008_rate_limit_key"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tokens") as batch:
        batch.add_column(sa.Column("disabled_at", UTCDateTime(), nullable=True))
        batch.add_column(sa.Column("disabled_reason", sa.String(300), nullable=True))
        batch.add_column(sa.Column("disabled_by", sa.String(32), nullable=True))
    op.create_index("ix_tokens_created", "tokens", ["created_at", "id"])
    op.create_index("ix_tokens_project_created", "tokens", ["project_id", "created_at", "id"])
    op.create_index(
        "ix_tokens_project_name",
        "tokens",
        ["project_id", "name"],
        postgresql_ops={"name": "varchar_pattern_ops"},
    )
    op.create_index(
        "ix_tokens_project_principal", "tokens", ["project_id", "principal", "created_at", "id"]
    )
    op.create_index("ix_tokens_expires_at", "tokens", ["expires_at"])
    op.create_index("ix_tokens_last_used_at", "tokens", ["last_used_at"])


def downgrade() -> None:
    for name in (
        "ix_tokens_last_used_at",
        "ix_tokens_expires_at",
        "ix_tokens_project_principal",
        "ix_tokens_project_name",
        "ix_tokens_project_created",
        "ix_tokens_created",
    ):
        op.drop_index(name, "tokens")
    with op.batch_alter_table("tokens") as batch:
        batch.drop_column("disabled_by")
        batch.drop_column("disabled_reason")
        batch.drop_column("disabled_at")
