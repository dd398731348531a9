"""Tables of usage analytics: access decisions counted per minute and per hour.

A row counts the access events of one bucket, project, token, decision and reason. Buckets
are whole minutes (``usage_minutes.minute``: minutes since 1970, UTC) or whole hours
(``usage_hours.hour``). Each bucket also has the project's totals, under the token ``*``
(:data:`PROJECT_TOTAL`): a project's (or every project's) usage reads those, one row per
decision and reason, not one per token. Events without a project or a token (an unknown
credential) are counted under ``""``: primary-key columns cannot be NULL on PostgreSQL.

``usage_chains`` is the rollup's watermark: for each audit chain (decision 0021), the
``seq`` of the last event already counted.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Index, PrimaryKeyConstraint, String, Table

from tokenward.store.tables import UTCDateTime, metadata

#: the token id of a project's totals (no token id is ``*``)
PROJECT_TOTAL = "*"


def _counts(name: str, bucket: str) -> Table:
    return Table(
        name,
        metadata,
        Column(bucket, BigInteger, nullable=False),
        Column("project_id", String(32), nullable=False),
        Column("token_id", String(32), nullable=False),
        Column("decision", String(8), nullable=False),
        Column("reason", String(64), nullable=False),
        Column("count", BigInteger, nullable=False),
        PrimaryKeyConstraint(
            "project_id", "token_id", bucket, "decision", "reason", name=f"pk_{name}"
        ),
        Index(f"ix_{name}_token", "token_id", bucket),
        sqlite_with_rowid=False,  # one B-tree: the key holds the filter, the row its count
    )


usage_minutes = _counts("usage_minutes", "minute")
usage_hours = _counts("usage_hours", "hour")

usage_chains = Table(
    "usage_chains",
    metadata,
    Column("chain_id", String(32), primary_key=True),
    Column("seq", BigInteger, nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
)
