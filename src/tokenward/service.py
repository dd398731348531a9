"""Admin operations on projects and tokens, with the rules that protect them.

Every operation is done *by* an actor (the verified admin credential) and checks, in one
place, what the invariants demand:

* tenant isolation: a project-bound credential sees and changes only its own project, and
  anything else looks like it does not exist (404, never 403, so ids cannot be probed);
* scopes only narrow: a new or rotated token never holds a scope its creator lacks, nor
  outlives its creator;
* every change is invalidated in the verifier's cache before it is acknowledged;
* revoking or quarantining a token revokes everything minted from it by a grant (exchange,
  refresh), transitively, in the same operation: see :meth:`TokenService.revoke_descendants`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from tokenward.errors import Conflict, Forbidden, Invalid, NotFound, refuse_pasted_tokens
from tokenward.events import AdminEvent, EventBus, current_request
from tokenward.identities.store import IdentityStore
from tokenward.pagination import (
    DEFAULT_LIMIT,
    MAX_LIMIT,
    decode_cursor,
    encode_cursor,
    from_micros,
    micros,
)
from tokenward.store.repository import GrantLink, Project, TokenQuery, TokenStore
from tokenward.tokens.credits import Refill
from tokenward.tokens.durations import MAX_DURATION
from tokenward.tokens.format import (
    Environment,
    generate_token,
    new_public_id,
    token_hint,
)
from tokenward.tokens.hashing import TokenHasher
from tokenward.tokens.model import TokenIdentity, TokenKind, TokenRecord, TokenState
from tokenward.tokens.scopes import is_narrower, validate_scopes
from tokenward.verify import Verifier, project_message

MAX_GRACE = timedelta(days=30)
#: key in a project's settings: the longest lifetime of its new tokens, in days
#: Where a project's policy lives in its settings (one place for the API, CLI and dashboard;
#: enforced through the ``lifetime_cap`` hook, see tokenward.oauth.policy).
POLICY_KEY = "policy"
MAX_LIFETIME_FIELD = "max_token_lifetime"  # seconds


def lifetime_days(project_settings: dict[str, Any]) -> int | None:
    """A project's longest token lifetime in whole days, if its policy sets one."""
    seconds = (project_settings.get(POLICY_KEY) or {}).get(MAX_LIFETIME_FIELD)
    return int(seconds) // 86400 if seconds else None


LifetimeCap = Callable[[str, datetime | None, datetime, bool], Awaitable[datetime | None]]


@dataclass(slots=True)
class TokenSpec:
    """What an admin asks for when creating a token (already type-checked by the API)."""

    project: str | None
    scopes: list[str]
    environment: str = "live"
    name: str = ""
    kind: str = TokenKind.API_KEY.value
    principal: str | None = None
    expires_at: datetime | None = None
    ttl: timedelta | None = None
    not_before: datetime | None = None
    ip_allowlist: list[str] = field(default_factory=list)
    rate_limit: list[str] = field(default_factory=list)
    #: the counter ``rate_limit`` is counted on (``None``: the new token's own id); a grant
    #: passes its subject's, so a lineage shares one budget
    rate_limit_key: str | None = None
    uses: int | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    family_id: str | None = None
    dpop_jkt: str | None = None
    #: set for a token minted by a grant (exchange, refresh): where it descends from
    grant: GrantLink | None = None
    #: the external id of the identity (owner) the token belongs to, in its project
    identity: str | None = None
    #: a grant passes its subject's identity on (so the identity's limit still counts)
    identity_id: str | None = None
    #: credits that refill (``uses`` defaults to the refill's amount)
    refill: Refill | None = None


@dataclass(slots=True)
class TokenChanges:
    """Settings to change on an existing token (``None``: leave as is)."""

    name: str | None = None
    scopes: list[str] | None = None
    expires_at: datetime | None = None
    ip_allowlist: list[str] | None = None
    rate_limit: list[str] | None = None
    uses: int | None = None
    #: the whole metadata, replacing the old (``{}`` clears it)
    metadata: dict[str, str] | None = None


@dataclass(slots=True)
class TokenPage:
    """One page of a token search: ``next_cursor`` continues it (``None``: the last)."""

    tokens: list[TokenRecord]
    next_cursor: str | None
    #: how many match in all, when it was asked for
    total: int | None = None


