"""Token grants: which credential minted each exchanged or refreshed token, and the grant's
origin, so that revoking a key revokes what was exchanged from it (an indexed lookup).

Existing tokens of a family are linked from ``metadata.grant_from`` (what exchange and
refresh wrote before this table existed).

Revision ID: 0007_token_grants
Revises: 0005_sessions
"""

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0007_token_grants"
down_revision = "0005_sessions"
branch_labels = None
depends_on = None

_tokens = sa.table(
    "tokens",
    sa.column("id", sa.String),
    sa.column("family_id", sa.String),
    sa.column("rotated_from", sa.String),
    sa.column("metadata", sa.JSON),
)


def upgrade() -> None:
    grants = op.create_table(
        "token_grants",
        sa.Column("token_id", sa.String(32), sa.ForeignKey("tokens.id"), primary_key=True),
        sa.Column("parent_id", sa.String(32), nullable=False),
        sa.Column("origin_id", sa.String(32), nullable=True),
    )
    op.create_index("ix_token_grants_parent_id", "token_grants", ["parent_id"])
    op.create_index("ix_token_grants_origin_id", "token_grants", ["origin_id"])
    assert grants is not None
    _backfill(op.get_bind(), grants)


def _backfill(conn: Any, grants: sa.Table) -> None:
    rows = conn.execute(
        sa.select(
            _tokens.c.id, _tokens.c.family_id, _tokens.c.rotated_from, _tokens.c.metadata
        ).where(_tokens.c.family_id.is_not(None))
    ).all()
    members = {r.id for r in rows}
    parents: dict[str, str] = {}
    outside: dict[str, set[str]] = {}  # family -> credentials outside it that minted into it
    for r in rows:
        granted_from = (r.metadata or {}).get("grant_from")
        parent = r.rotated_from if r.rotated_from in members else granted_from
        if not isinstance(parent, str):
            continue
        parents[r.id] = parent
        if parent not in members:
            outside.setdefault(r.family_id, set()).add(parent)
    candidates = sorted({p for ps in outside.values() for p in ps})
    known: set[str] = set()
    for start in range(0, len(candidates), 500):
        chunk = candidates[start : start + 500]
        found = conn.execute(sa.select(_tokens.c.id).where(_tokens.c.id.in_(chunk))).all()
        known.update(f.id for f in found)
    origins = {
        family: min(ids & known) for family, ids in outside.items() if ids & known
    }  # a trust policy (workload identity) is no token: no origin
    family_of = {r.id: r.family_id for r in rows}
    values = [
        {"token_id": t, "parent_id": p, "origin_id": origins.get(family_of[t])}
        for t, p in parents.items()
    ]
    for start in range(0, len(values), 500):
        conn.execute(grants.insert(), values[start : start + 500])


def downgrade() -> None:
    op.drop_index("ix_token_grants_origin_id", "token_grants")
    op.drop_index("ix_token_grants_parent_id", "token_grants")
    op.drop_table("token_grants")
