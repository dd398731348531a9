"""The token store: one contract, the same code on SQLite and PostgreSQL.

Every method is a short transaction. Atomic steps (spending a use, rotating) are single
conditional statements, so concurrent callers on any number of replicas cannot double-spend.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, case, func, literal, or_, select, true, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from tokenward.errors import Conflict, NotFound
from tokenward.oauth.tables import token_grants
from tokenward.store.tables import UTCDateTime, identities, projects, tokens
from tokenward.tokens.credits import Refill, RefillInterval, available, period_start
from tokenward.tokens.format import new_public_id
from tokenward.tokens.model import TokenIdentity, TokenRecord, TokenState


@dataclass(slots=True, frozen=True)
class GrantLink:
    """Where a token minted by a grant comes from: the credential that minted it (a token id,
    or a trust policy id) and the long-lived token at the root of the grant (``None`` for
    workload identity)."""

    parent_id: str
    origin_id: str | None


@dataclass(slots=True, frozen=True)
class Spent:
    """What spending credits did: whether it was allowed, and the credits left after it."""

    allowed: bool
    remaining: int


@dataclass(slots=True)
class Project:
    id: str
    name: str
    created_at: datetime
    ip_allowlist: list[str]

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "created_at": self.created_at.isoformat().replace("+00:00", "Z"),
            "ip_allowlist": list(self.ip_allowlist),
        }


_TOKEN_COLUMNS = [c for c in tokens.c if c.name not in ("token_hash",)]
_SELECT_TOKEN = select(
    *_TOKEN_COLUMNS,
    projects.c.name.label("project_name"),
    projects.c.ip_allowlist.label("project_ip_allowlist"),
    # the token's identity, read with it (one lookup on the hot path)
    identities.c.external_id.label("identity_external_id"),
    identities.c.metadata.label("identity_metadata"),
    identities.c.rate_limit.label("identity_rate_limit"),
).select_from(
    tokens.outerjoin(projects, tokens.c.project_id == projects.c.id).outerjoin(
        identities, tokens.c.identity_id == identities.c.id
    )
)


def state_at(now: datetime) -> Any:
    """A token's state at ``now`` as an SQL expression: :meth:`TokenRecord.state`, check for
    check, in the same order."""
    c = tokens.c
    rotated = c.replaced_by.is_not(None)
    return case(
        (c.revoked_at.is_not(None), TokenState.REVOKED.value),
        (
            and_(rotated, or_(c.grace_until.is_(None), c.grace_until <= now)),
            TokenState.ROTATED.value,
        ),
        (and_(c.expires_at.is_not(None), c.expires_at <= now), TokenState.EXPIRED.value),
        (and_(c.not_before.is_not(None), c.not_before > now), TokenState.NOT_YET_VALID.value),
        (rotated, TokenState.ROTATED_IN_GRACE.value),
        else_=TokenState.ACTIVE.value,
    )


def _record(row: Any) -> TokenRecord:
    m = row._mapping
    return TokenRecord(
        id=m["id"],
        project_id=m["project_id"],
        project=m["project_name"],
        environment=m["environment"],
        name=m["name"],
        kind=m["kind"],
        principal=m["principal"],
        scopes=list(m["scopes"]),
        created_at=m["created_at"],
        created_by=m["created_by"],
        not_before=m["not_before"],
        expires_at=m["expires_at"],
        ip_allowlist=list(m["ip_allowlist"]),
        rate_limit=m["rate_limit"].split(";") if m["rate_limit"] else [],
        rate_limit_key=m["rate_limit_key"],
        remaining_uses=m["remaining_uses"],
        rotated_from=m["rotated_from"],
        replaced_by=m["replaced_by"],
        grace_until=m["grace_until"],
        revoked_at=m["revoked_at"],
        revoked_reason=m["revoked_reason"],
        last_used_at=m["last_used_at"],
        last_used_ip=m["last_used_ip"],
        hint=m["hint"],
        key_id=m["key_id"],
        metadata=dict(m["metadata"]),
        project_ip_allowlist=list(m["project_ip_allowlist"] or []),
        family_id=m["family_id"],
        dpop_jkt=m["dpop_jkt"],
        rotation_period=m["rotation_period"],
        quarantined_at=m["quarantined_at"],
        quarantine_reason=m["quarantine_reason"],
        disabled_at=m["disabled_at"],
        disabled_reason=m["disabled_reason"],
        disabled_by=m["disabled_by"],
        identity=_identity(m),
        refill=_refill(m),
        refilled_at=m["refilled_at"],
    )


def _identity(m: Any) -> TokenIdentity | None:
    """The token's identity; ``None`` without one, or once its identity is deleted."""
    if m["identity_id"] is None or m["identity_external_id"] is None:
        return None
    rate = m["identity_rate_limit"]
    return TokenIdentity(
        m["identity_id"],
        m["identity_external_id"],
        dict(m["identity_metadata"] or {}),
        tuple(rate.split(";")) if rate else (),
    )