TOKEN_CURSOR = "tokens"  # noqa: S105 - the name of a list, no secret


def token_cursor(record: TokenRecord) -> str:
    """The cursor of the page after ``record`` in the token search's order."""
    return encode_cursor(TOKEN_CURSOR, (micros(record.created_at), record.id))


@dataclass(slots=True)
class Issued:
    """A token just created: the only moment its secret exists outside the client."""

    secret: str
    record: TokenRecord


def normalize_cidrs(cidrs: list[str]) -> list[str]:
    out = []
    for index, cidr in enumerate(cidrs):
        try:
            out.append(str(ipaddress.ip_network(cidr, strict=False)))
        except ValueError:
            # The value is not echoed: error bodies never repeat what was sent.
            raise Invalid(
                "invalid_cidr", f"ip_allowlist[{index}] is not an IPv4 or IPv6 address or CIDR"
            ) from None
    return out


def _widening(code: str, name: str, rule: str) -> Invalid:
    """422 naming the field: a change that would widen what a token may do."""
    message = f"a token's {name} {rule}: make a new token for more"
    return Invalid(code, message, details=[{"field": name, "problem": rule}])


def _public_value(value: object) -> object:
    return value.isoformat().replace("+00:00", "Z") if isinstance(value, datetime) else value


def _what_changed(record: TokenRecord, values: dict[str, object]) -> dict[str, object]:
    """The detail of a ``token.update`` event: the fields changed, and their old and new
    values (metadata: only the keys that changed; no secret is among any of them)."""
    before: dict[str, object] = {}
    after: dict[str, object] = {}
    for name, value in values.items():
        if name == "metadata":
            assert isinstance(value, dict)
            keys = set(value) ^ set(record.metadata)
            keys |= {k for k in value if k in record.metadata and record.metadata[k] != value[k]}
            after["metadata_keys"] = sorted(keys)
            continue
        old = getattr(record, name)
        before[name], after[name] = _public_value(old), _public_value(value)
    return {"changed": sorted(values), "from": before, "to": after}


def _utc(value: datetime | None, name: str) -> datetime | None:
    """``value`` in UTC; a time that has no UTC equivalent (year 1 at +14:00) is refused."""
    if value is None:
        return None
    try:
        return value.astimezone(UTC)
    except (OverflowError, ValueError):
        raise Invalid(f"invalid_{name}", f"{name} is out of range") from None


