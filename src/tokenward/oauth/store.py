"""Queries behind token families, project policy, trust policies, jtis and rotations.

Same contract on SQLite and PostgreSQL; each method is one short transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from tokenward.errors import Conflict
from tokenward.oauth.tables import seen_jtis, token_rotations, trust_policies
from tokenward.store.repository import _SELECT_TOKEN, _record
from tokenward.store.tables import projects, tokens
from tokenward.tokens.model import TokenKind, TokenRecord


@dataclass(slots=True)
class TrustPolicy:
    """Which OIDC identities (issuer, audience, claims) may get which tokens of a project."""

    id: str
    project_id: str
    project: str
    name: str
    issuer: str
    audience: str
    claims: dict[str, str]
    scopes: list[str]
    environment: str
    principal_claim: str
    max_ttl: int
    refresh_ttl: int | None
    created_at: datetime
    created_by: str | None = None

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "project": self.project,
            "name": self.name,
            "issuer": self.issuer,
            "audience": self.audience,
            "claims": dict(self.claims),
            "scopes": list(self.scopes),
            "environment": self.environment,
            "principal_claim": self.principal_claim,
            "max_ttl": self.max_ttl,
            "refresh_ttl": self.refresh_ttl,
            "created_at": self.created_at.isoformat().replace("+00:00", "Z"),
            "created_by": self.created_by,
        }


@dataclass(slots=True)
class Rotation:
    token_id: str
    grace: int
    quiet: int | None
    webhook_url: str | None
    webhook_secret: str | None
    due_at: datetime
    previous_id: str | None
    attempts: int
    last_error: str | None

    def public(self) -> dict[str, Any]:
        return {
            "token_id": self.token_id,
            "grace": self.grace,
            "quiet": self.quiet,
            "webhook_url": self.webhook_url,
            "due_at": self.due_at.isoformat().replace("+00:00", "Z"),
            "previous_id": self.previous_id,
            "attempts": self.attempts,
            "last_error": self.last_error,
        }


_SELECT_POLICY = select(trust_policies, projects.c.name.label("project_name")).select_from(
    trust_policies.join(projects, trust_policies.c.project_id == projects.c.id)
)


def _policy(row: Any) -> TrustPolicy:
    m = row._mapping
    return TrustPolicy(
        id=m["id"],
        project_id=m["project_id"],
        project=m["project_name"],
        name=m["name"],
        issuer=m["issuer"],
        audience=m["audience"],
        claims=dict(m["claims"]),
        scopes=list(m["scopes"]),
        environment=m["environment"],
        principal_claim=m["principal_claim"],
        max_ttl=m["max_ttl"],
        refresh_ttl=m["refresh_ttl"],
        created_at=m["created_at"],
        created_by=m["created_by"],
    )


def _rotation(row: Any) -> Rotation:
    m = row._mapping
    return Rotation(
        token_id=m["token_id"],
        grace=m["grace"],
        quiet=m["quiet"],
        webhook_url=m["webhook_url"],
        webhook_secret=m["webhook_secret"],
        due_at=m["due_at"],
        previous_id=m["previous_id"],
        attempts=m["attempts"],
        last_error=m["last_error"],
    )


class SessionStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    # -- families -------------------------------------------------------------------------
    async def revoke_family(self, family_id: str, reason: str, now: datetime) -> list[str]:
        """Revoke every still-live token of a family; the ids revoked."""
        async with self.engine.begin() as conn:
            ids = [
                r[0]
                for r in (
                    await conn.execute(
                        select(tokens.c.id).where(
                            tokens.c.family_id == family_id, tokens.c.revoked_at.is_(None)
                        )
                    )
                ).all()
            ]
            if ids:
                await conn.execute(
                    update(tokens)
                    .where(tokens.c.id.in_(ids), tokens.c.revoked_at.is_(None))
                    .values(revoked_at=now, revoked_reason=reason)
                )
        return ids

    # -- trust policies -------------------------------------------------------------------
    async def add_trust_policy(self, policy: TrustPolicy) -> None:
        values = policy.public()
        values.pop("project")
        values["project_id"] = policy.project_id
        values["created_at"] = policy.created_at
        try:
            async with self.engine.begin() as conn:
                await conn.execute(trust_policies.insert().values(**values))
        except IntegrityError:
            raise Conflict(
                "trust_policy_exists", f"the project already has a trust policy {policy.name!r}"
            ) from None

    async def trust_policies(
        self,
        project_ids: Sequence[str] | None = None,
        issuer: str | None = None,
        *,
        project_name: str | None = None,
        name: str | None = None,
        policy_id: str | None = None,
    ) -> list[TrustPolicy]:
        """Trust policies, filtered by every criterion given (a project by id or by name, a
        policy by name or by id, the issuer)."""
        query = _SELECT_POLICY.order_by(projects.c.name, trust_policies.c.name)
        if project_ids is not None:
            query = query.where(trust_policies.c.project_id.in_(list(project_ids)))
        if project_name is not None:
            query = query.where(projects.c.name == project_name)
        if name is not None:
            query = query.where(trust_policies.c.name == name)
        if policy_id is not None:
            query = query.where(trust_policies.c.id == policy_id)
        if issuer is not None:
            query = query.where(trust_policies.c.issuer == issuer)
        async with self.engine.connect() as conn:
            return [_policy(r) for r in (await conn.execute(query)).all()]

    async def trust_policy(self, project_id: str, name_or_id: str) -> TrustPolicy | None:
        query = _SELECT_POLICY.where(
            trust_policies.c.project_id == project_id,
            or_(trust_policies.c.name == name_or_id, trust_policies.c.id == name_or_id),
        )
        async with self.engine.connect() as conn:
            row = (await conn.execute(query)).first()
        return _policy(row) if row else None

    async def remove_trust_policy(self, policy_id: str) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(delete(trust_policies).where(trust_policies.c.id == policy_id))

    # -- identity tokens are accepted once ------------------------------------------------
    async def remember_jti(self, key: str, expires_at: datetime) -> bool:
        """Record an accepted ``jti`` key; ``False`` when it was already there (a replay)."""
        try:
            async with self.engine.begin() as conn:
                await conn.execute(seen_jtis.insert().values(key=key, expires_at=expires_at))
        except IntegrityError:
            return False
        return True

    async def purge_jtis(self, now: datetime) -> int:
        async with self.engine.begin() as conn:
            result = await conn.execute(delete(seen_jtis).where(seen_jtis.c.expires_at <= now))
        return int(result.rowcount or 0)

    # -- token bindings -------------------------------------------------------------------
    async def set_token_fields(self, token_id: str, **values: Any) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(update(tokens).where(tokens.c.id == token_id).values(**values))

    # -- rotations ------------------------------------------------------------------------
    async def set_rotation(self, rotation: Rotation, period: int) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                delete(token_rotations).where(token_rotations.c.token_id == rotation.token_id)
            )
            await conn.execute(
                token_rotations.insert().values(
                    token_id=rotation.token_id,
                    grace=rotation.grace,
                    quiet=rotation.quiet,
                    webhook_url=rotation.webhook_url,
                    webhook_secret=rotation.webhook_secret,
                    due_at=rotation.due_at,
                    previous_id=rotation.previous_id,
                    attempts=0,
                    last_error=None,
                    enabled=True,
                )
            )
            await conn.execute(
                update(tokens)
                .where(tokens.c.id == rotation.token_id)
                .values(rotation_period=period)
            )

    async def get_rotation(self, token_id: str) -> Rotation | None:
        query = select(token_rotations).where(token_rotations.c.token_id == token_id)
        async with self.engine.connect() as conn:
            row = (await conn.execute(query)).first()
        return _rotation(row) if row else None

    async def remove_rotation(self, token_id: str) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                delete(token_rotations).where(token_rotations.c.token_id == token_id)
            )
            await conn.execute(
                update(tokens).where(tokens.c.id == token_id).values(rotation_period=None)
            )

    async def due_rotations(self, now: datetime, limit: int = 100) -> list[Rotation]:
        query = (
            select(token_rotations)
            .where(token_rotations.c.due_at <= now, token_rotations.c.enabled.is_(True))
            .order_by(token_rotations.c.due_at)
            .limit(limit)
        )
        async with self.engine.connect() as conn:
            return [_rotation(r) for r in (await conn.execute(query)).all()]

    async def with_previous(self) -> list[Rotation]:
        """Rotations whose predecessor may still be in its grace window."""
        query = select(token_rotations).where(token_rotations.c.previous_id.is_not(None))
        async with self.engine.connect() as conn:
            return [_rotation(r) for r in (await conn.execute(query)).all()]

    async def move_rotation(self, old_id: str, successor_id: str, due_at: datetime) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                update(token_rotations)
                .where(token_rotations.c.token_id == old_id)
                .values(
                    token_id=successor_id,
                    previous_id=old_id,
                    due_at=due_at,
                    attempts=0,
                    last_error=None,
                )
            )

    async def rotation_failed(
        self, token_id: str, error: str, retry_at: datetime, attempts: int
    ) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                update(token_rotations)
                .where(token_rotations.c.token_id == token_id)
                .values(due_at=retry_at, last_error=error[:200], attempts=attempts)
            )

    async def undo_rotation(self, old_id: str, successor_id: str, now: datetime) -> None:
        """Revoke an undelivered successor and give the predecessor back its full life."""
        async with self.engine.begin() as conn:
            await conn.execute(
                update(tokens)
                .where(tokens.c.id == successor_id)
                .values(revoked_at=now, revoked_reason="rotation not delivered")
            )
            await conn.execute(
                update(tokens)
                .where(tokens.c.id == old_id, tokens.c.replaced_by == successor_id)
                .values(replaced_by=None, grace_until=None)
            )

    async def end_grace(self, token_id: str, now: datetime) -> bool:
        """Retire a predecessor early; whether it was still in its grace window."""
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(tokens)
                .where(tokens.c.id == token_id, tokens.c.grace_until > now)
                .values(grace_until=now)
            )
        return bool(result.rowcount)

    async def clear_previous(self, token_id: str) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                update(token_rotations)
                .where(token_rotations.c.token_id == token_id)
                .values(previous_id=None)
            )

    # -- expiry warnings ------------------------------------------------------------------
    async def expiring(self, now: datetime, until: datetime, limit: int = 500) -> list[TokenRecord]:
        """Long-lived tokens that expire before ``until`` and were not warned about yet."""
        c = tokens.c
        query = (
            _SELECT_TOKEN.where(
                c.expires_at > now,
                c.expires_at <= until,
                c.expiry_warned_at.is_(None),
                c.revoked_at.is_(None),
                c.replaced_by.is_(None),
                c.kind == TokenKind.API_KEY.value,
            )
            .order_by(c.expires_at)
            .limit(limit)
        )
        async with self.engine.connect() as conn:
            return [_record(r) for r in (await conn.execute(query)).all()]

    async def mark_warned(self, token_id: str, now: datetime) -> None:
        await self.set_token_fields(token_id, expiry_warned_at=now)