def _refill(m: Any) -> Refill | None:
    if m["refill_interval"] is None or m["refill_amount"] is None:
        return None
    return Refill(int(m["refill_amount"]), RefillInterval(m["refill_interval"]), m["refill_day"])


def _project(row: Any) -> Project:
    m = row._mapping
    return Project(m["id"], m["name"], m["created_at"], list(m["ip_allowlist"]))


def _token_values(record: TokenRecord, token_hash: str) -> dict[str, Any]:
    return {
        "id": record.id,
        "project_id": record.project_id,
        "environment": record.environment,
        "name": record.name,
        "kind": record.kind,
        "principal": record.principal,
        "scopes": list(record.scopes),
        "token_hash": token_hash,
        "key_id": record.key_id,
        "hint": record.hint,
        "created_at": record.created_at,
        "created_by": record.created_by,
        "not_before": record.not_before,
        "expires_at": record.expires_at,
        "ip_allowlist": list(record.ip_allowlist),
        "rate_limit": ";".join(record.rate_limit) or None,
        "rate_limit_key": record.rate_limit_key,
        "remaining_uses": record.remaining_uses,
        "rotated_from": record.rotated_from,
        "replaced_by": record.replaced_by,
        "grace_until": record.grace_until,
        "revoked_at": record.revoked_at,
        "revoked_reason": record.revoked_reason,
        "metadata": dict(record.metadata),
        "family_id": record.family_id,
        "dpop_jkt": record.dpop_jkt,
        "rotation_period": record.rotation_period,
        "identity_id": record.identity_id,
        "refill_amount": record.refill.amount if record.refill else None,
        "refill_interval": record.refill.interval.value if record.refill else None,
        "refill_day": record.refill.day if record.refill else None,
        "refilled_at": record.refilled_at,
    }


@dataclass(slots=True)
class TokenQuery:
    """What a token search asks for; every filter given must hold (``None``: any).

    ``name_prefix`` and ``principal`` are exact (case-sensitive, the same on every
    database); ``text`` is the dashboard's case-insensitive substring of the name, id,
    principal or hint (on SQLite, case is folded for ASCII letters only). ``expiring_days``
    and ``unused_days`` are the dashboard's relative cut-offs: live tokens that expire within
    that many days, live tokens not used (never used: created) for that many days.
    """

    project_ids: Sequence[str] | None = None
    name_prefix: str | None = None
    text: str = ""
    principal: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    state: str | None = None
    kind: str | None = None
    environment: str | None = None
    #: tokens with an expiry before this time (already expired ones too: add ``state``)
    expires_before: datetime | None = None
    #: tokens last used before this time, or never used and created before it
    last_used_before: datetime | None = None
    disabled: bool | None = None
    quarantined: bool | None = None
    expiring_days: int | None = None
    unused_days: int | None = None
    #: the external id of the identity (owner) the tokens belong to
    identity: str | None = None