class TokenService:
    def __init__(
        self,
        store: TokenStore,
        hasher: TokenHasher,
        verifier: Verifier,
        events: EventBus,
        on_change: Callable[[str], Awaitable[None]] | None = None,
    ) -> None:
        self.store = store
        self.hasher = hasher
        self.verifier = verifier
        self.events = events
        #: called with a token id after every change (revocation fan-out to other replicas)
        self.on_change = on_change
        #: project policy: (project id, wanted expiry, now, clamp) → allowed expiry, or raises
        self.lifetime_cap: LifetimeCap | None = None
        #: the identities tokens may belong to
        self.identities = IdentityStore(store.engine)

    @property
    def now(self) -> datetime:
        return self.verifier.clock()

    # -- projects -------------------------------------------------------------------------
    async def create_project(self, actor: TokenRecord, name: str) -> Project:
        if actor.project_id is not None:
            raise Forbidden("forbidden", "only a global admin credential can create projects")
        project = await self.store.create_project(name, self.now)
        await self._audit("project.create", actor, project.id, None, {"name": name})
        return project

    async def list_projects(
        self, actor: TokenRecord, *, limit: int | None = None, after: str | None = None
    ) -> list[Project]:
        """The projects the actor may see, by name (``after``: names after this one)."""
        only = None if actor.project_id is None else [actor.project_id]
        return await self.store.list_projects(only, limit=limit, after=after)

    async def project_for(self, actor: TokenRecord, name_or_id: str) -> Project:
        project = await self.store.get_project(name_or_id)
        if project is None or (actor.project_id not in (None, project.id)):
            raise NotFound("project_not_found", f"no project named {name_or_id!r}")
        return project

    async def set_project_ip_allowlist(
        self, actor: TokenRecord, name_or_id: str, cidrs: list[str]
    ) -> Project:
        """Replace a project's IP allowlist (empty: any address); effective immediately."""
        project = await self.project_for(actor, name_or_id)
        updated = await self.store.set_project_ip_allowlist(project.id, normalize_cidrs(cidrs))
        self.verifier.invalidate_project(project.id)
        if self.on_change is not None:  # and on every other replica (the fan-out)
            await self.on_change(project_message(project.id))
        await self._audit(
            "project.update", actor, project.id, None, {"ip_allowlist": updated.ip_allowlist}
        )
        return updated

    # -- tokens ---------------------------------------------------------------------------
    async def create_token(self, actor: TokenRecord, spec: TokenSpec) -> Issued:
        now = self.now
        refuse_pasted_tokens(
            project=spec.project or "",
            name=spec.name,
            principal=spec.principal or "",
            scopes=" ".join(spec.scopes),
            metadata=" ".join(f"{k} {v}" for k, v in spec.metadata.items()),
        )
        if spec.project is None:
            if actor.project_id is not None:
                raise Invalid("project_required", "a project is required")
            project_id, project_name = None, None
        else:
            project = await self.project_for(actor, spec.project)
            project_id, project_name = project.id, project.name
        scopes = validate_scopes(spec.scopes)
        if not scopes:
            raise Invalid("invalid_scope", "a token needs at least one scope")
        # A canary grants nothing whatever its scopes say, so holding them is not asked.
        if spec.kind != TokenKind.CANARY and not is_narrower(scopes, actor.scopes):
            raise Forbidden("scope_not_held", "a token cannot have a scope its creator lacks")
        if actor.environment == Environment.TEST and spec.environment == Environment.LIVE:
            raise Forbidden("environment_not_held", "a test credential cannot create live tokens")
        expires_at = _utc(spec.expires_at, "expires_at")
        not_before = _utc(spec.not_before, "not_before")
        if spec.ttl is not None:
            if expires_at is not None:
                raise Invalid("conflicting_expiry", "give either ttl or expires_at, not both")
            expires_at = now + spec.ttl
        if expires_at is not None and expires_at <= now:
            raise Invalid("invalid_expiry", "expires_at must be in the future")
        if expires_at is not None and expires_at - now > MAX_DURATION:
            raise Invalid("invalid_expiry", "expires_at must be at most 3660 days away")
        if not_before is not None and not_before - now > MAX_DURATION:
            raise Invalid("invalid_not_before", "not_before must be at most 3660 days away")
        if self.lifetime_cap is not None and project_id is not None:
            expires_at = await self.lifetime_cap(project_id, expires_at, now, False)
        if not_before and expires_at and not_before >= expires_at:
            raise Invalid("invalid_not_before", "not_before must be before the expiry")
        if actor.expires_at is not None and (expires_at is None or expires_at > actor.expires_at):
            raise Forbidden(
                "lifetime_not_held", "a token cannot outlive the credential creating it"
            )
        if spec.uses is not None and spec.uses < 1:
            raise Invalid("invalid_uses", "uses must be at least 1")
        identity = await self._identity_of(spec, project_id)
        uses = spec.uses
        if spec.refill is not None and uses is None:
            uses = spec.refill.amount
        secret = generate_token(spec.environment)
        token_id = new_public_id("tok")
        record = TokenRecord(
            id=token_id,
            project_id=project_id,
            project=project_name,
            environment=spec.environment,
            name=spec.name,
            kind=spec.kind,
            principal=spec.principal or spec.name or token_id,
            scopes=scopes,
            created_at=now,
            created_by=actor.id,
            not_before=not_before,
            expires_at=expires_at,
            ip_allowlist=normalize_cidrs(spec.ip_allowlist),
            rate_limit=list(spec.rate_limit),
            rate_limit_key=spec.rate_limit_key,
            remaining_uses=uses,
            hint=token_hint(secret),
            key_id=self.hasher.current.id,
            metadata=dict(spec.metadata),
            family_id=spec.family_id,
            dpop_jkt=spec.dpop_jkt,
            identity=identity,
            refill=spec.refill,
            refilled_at=now if spec.refill is not None else None,
        )
        await self.store.insert_token(record, self.hasher.hash(secret), spec.grant)
        await self._audit(
            "token.create",
            actor,
            project_id,
            record.id,
            {
                "scopes": scopes,
                "environment": spec.environment,
                "kind": spec.kind,
                **({"identity": identity.id} if identity is not None else {}),
                **({"refill": str(spec.refill)} if spec.refill is not None else {}),
            },
        )
        return Issued(secret, record)

    async def _identity_of(self, spec: TokenSpec, project_id: str | None) -> TokenIdentity | None:
        """The identity a new token belongs to: named by its external id in the token's
        project, or passed on by a grant from its subject."""
        if spec.identity is None and spec.identity_id is None:
            return None
        if project_id is None:
            raise Invalid("project_required", "a token with an identity needs a project")
        if spec.identity_id is not None:
            found = await self.identities.get_by_id(spec.identity_id)
        else:
            assert spec.identity is not None
            found = await self.identities.get(project_id, spec.identity)
        if found is None or found.project_id != project_id:
            raise NotFound("identity_not_found", "no identity with this external id")
        return found.as_token_identity()

    async def set_lifetime_policy(
        self, actor: TokenRecord, project: str, max_days: int | None
    ) -> None:
        """Set (or, with ``None``, clear) a project's longest token lifetime, in days."""
        if max_days is not None and not 1 <= max_days <= 3660:
            raise Invalid("invalid_lifetime", "the longest lifetime is 1 to 3660 days")
        found = await self.project_for(actor, project)
        settings = await self.store.project_settings(found.id)
        policy = dict(settings.get(POLICY_KEY) or {})
        policy[MAX_LIFETIME_FIELD] = None if max_days is None else max_days * 86400
        settings[POLICY_KEY] = policy
        await self.store.set_project_settings(found.id, settings)
        await self._audit(
            "project.policy",
            actor,
            found.id,
            None,
            {MAX_LIFETIME_FIELD: policy[MAX_LIFETIME_FIELD]},
        )

    async def get_token(self, actor: TokenRecord, token_id: str) -> TokenRecord:
        record = await self.store.get_token(token_id)
        if record is None or actor.project_id not in (None, record.project_id):
            raise NotFound("token_not_found", "no such token")
        return record

    async def list_tokens(
        self,
        actor: TokenRecord,
        *,
        project: str | None = None,
        state: TokenState | None = None,
        limit: int = 100,
        after: str | None = None,
        identity: str | None = None,
    ) -> list[TokenRecord]:
        """Tokens the actor may see; with ``identity`` (an external id), only the tokens of
        the identities of that external id in the projects listed."""
        project_ids = await self._visible_projects(actor, project)
        return await self.store.list_tokens(
            project_ids=project_ids,
            state=state,
            now=self.now,
            limit=limit,
            after=after,
            identity=identity,
        )

    async def token_states(
        self, actor: TokenRecord, *, project: str | None = None
    ) -> dict[str | None, dict[str, int]]:
        """Tokens per state, per project the actor may see (counted by the store)."""
        project_ids = await self._visible_projects(actor, project)
        return await self.store.count_by_state(project_ids=project_ids, now=self.now)

    async def _visible_projects(self, actor: TokenRecord, project: str | None) -> list[str] | None:
        """The project ids a listing covers: ``project`` (if the actor may see it), else the
        actor's own project, else every project (``None``)."""
        if project is not None:
            return [(await self.project_for(actor, project)).id]
        return [actor.project_id] if actor.project_id is not None else None

    async def search_tokens(
        self,
        actor: TokenRecord,
        query: TokenQuery,
        *,
        project: str | None = None,
        limit: int = DEFAULT_LIMIT,
        cursor: str | None = None,
        count: bool = False,
    ) -> TokenPage:
        """A page of the tokens the actor may see, filtered by the database; ``cursor`` is
        the previous page's ``next_cursor`` (:mod:`tokenward.pagination`)."""
        if not 1 <= limit <= MAX_LIMIT:
            raise Invalid("invalid_limit", f"limit must be between 1 and {MAX_LIMIT}")
        key = decode_cursor(TOKEN_CURSOR, cursor, (int, str))
        after = None if key is None else (from_micros(key[0]), key[1])
        query.project_ids = await self._visible_projects(actor, project)
        records, total = await self.store.search_tokens(
            query, now=self.now, limit=limit + 1, after=after, count=count
        )
        more = len(records) > limit
        records = records[:limit]
        next_cursor = token_cursor(records[-1]) if more and records else None
        return TokenPage(records, next_cursor, total)

    async def revoke_token(self, actor: TokenRecord, token_id: str, reason: str) -> TokenRecord:
        refuse_pasted_tokens(reason=reason)
        await self.get_token(actor, token_id)
        record = await self.store.revoke(token_id, reason or "revoked by admin", self.now)
        await self._changed(token_id)
        await self._audit(
            "token.revoke", actor, record.project_id, token_id, {"reason": record.revoked_reason}
        )
        await self.revoke_descendants(actor, record, "origin_revoked")
        return record

    async def revoke_own(
        self, record: TokenRecord, reason: str, actor: TokenRecord | None = None
    ) -> None:
        """A holder gives up its own token (RFC 7009 with the token as its own credential),
        or ``actor`` one granted from it (RFC 7009 §2.1: a client's own tokens)."""
        by = actor or record
        await self.store.revoke(record.id, reason, self.now)
        await self._changed(record.id)
        await self._audit("token.revoke", by, record.project_id, record.id, {"reason": reason})
        await self.revoke_descendants(by, record, "origin_revoked")

    async def revoke_descendants(
        self, actor: TokenRecord | None, origin: TokenRecord, reason: str
    ) -> list[str]:
        """Revoke every token minted from ``origin`` by a grant, transitively: the access and
        refresh tokens exchanged from an API key, those refreshed from them, access tokens
        narrowed from those. Each is dropped from the cache on every replica (the same fan-out
        as a revocation) and one ``token.cascade_revoke`` event lists them all.

        Descendants are revoked, not quarantined, even when ``origin`` is only quarantined:
        they may be in the same wrong hands, releasing the key must not bring them back, and
        a client gets new ones by exchanging the key again.
        """
        revoked = await self.store.revoke_descendants(
            origin.id, f"{reason.replace('_', ' ')} ({origin.id})", self.now
        )
        for token_id in revoked:
            await self._changed(token_id)
        if revoked:
            await self._audit(
                "token.cascade_revoke",
                actor,
                origin.project_id,
                origin.id,
                {"revoked": revoked, "reason": reason},
            )
        return revoked

    async def rotate_token(
        self, actor: TokenRecord, token_id: str, grace: timedelta
    ) -> tuple[Issued, TokenRecord]:
        """Issue a successor with the same settings; the old token works until grace ends."""
        if grace < timedelta(0) or grace > MAX_GRACE:
            raise Invalid("invalid_grace", "grace must be between 0 and 30 days")
        old = await self.get_token(actor, token_id)
        if old.state(self.now) not in (TokenState.ACTIVE, TokenState.NOT_YET_VALID):
            raise Conflict(
                "token_not_rotatable", f"a token that is {old.state(self.now)} cannot be rotated"
            )
        if not is_narrower(old.scopes, actor.scopes):
            raise Forbidden("scope_not_held", "a token cannot have a scope its creator lacks")
        if actor.environment == Environment.TEST and old.environment == Environment.LIVE:
            raise Forbidden("environment_not_held", "a test credential cannot create live tokens")
        now = self.now
        expires_at = None
        if old.expires_at is not None:
            expires_at = now + (old.expires_at - old.created_at)
        if self.lifetime_cap is not None and old.project_id is not None:
            expires_at = await self.lifetime_cap(old.project_id, expires_at, now, True)
        if actor.expires_at is not None and (expires_at is None or expires_at > actor.expires_at):
            expires_at = actor.expires_at
        secret = generate_token(old.environment)
        successor = TokenRecord(
            id=new_public_id("tok"),
            project_id=old.project_id,
            project=old.project,
            environment=old.environment,
            name=old.name,
            kind=old.kind,
            principal=old.principal,
            scopes=list(old.scopes),
            created_at=now,
            created_by=actor.id,
            # A successor never starts working before its predecessor would have.
            not_before=old.not_before if old.not_before and old.not_before > now else None,
            expires_at=expires_at,
            ip_allowlist=list(old.ip_allowlist),
            rate_limit=list(old.rate_limit),
            # One budget for a lineage: the successor counts on its predecessor's counter, so
            # the two secrets working during the grace do not double the rate.
            rate_limit_key=old.rate_limit_counter,
            remaining_uses=old.remaining_uses,
            rotated_from=old.id,
            hint=token_hint(secret),
            key_id=self.hasher.current.id,
            metadata=dict(old.metadata),
            family_id=old.family_id,
            dpop_jkt=old.dpop_jkt,
            rotation_period=old.rotation_period,
            identity=old.identity,
            refill=old.refill,
            refilled_at=old.refilled_at,  # read again under the row's lock by the store
        )
        updated_old = await self.store.rotate(
            old.id, successor, self.hasher.hash(secret), now + grace
        )
        await self._changed(old.id)
        await self._audit(
            "token.rotate",
            actor,
            old.project_id,
            old.id,
            {"successor": successor.id, "grace_seconds": grace.total_seconds()},
        )
        return Issued(secret, successor), updated_old

    async def quarantine_token(
        self, actor: TokenRecord | None, token_id: str, reason: str
    ) -> TokenRecord:
        """Suspend a token (reversibly); ``actor`` is ``None`` for anomaly handling."""
        refuse_pasted_tokens(reason=reason)
        if actor is not None:
            await self.get_token(actor, token_id)
        record = await self.store.set_quarantine(token_id, self.now, reason[:300])
        if record is None:
            raise NotFound("token_not_found", "no such token")
        await self._changed(token_id)
        await self._audit(
            "token.quarantine", actor, record.project_id, token_id, {"reason": reason}
        )
        await self.revoke_descendants(actor, record, "origin_quarantined")
        return record

    async def release_token(self, actor: TokenRecord, token_id: str, note: str = "") -> TokenRecord:
        """Lift a quarantine: the token works again."""
        refuse_pasted_tokens(note=note)
        old = await self.get_token(actor, token_id)
        record = await self.store.set_quarantine(token_id, None, None)
        assert record is not None
        await self._changed(token_id)
        detail: dict[str, object] = {"was": old.quarantine_reason, "note": note}
        await self._audit("token.release", actor, record.project_id, token_id, detail)
        return record

    async def update_token(
        self, actor: TokenRecord, token_id: str, changes: TokenChanges
    ) -> TokenRecord:
        """Change a live token's settings; the one path of ``PATCH /v1/tokens/{id}``, the CLI
        and the dashboard.

        Name, metadata, IP allowlist and rate limit change freely; scopes, lifetime and
        uses only ever shrink (widening any of them needs a new token, which the creation
        rules then govern): a widening is ``422`` naming the field. The change reaches every
        replica's cache before the call returns, and one ``token.update`` event says what
        changed, from what to what (metadata: the keys only, its values may be private).
        """
        refuse_pasted_tokens(
            name=changes.name or "",
            metadata=" ".join(f"{k} {v}" for k, v in (changes.metadata or {}).items()),
        )
        record = await self.get_token(actor, token_id)
        now = self.now
        if record.state(now) not in (TokenState.ACTIVE, TokenState.NOT_YET_VALID):
            raise Invalid(
                "token_not_editable", f"a token that is {record.state(now)} cannot be changed"
            )
        values: dict[str, object] = {}
        if changes.name is not None and changes.name != record.name:
            values["name"] = changes.name[:128]
        if changes.scopes is not None:
            scopes = validate_scopes(changes.scopes)
            if not scopes:
                raise Invalid("invalid_scope", "a token needs at least one scope")
            if not is_narrower(scopes, record.scopes) or not is_narrower(scopes, actor.scopes):
                raise _widening("scope_not_narrower", "scopes", "can only be narrowed")
            if scopes != record.scopes:
                values["scopes"] = scopes
        expires_at = _utc(changes.expires_at, "expires_at")
        if expires_at is not None and expires_at != record.expires_at:
            if expires_at <= now:
                raise Invalid("invalid_expiry", "expires_at must be in the future")
            if record.expires_at is not None and expires_at > record.expires_at:
                raise _widening("lifetime_not_narrower", "expires_at", "can only be shortened")
            if actor.expires_at is not None and expires_at > actor.expires_at:
                raise Forbidden(
                    "lifetime_not_held", "a token cannot outlive the credential changing it"
                )
            values["expires_at"] = expires_at
        if changes.ip_allowlist is not None:
            cidrs = normalize_cidrs(changes.ip_allowlist)
            if cidrs != record.ip_allowlist:
                values["ip_allowlist"] = cidrs
        if changes.rate_limit is not None and changes.rate_limit != record.rate_limit:
            values["rate_limit"] = list(changes.rate_limit)
        if changes.uses is not None and changes.uses != record.remaining_uses:
            if changes.uses < 0:
                raise Invalid("invalid_uses", "uses cannot be negative")
            if record.remaining_uses is not None and changes.uses > record.remaining_uses:
                raise _widening("uses_not_narrower", "uses", "can only go down")
            values["remaining_uses"] = changes.uses
        if changes.metadata is not None and changes.metadata != record.metadata:
            values["metadata"] = dict(changes.metadata)
        if not values:
            return record
        updated = await self.store.update_settings(token_id, values)
        if updated is None:
            raise NotFound("token_not_found", "no such token")
        await self._changed(token_id)
        await self._audit(
            "token.update", actor, record.project_id, token_id, _what_changed(record, values)
        )
        return updated

    async def disable_token(self, actor: TokenRecord, token_id: str, reason: str) -> TokenRecord:
        """Switch a token off (reversible with :meth:`enable_token`, decision 0034): verify
        denies it with ``disabled`` on every replica at once, and everything minted from it
        by a grant is revoked (as for a quarantine: enabling the key does not bring back
        access tokens a client may no longer be meant to hold; it exchanges the key again).

        Distinct from quarantine, which anomaly handling and leak response set and lift: an
        admin's switch and the security system's hold are independent, each with its reason.
        """
        refuse_pasted_tokens(reason=reason)
        record = await self.get_token(actor, token_id)
        state = record.state(self.now)
        if state in (TokenState.REVOKED, TokenState.ROTATED, TokenState.EXPIRED):
            raise Conflict("token_not_disableable", f"a token that is {state} cannot be disabled")
        if record.disabled_at is not None:
            return record  # idempotent: the first switch's time and reason are kept
        reason = (reason or "disabled by an admin")[:300]
        updated = await self.store.set_disabled(token_id, self.now, reason, actor.id)
        if updated is None:
            raise NotFound("token_not_found", "no such token")
        await self._changed(token_id)
        await self._audit("token.disable", actor, record.project_id, token_id, {"reason": reason})
        await self.revoke_descendants(actor, updated, "origin_disabled")
        return updated

    async def enable_token(self, actor: TokenRecord, token_id: str, note: str = "") -> TokenRecord:
        """Switch a disabled token on again (a quarantine, if any, stays)."""
        refuse_pasted_tokens(note=note)
        record = await self.get_token(actor, token_id)
        if record.disabled_at is None:
            return record  # idempotent
        updated = await self.store.set_disabled(token_id, None, None, None)
        if updated is None:
            raise NotFound("token_not_found", "no such token")
        await self._changed(token_id)
        detail: dict[str, object] = {"was": record.disabled_reason, "note": note[:300]}
        await self._audit("token.enable", actor, record.project_id, token_id, detail)
        return updated

    async def record_action(
        self,
        action: str,
        actor: TokenRecord | None,
        project_id: str | None,
        token_id: str | None,
        detail: dict[str, object],
    ) -> None:
        """Emit the admin event of an action done outside this service (alerts, settings)."""
        await self._audit(action, actor, project_id, token_id, detail)

    async def _audit(
        self,
        action: str,
        actor: TokenRecord | None,
        project_id: str | None,
        token_id: str | None,
        detail: dict[str, object],
    ) -> None:
        ctx = current_request.get()
        await self.events.admin(
            AdminEvent(
                at=self.now,
                action=action,
                actor_id=actor.id if actor is not None else "system:anomaly",
                project_id=project_id,
                token_id=token_id,
                request_id=ctx.request_id if ctx else None,
                client_ip=ctx.client_ip if ctx else None,
                detail=dict(detail),
            )
        )

    async def _changed(self, token_id: str) -> None:
        self.verifier.invalidate(token_id)
        if self.on_change is not None:
            await self.on_change(token_id)


def issue_bootstrap_record(hasher: TokenHasher, now: datetime) -> Issued:
    secret = generate_token(Environment.LIVE)
    record = TokenRecord(
        id=new_public_id("tok"),
        project_id=None,
        project=None,
        environment="live",
        name="bootstrap admin",
        kind=TokenKind.API_KEY.value,
        principal="admin",
        scopes=["*"],
        created_at=now,
        hint=token_hint(secret),
        key_id=hasher.current.id,
        metadata={"bootstrap": "true"},
    )
    return Issued(secret, record)
