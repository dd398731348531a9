"""IP blocks scoped to a project: a block made from a project-bound caller's reports (the
``ip`` of ``POST /v1/verify``) refuses the address in that project only. Existing blocks
stay global (``project_id`` NULL).

Revision ID: 0008_ip_block_project
Revises: 0004_audit
"""

import sqlalchemy as sa
from alembic import op

revision = "0008_ip_block_project"
down_revision = "0004_audit"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("ip_blocks") as batch:
        batch.add_column(sa.Column("project_id", sa.String(32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("ip_blocks") as batch:
        batch.drop_column("project_id")