def _prefix_range(prefix: str) -> tuple[str, str] | None:
    """The names starting with ``prefix`` as a range in code point order (SQLite's binary
    collation: UTF-8 byte order is code point order), so an index serves it."""
    last = ord(prefix[-1])
    if last >= 0x10FFFF:
        return None
    return prefix, prefix[:-1] + chr(last + 1 + (0x800 if 0xD7FF <= last < 0xE000 else 0))


def _conditions(q: TokenQuery, now: datetime, dialect: str = "") -> list[Any]:
    """The SQL conditions of ``q``, each served by an index of migration 0009 where one can
    be: the project and its order, a principal and its order, a name prefix, expiry, last use."""
    c = tokens.c
    current = state_at(now)
    out: list[Any] = []
    if q.project_ids is not None:
        out.append(c.project_id.in_(list(q.project_ids)))
    if q.name_prefix:
        # LIKE serves the (project_id, name) index; the substring check makes it exact on
        # SQLite too, whose LIKE ignores ASCII case.
        # PostgreSQL: LIKE on the varchar_pattern_ops index. SQLite's LIKE ignores ASCII case
        # and uses no index: a range in binary order does. The substring check makes both
        # exact.
        bounds = _prefix_range(q.name_prefix) if dialect == "sqlite" else None
        if bounds is not None:
            out += [c.name >= bounds[0], c.name < bounds[1]]
        else:
            out.append(c.name.startswith(q.name_prefix, autoescape=True))
        out.append(func.substr(c.name, 1, len(q.name_prefix)) == q.name_prefix)
    if q.text:
        needle = q.text.lower()
        out.append(
            or_(
                *(
                    func.lower(column).contains(needle, autoescape=True)
                    for column in (c.name, c.id, c.principal, c.hint)
                )
            )
        )
    if q.principal is not None:
        out.append(c.principal == q.principal)
    if q.identity is not None:  # a subquery: the count query has no join to identities
        owners = select(identities.c.id).where(identities.c.external_id == q.identity)
        out.append(c.identity_id.in_(owners))
    for key, value in sorted(q.metadata.items()):
        out.append(c["metadata"][key].as_string() == value)
    if q.state:
        out.append(current == q.state)
    if q.kind:
        out.append(c.kind == q.kind)
    if q.environment:
        out.append(c.environment == q.environment)
    if q.expires_before is not None:
        out += [c.expires_at.is_not(None), c.expires_at < q.expires_before]
    if q.last_used_before is not None:
        cutoff = q.last_used_before
        out.append(
            or_(
                c.last_used_at < cutoff,
                and_(c.last_used_at.is_(None), c.created_at < cutoff),
            )
        )
    if q.disabled is not None:
        out.append(c.disabled_at.is_not(None) if q.disabled else c.disabled_at.is_(None))
    if q.quarantined is not None:
        out.append(c.quarantined_at.is_not(None) if q.quarantined else c.quarantined_at.is_(None))
    if q.expiring_days is not None:
        out += [
            c.expires_at.is_not(None),
            c.expires_at > now,
            c.expires_at <= now + timedelta(days=q.expiring_days),
            current.not_in([TokenState.REVOKED.value, TokenState.ROTATED.value]),
        ]
    if q.unused_days is not None:
        out += [
            func.coalesce(c.last_used_at, c.created_at) <= now - timedelta(days=q.unused_days),
            current.not_in(
                [TokenState.REVOKED.value, TokenState.ROTATED.value, TokenState.EXPIRED.value]
            ),
        ]
    return out


