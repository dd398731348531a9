"""The identities table: one contract, the same code on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from tokenward.errors import Conflict
from tokenward.identities.model import Identity
from tokenward.store.tables import identities, projects, tokens
from tokenward.tokens.format import new_public_id

_SELECT = select(identities, projects.c.name.label("project_name")).select_from(
    identities.join(projects, identities.c.project_id == projects.c.id)
)


def _identity(row: Any) -> Identity:
    m = row._mapping
    return Identity(
        id=m["id"],
        project_id=m["project_id"],
        project=m["project_name"],
        external_id=m["external_id"],
        created_at=m["created_at"],
        updated_at=m["updated_at"],
        metadata=dict(m["metadata"] or {}),
        rate_limit=m["rate_limit"].split(";") if m["rate_limit"] else [],
    )


class IdentityStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def create(
        self,
        project_id: str,
        external_id: str,
        metadata: dict[str, str],
        rate_limit: list[str],
        now: datetime,
    ) -> Identity:
        identity_id = new_public_id("idn")
        try:
            async with self.engine.begin() as conn:
                await conn.execute(
                    identities.insert().values(
                        id=identity_id,
                        project_id=project_id,
                        external_id=external_id,
                        metadata=dict(metadata),
                        rate_limit=";".join(rate_limit) or None,
                        created_at=now,
                        updated_at=now,
                    )
                )
                row = (await conn.execute(_SELECT.where(identities.c.id == identity_id))).one()
        except IntegrityError:
            raise Conflict(
                "identity_exists", "an identity with this external id already exists"
            ) from None
        return _identity(row)

    async def get(self, project_id: str, external_id: str) -> Identity | None:
        query = _SELECT.where(
            identities.c.project_id == project_id, identities.c.external_id == external_id
        )
        async with self.engine.connect() as conn:
            row = (await conn.execute(query)).first()
        return _identity(row) if row else None

    async def get_by_id(self, identity_id: str) -> Identity | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(_SELECT.where(identities.c.id == identity_id))).first()
        return _identity(row) if row else None

    async def list_identities(
        self, project_id: str, *, limit: int = 100, after: str | None = None
    ) -> list[Identity]:
        """A project's identities in external-id order, keyset-paginated on it."""
        query = (
            _SELECT.where(identities.c.project_id == project_id)
            .order_by(identities.c.external_id)
            .limit(limit)
        )
        if after:
            query = query.where(identities.c.external_id > after)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [_identity(r) for r in rows]

    async def update(self, identity_id: str, values: dict[str, Any], now: datetime) -> Identity:
        """Change ``metadata`` and/or ``rate_limit`` (a list of windows)."""
        row_values = dict(values, updated_at=now)
        if "rate_limit" in row_values:
            row_values["rate_limit"] = ";".join(row_values["rate_limit"]) or None
        async with self.engine.begin() as conn:
            await conn.execute(
                update(identities).where(identities.c.id == identity_id).values(**row_values)
            )
            row = (await conn.execute(_SELECT.where(identities.c.id == identity_id))).one()
        return _identity(row)

    async def delete(self, identity_id: str, reason: str, now: datetime) -> list[str]:
        """Delete an identity and revoke its live tokens, in one transaction; the ids revoked.

        The tokens keep their ``identity_id`` (the audit trail still names it).
        """
        c = tokens.c
        async with self.engine.begin() as conn:
            await conn.execute(delete(identities).where(identities.c.id == identity_id))
            revoked = await conn.execute(
                update(tokens)
                .where(c.identity_id == identity_id, c.revoked_at.is_(None))
                .values(revoked_at=now, revoked_reason=reason[:200])
                .returning(c.id)
            )
            return sorted(r[0] for r in revoked.all())

    async def count_tokens(self, identity_id: str) -> int:
        """How many unrevoked tokens the identity has."""
        query = (
            select(func.count())
            .select_from(tokens)
            .where(tokens.c.identity_id == identity_id, tokens.c.revoked_at.is_(None))
        )
        async with self.engine.connect() as conn:
            return int((await conn.execute(query)).scalar() or 0)
