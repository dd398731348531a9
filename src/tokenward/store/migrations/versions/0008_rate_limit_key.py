"""Rate limits shared by a lineage: ``tokens.rate_limit_key`` names the counter a token's
rate limit is counted on (``NULL``: its own id).

A token minted by exchange or refresh, and a rotation's successor, count on the counter of
the token they come from, so a key and everything minted from it share one budget. Existing
tokens are given their lineage's counter: a rotation's successor its predecessor's, a token
minted by a grant its origin's (``token_grants``).

Revision ID: 0008_rate_limit_key
Revises: 0007_token_grants
"""

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0008_rate_limit_key"
down_revision = "0007_token_grants"
branch_labels = None
depends_on = None

_tokens = sa.table(
    "tokens",
    sa.column("id", sa.String),
    sa.column("rotated_from", sa.String),
    sa.column("rate_limit_key", sa.String),
)
_grants = sa.table(
    "token_grants", sa.column("token_id", sa.String), sa.column("origin_id", sa.String)
)


def upgrade() -> None:
    op.add_column("tokens", sa.Column("rate_limit_key", sa.String(32), nullable=True))
    _backfill(op.get_bind())


def _backfill(conn: Any) -> None:
    rows = conn.execute(
        sa.select(_tokens.c.id, _tokens.c.rotated_from, _grants.c.origin_id)
        .select_from(_tokens.outerjoin(_grants, _grants.c.token_id == _tokens.c.id))
        .where(sa.or_(_tokens.c.rotated_from.is_not(None), _grants.c.origin_id.is_not(None)))
    ).all()
    # Where a token's budget comes from: its predecessor (rotation), else its grant's origin.
    parent = {r.id: r.rotated_from or r.origin_id for r in rows}
    counter: dict[str, str] = {}

    def root(token_id: str) -> str:
        path: list[str] = []
        current = token_id
        while current in parent and current not in counter and current not in path:
            path.append(current)
            current = parent[current]
        found = counter.get(current, current)
        for step in path:
            counter[step] = found
        return found

    changes = [(t, root(t)) for t in parent]
    values = [{"t": t, "k": k} for t, k in changes if k != t]
    statement = (
        sa.update(_tokens)
        .where(_tokens.c.id == sa.bindparam("t"))
        .values(rate_limit_key=sa.bindparam("k"))
    )
    for start in range(0, len(values), 500):
        conn.execute(statement, values[start : start + 500])


def downgrade() -> None:
    with op.batch_alter_table("tokens") as batch:
        batch.drop_column("rate_limit_key")
