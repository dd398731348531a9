"""Short-lived tokens: token families, DPoP binding, rotation; trust policies; seen jtis.

Revision ID: 0005_sessions
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

from tokenward.store.tables import UTCDateTime

revision = "0005_sessions"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("tokens") as batch:
        batch.add_column(sa.Column("family_id", sa.String(32), nullable=True))
        batch.add_column(sa.Column("dpop_jkt", sa.String(64), nullable=True))
        batch.add_column(sa.Column("rotation_period", sa.Integer, nullable=True))
        batch.add_column(sa.Column("expiry_warned_at", UTCDateTime(), nullable=True))
    op.create_index("ix_tokens_family_id", "tokens", ["family_id"])
    op.create_table(
        "trust_policies",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("project_id", sa.String(32), sa.ForeignKey("projects.id"), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("issuer", sa.String(512), nullable=False),
        sa.Column("audience", sa.String(256), nullable=False),
        sa.Column("claims", sa.JSON, nullable=False),
        sa.Column("scopes", sa.JSON, nullable=False),
        sa.Column("environment", sa.String(8), nullable=False),
        sa.Column("principal_claim", sa.String(64), nullable=False),
        sa.Column("max_ttl", sa.Integer, nullable=False),
        sa.Column("refresh_ttl", sa.Integer, nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("created_by", sa.String(32), nullable=True),
    )
    op.create_index(
        "ux_trust_policies_project_name", "trust_policies", ["project_id", "name"], unique=True
    )
    op.create_index("ix_trust_policies_issuer", "trust_policies", ["issuer"])
    op.create_table(
        "seen_jtis",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("expires_at", UTCDateTime(), nullable=False),
    )
    op.create_index("ix_seen_jtis_expires_at", "seen_jtis", ["expires_at"])
    op.create_table(
        "token_rotations",
        sa.Column("token_id", sa.String(32), sa.ForeignKey("tokens.id"), primary_key=True),
        sa.Column("grace", sa.Integer, nullable=False),
        sa.Column("quiet", sa.Integer, nullable=True),
        sa.Column("webhook_url", sa.String(2048), nullable=True),
        sa.Column("webhook_secret", sa.Text, nullable=True),
        sa.Column("due_at", UTCDateTime(), nullable=False),
        sa.Column("previous_id", sa.String(32), nullable=True),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("last_error", sa.String(200), nullable=True),
        sa.Column("enabled", sa.Boolean, nullable=False),
    )
    op.create_index("ix_token_rotations_due_at", "token_rotations", ["due_at"])


def downgrade() -> None:
    op.drop_index("ix_token_rotations_due_at", "token_rotations")
    op.drop_table("token_rotations")
    op.drop_index("ix_seen_jtis_expires_at", "seen_jtis")
    op.drop_table("seen_jtis")
    op.drop_index("ix_trust_policies_issuer", "trust_policies")
    op.drop_index("ux_trust_policies_project_name", "trust_policies")
    op.drop_table("trust_policies")
    op.drop_index("ix_tokens_family_id", "tokens")
    with op.batch_alter_table("tokens") as batch:
        batch.drop_column("expiry_warned_at")
        batch.drop_column("rotation_period")
        batch.drop_column("dpop_jkt")
        batch.drop_column("family_id")