class TokenStore:
    """Projects and tokens in a SQL database (SQLite or PostgreSQL)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    # -- projects -------------------------------------------------------------------------
    async def create_project(self, name: str, now: datetime) -> Project:
        project = Project(new_public_id("prj"), name, now, [])
        try:
            async with self.engine.begin() as conn:
                await conn.execute(
                    projects.insert().values(
                        id=project.id, name=name, created_at=now, ip_allowlist=[], settings={}
                    )
                )
        except IntegrityError:
            raise Conflict("project_exists", f"a project named {name!r} already exists") from None
        return project

    async def get_project(self, name_or_id: str) -> Project | None:
        query = select(projects).where(
            or_(projects.c.name == name_or_id, projects.c.id == name_or_id)
        )
        async with self.engine.connect() as conn:
            row = (await conn.execute(query)).first()
        return _project(row) if row else None

    async def list_projects(
        self,
        only_ids: Sequence[str] | None = None,
        *,
        limit: int | None = None,
        after: str | None = None,
    ) -> list[Project]:
        """Projects by name (a keyset page: ``after`` a name, at most ``limit``)."""
        query = select(projects).order_by(projects.c.name)
        if after is not None:
            query = query.where(projects.c.name > after)
        if limit is not None:
            query = query.limit(limit)
        if only_ids is not None:
            query = query.where(projects.c.id.in_(list(only_ids)))
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [_project(r) for r in rows]

    async def set_project_ip_allowlist(self, project_id: str, cidrs: list[str]) -> Project:
        async with self.engine.begin() as conn:
            await conn.execute(
                update(projects).where(projects.c.id == project_id).values(ip_allowlist=cidrs)
            )
            row = (await conn.execute(select(projects).where(projects.c.id == project_id))).first()
        if row is None:
            raise NotFound("project_not_found", "no such project")
        return _project(row)

    async def project_settings(self, project_id: str) -> dict[str, Any]:
        query = select(projects.c.settings).where(projects.c.id == project_id)
        async with self.engine.connect() as conn:
            value = (await conn.execute(query)).scalar()
        return dict(value or {})

    async def set_project_settings(self, project_id: str, values: dict[str, Any]) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                update(projects).where(projects.c.id == project_id).values(settings=dict(values))
            )

    # -- tokens ---------------------------------------------------------------------------
    async def insert_token(
        self, record: TokenRecord, token_hash: str, grant: GrantLink | None = None
    ) -> None:
        """Store a new token and, for one minted by a grant, its link (same transaction, so a
        minted token is never left without the link that lets its origin revoke it)."""
        async with self.engine.begin() as conn:
            await conn.execute(tokens.insert().values(**_token_values(record, token_hash)))
            if grant is not None:
                await conn.execute(
                    token_grants.insert().values(
                        token_id=record.id, parent_id=grant.parent_id, origin_id=grant.origin_id
                    )
                )

    async def grant_link(self, token_id: str) -> GrantLink | None:
        """The grant link of a token minted by exchange or refresh (``None``: not minted so)."""
        g = token_grants.c
        query = select(g.parent_id, g.origin_id).where(g.token_id == token_id)
        async with self.engine.connect() as conn:
            row = (await conn.execute(query)).first()
        return None if row is None else GrantLink(row[0], row[1])

    async def revoke_descendants(self, token_id: str, reason: str, now: datetime) -> list[str]:
        """Revoke every still-unrevoked token minted, directly or transitively, from
        ``token_id`` (one recursive query on the indexed grant links); the ids revoked."""
        g = token_grants.c
        tree = (
            select(g.token_id)
            .where(or_(g.parent_id == token_id, g.origin_id == token_id))
            .cte("descendants", recursive=True)
        )
        tree = tree.union(
            select(token_grants.c.token_id).join(tree, token_grants.c.parent_id == tree.c.token_id)
        )
        live = select(tokens.c.id).where(
            tokens.c.id.in_(select(tree.c.token_id)), tokens.c.revoked_at.is_(None)
        )
        async with self.engine.begin() as conn:
            ids = sorted(r[0] for r in (await conn.execute(live)).all())
            if ids:
                await conn.execute(
                    update(tokens)
                    .where(tokens.c.id.in_(ids), tokens.c.revoked_at.is_(None))
                    .values(revoked_at=now, revoked_reason=reason[:200])
                )
        return ids

    async def find_by_hash(self, hashes: Sequence[str]) -> tuple[TokenRecord, str] | None:
        """The token whose stored hash is one of ``hashes``, with the hash that matched."""
        query = _SELECT_TOKEN.add_columns(tokens.c.token_hash).where(
            tokens.c.token_hash.in_(list(hashes))
            if len(hashes) > 1
            else tokens.c.token_hash == hashes[0]
        )
        async with self.engine.connect() as conn:
            row = (await conn.execute(query)).first()
        if row is None:
            return None
        return _record(row), row._mapping["token_hash"]

    async def get_token(self, token_id: str) -> TokenRecord | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(_SELECT_TOKEN.where(tokens.c.id == token_id))).first()
        return _record(row) if row else None

    async def count_by_state(
        self, *, project_ids: Sequence[str] | None, now: datetime
    ) -> dict[str | None, dict[str, int]]:
        """How many tokens each project has in each state at ``now`` (one query, counted by
        the database)."""
        c = tokens.c
        state = state_at(now).label("state")
        query = select(c.project_id, state, func.count()).group_by(c.project_id, state)
        if project_ids is not None:
            query = query.where(c.project_id.in_(list(project_ids)))
        counts: dict[str | None, dict[str, int]] = {}
        async with self.engine.connect() as conn:
            for project_id, name, number in (await conn.execute(query)).all():
                counts.setdefault(project_id, {})[name] = int(number)
        return counts

    async def search_tokens(
        self,
        query: TokenQuery,
        *,
        now: datetime,
        limit: int = 50,
        after: tuple[datetime, str] | None = None,
        count: bool = False,
    ) -> tuple[list[TokenRecord], int | None]:
        """One keyset page of tokens, newest first (``created_at``, then ``id``, descending),
        with ``query`` applied by the database; ``after``: the sort key of the last token of
        the previous page. The second value is how many match in all when ``count`` is asked
        (one more query), else ``None``.
        """
        c = tokens.c
        where = and_(true(), *_conditions(query, now, self.engine.dialect.name))
        page = _SELECT_TOKEN.where(where)
        if after is not None:
            at, last_id = after
            page = page.where(or_(c.created_at < at, and_(c.created_at == at, c.id < last_id)))
        page = page.order_by(c.created_at.desc(), c.id.desc()).limit(limit)
        total = None
        async with self.engine.connect() as conn:
            if count:
                number = (
                    await conn.execute(select(func.count()).select_from(tokens).where(where))
                ).scalar()
                total = int(number or 0)
            rows = (await conn.execute(page)).all()
        return [_record(r) for r in rows], total

    async def list_tokens(
        self,
        *,
        project_ids: Sequence[str] | None,
        state: TokenState | None,
        now: datetime,
        limit: int = 100,
        after: str | None = None,
        identity: str | None = None,
    ) -> list[TokenRecord]:
        """Tokens of the given projects (``None``: all), newest id order, keyset-paginated;
        with ``identity`` (an external id), only the tokens of the identities that have it
        (an indexed lookup on both tables)."""
        query = _SELECT_TOKEN.order_by(tokens.c.id).limit(limit)
        if project_ids is not None:
            query = query.where(tokens.c.project_id.in_(list(project_ids)))
        if identity is not None:
            query = query.where(identities.c.external_id == identity)
        if after:
            query = query.where(tokens.c.id > after)
        c = tokens.c
        live = and_(
            c.revoked_at.is_(None),
            or_(c.replaced_by.is_(None), c.grace_until > now),
        )
        if state == TokenState.REVOKED:
            query = query.where(c.revoked_at.is_not(None))
        elif state == TokenState.EXPIRED:
            query = query.where(live, c.expires_at <= now)
        elif state == TokenState.ROTATED:
            query = query.where(
                c.revoked_at.is_(None),
                c.replaced_by.is_not(None),
                or_(c.grace_until.is_(None), c.grace_until <= now),
            )
        elif state == TokenState.ACTIVE:
            query = query.where(live, or_(c.expires_at.is_(None), c.expires_at > now))
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        records = [_record(r) for r in rows]
        if state == TokenState.ACTIVE:
            records = [
                r
                for r in records
                if r.state(now)
                in (TokenState.ACTIVE, TokenState.ROTATED_IN_GRACE, TokenState.NOT_YET_VALID)
            ]
        return records

    async def revoke(self, token_id: str, reason: str, now: datetime) -> TokenRecord:
        """Revoke a token (idempotent: the first revocation's time and reason are kept)."""
        async with self.engine.begin() as conn:
            await conn.execute(
                update(tokens)
                .where(tokens.c.id == token_id, tokens.c.revoked_at.is_(None))
                .values(revoked_at=now, revoked_reason=reason)
            )
            row = (await conn.execute(_SELECT_TOKEN.where(tokens.c.id == token_id))).first()
        if row is None:
            raise NotFound("token_not_found", "no such token")
        return _record(row)

    async def rotate(
        self, old_id: str, successor: TokenRecord, successor_hash: str, grace_until: datetime
    ) -> TokenRecord:
        """Atomically link ``old_id`` to its successor; fails if it was already replaced.

        A use-limited token hands its remaining uses to the successor; while in its grace
        window the predecessor spends from that same budget, so rotation never adds uses.
        """
        async with self.engine.begin() as conn:
            # Take the row's write lock first, so no use can be spent between read and hand-over.
            await conn.execute(
                update(tokens)
                .where(tokens.c.id == old_id)
                .values(remaining_uses=tokens.c.remaining_uses)
            )
            held = (
                await conn.execute(
                    select(tokens.c.remaining_uses, tokens.c.refilled_at).where(
                        tokens.c.id == old_id
                    )
                )
            ).first()
            left = held[0] if held is not None else None
            successor.remaining_uses = left
            if held is not None and successor.refill is not None:
                successor.refilled_at = held[1]  # the refill period carries over too
            await conn.execute(tokens.insert().values(**_token_values(successor, successor_hash)))
            # A rotated refresh token stays in its grant: it descends from its predecessor.
            origin = (
                await conn.execute(
                    select(token_grants.c.origin_id).where(token_grants.c.token_id == old_id)
                )
            ).first()
            if origin is not None:
                await conn.execute(
                    token_grants.insert().values(
                        token_id=successor.id, parent_id=old_id, origin_id=origin[0]
                    )
                )
            result = await conn.execute(
                update(tokens)
                .where(
                    tokens.c.id == old_id,
                    tokens.c.replaced_by.is_(None),
                    tokens.c.revoked_at.is_(None),
                )
                .values(
                    replaced_by=successor.id,
                    grace_until=grace_until,
                    remaining_uses=None if left is None else 0,
                )
            )
            if result.rowcount != 1:
                raise Conflict("token_not_rotatable", "the token is revoked or already rotated")
            row = (await conn.execute(_SELECT_TOKEN.where(tokens.c.id == old_id))).first()
        assert row is not None
        return _record(row)

    async def set_quarantine(
        self, token_id: str, at: datetime | None, reason: str | None
    ) -> TokenRecord | None:
        """Suspend a token (``at`` set) or lift its suspension (``at=None``)."""
        async with self.engine.begin() as conn:
            await conn.execute(
                update(tokens)
                .where(tokens.c.id == token_id)
                .values(quarantined_at=at, quarantine_reason=reason)
            )
            row = (await conn.execute(_SELECT_TOKEN.where(tokens.c.id == token_id))).first()
        return _record(row) if row else None

    async def set_disabled(
        self, token_id: str, at: datetime | None, reason: str | None, by: str | None
    ) -> TokenRecord | None:
        """Switch a token off (``at`` set) or on again (``at=None``); a token already off
        keeps the time, reason and author of the first switch."""
        c = tokens.c
        statement = update(tokens).where(c.id == token_id)
        if at is not None:
            statement = statement.where(c.disabled_at.is_(None))
        async with self.engine.begin() as conn:
            await conn.execute(
                statement.values(disabled_at=at, disabled_reason=reason, disabled_by=by)
            )
            row = (await conn.execute(_SELECT_TOKEN.where(c.id == token_id))).first()
        return _record(row) if row else None

    async def update_settings(self, token_id: str, values: dict[str, Any]) -> TokenRecord | None:
        """Change editable settings (name, scopes, expiry, allowlist, rate limit, uses,
        metadata)."""
        editable = {
            "name",
            "scopes",
            "expires_at",
            "ip_allowlist",
            "rate_limit",
            "remaining_uses",
            "metadata",
        }
        if not values.keys() <= editable:
            raise ValueError(f"not editable: {sorted(values.keys() - editable)}")
        row_values = dict(values)
        if "rate_limit" in row_values:
            row_values["rate_limit"] = ";".join(row_values["rate_limit"]) or None
        async with self.engine.begin() as conn:
            await conn.execute(update(tokens).where(tokens.c.id == token_id).values(**row_values))
            row = (await conn.execute(_SELECT_TOKEN.where(tokens.c.id == token_id))).first()
        return _record(row) if row else None

    async def consume_use(
        self,
        token_id: str,
        *,
        rotated: bool = False,
        cost: int = 1,
        refill: Refill | None = None,
        now: datetime | None = None,
    ) -> Spent:
        """Spend ``cost`` credits atomically: allowed only when at least ``cost`` (and at
        least one) are left; the credits left after it either way.

        A token whose credits refill (``refill``, as the caller read it) is refilled first
        when its last refill is before the current period (``now``'s): the refill and the
        spend are one conditional statement, so a refill at a boundary is counted once,
        however many replicas spend at it (docs/decisions/0035-identities-and-credits.md).

        A rotated token in its grace window spends from its successor (the uses were handed
        over at rotation), so the lineage as a whole never gets more uses than it was given.
        """
        c = tokens.c
        async with self.engine.begin() as conn:
            target = token_id
            if rotated:
                for _ in range(16):
                    successor = (
                        await conn.execute(select(c.replaced_by).where(c.id == target))
                    ).scalar()
                    if successor is None:
                        break
                    target = successor
            period = period_start(refill, now) if refill is not None and now else None
            if period is None:
                credits: Any = c.remaining_uses
                values: dict[str, Any] = {"remaining_uses": c.remaining_uses - cost}
            else:
                start = literal(period, UTCDateTime())
                due = or_(c.refilled_at.is_(None), c.refilled_at < start)
                credits = case((due, c.refill_amount), else_=c.remaining_uses)
                values = {
                    "remaining_uses": credits - cost,
                    "refilled_at": case((due, start), else_=c.refilled_at),
                }
            spent = (
                await conn.execute(
                    update(tokens)
                    .where(c.id == target, credits >= max(cost, 1))
                    .values(**values)
                    .returning(c.remaining_uses)
                )
            ).first()
            if spent is not None:
                return Spent(True, int(spent[0]))
            # Denied: what is left (a refill due counts, though nothing was written).
            left = (
                await conn.execute(select(c.remaining_uses, c.refilled_at).where(c.id == target))
            ).first()
        if left is None or left[0] is None:
            return Spent(False, 0)
        if period is None or now is None:
            return Spent(False, int(left[0]))
        return Spent(False, available(int(left[0]), refill, left[1], now) or 0)

    async def touch_many(self, seen: dict[str, tuple[datetime, str | None]]) -> None:
        """Record last-used time and IP for many tokens at once (written in batches)."""
        if not seen:
            return
        async with self.engine.begin() as conn:
            for token_id, (at, ip) in seen.items():
                await conn.execute(
                    update(tokens)
                    .where(tokens.c.id == token_id)
                    .values(last_used_at=at, last_used_ip=ip)
                )

    async def active_bootstrap_ids(self, name: str) -> list[str]:
        """Unrevoked global tokens made by ``tokenward init`` (no creator, no project)."""
        query = select(tokens.c.id).where(
            tokens.c.project_id.is_(None),
            tokens.c.created_by.is_(None),
            tokens.c.name == name,
            tokens.c.revoked_at.is_(None),
        )
        async with self.engine.connect() as conn:
            return [r[0] for r in (await conn.execute(query)).all()]

    async def ping(self) -> None:
        async with self.engine.connect() as conn:
            await conn.execute(select(1))
