"""The token endpoint's logic: exchange (RFC 8693) and refresh with rotation (RFC 9700).

Grants:

* ``urn:ietf:params:oauth:grant-type:token-exchange`` with a tokenward token (an API key or
  an access token) or a CI identity token (an OIDC ID token, see :mod:`.identity`) as
  ``subject_token``: answers a short-lived access token, narrowed to the requested scopes
  and lifetime, and (for an API key or a trust policy that allows it) a refresh token;
* ``refresh_token``: the refresh token is rotated on every use, and has exactly one
  successor. Presenting one that was already used revokes its whole family (every access
  and refresh token descended from the same grant) and raises a ``refresh_token_reuse``
  security event; a use within ``reuse_grace`` of the first one is taken as a concurrent
  legitimate refresh instead: refused with ``invalid_grant``, nothing minted, nothing revoked.

Every minted token is linked to the credential that minted it and to the grant's origin
(the API key at its root, see ``token_grants``): revoking or quarantining a token revokes
what descends from it (:meth:`TokenService.revoke_descendants`), and a refresh is refused,
and its family revoked, once the origin is no longer valid (revoked, quarantined, expired,
rotated out after its grace). Both checks are also made after minting, so a revocation that
races an exchange or a refresh cannot leave a minted token alive.

Every token is minted through :class:`~tokenward.service.TokenService`, with the grant's
credential as the actor, so scopes only narrow and lifetimes only shorten.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from tokenward.errors import BadRequest, Conflict, Forbidden, Invalid, Unavailable
from tokenward.events import (
    AccessEvent,
    AdminEvent,
    EventBus,
    SecurityEvent,
    current_request,
    new_request_id,
)
from tokenward.oauth.dpop import DPoPChecker, DPoPError, DPoPRequest
from tokenward.oauth.identity import IdentityVerifier, invalid_grant
from tokenward.oauth.policy import PolicyStore, ProjectPolicy
from tokenward.oauth.store import SessionStore
from tokenward.service import Issued, TokenService, TokenSpec
from tokenward.store.repository import GrantLink
from tokenward.tokens.format import TokenFormatError, new_public_id, parse_token
from tokenward.tokens.model import Reason, TokenKind, TokenRecord, TokenState
from tokenward.tokens.scopes import ScopeError, is_narrower, validate_scopes
from tokenward.verify import Decision, ip_allowed, parse_networks

GRANT_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
GRANT_REFRESH = "refresh_token"
TYPE_ACCESS = "urn:ietf:params:oauth:token-type:access_token"
TYPE_REFRESH = "urn:ietf:params:oauth:token-type:refresh_token"
TYPE_ID_TOKEN = "urn:ietf:params:oauth:token-type:id_token"  # noqa: S105 - a type URN
TYPE_JWT = "urn:ietf:params:oauth:token-type:jwt"
TYPE_API_KEY = "urn:tokenward:params:oauth:token-type:api_key"
TOKENWARD_TYPES = (TYPE_ACCESS, TYPE_API_KEY)
IDENTITY_TYPES = (TYPE_ID_TOKEN, TYPE_JWT)


def oauth_error(code: str, message: str) -> BadRequest:
    return BadRequest(code, message, error_description=message)


@dataclass(slots=True)
class TokenRequest:
    grant_type: str
    subject_token: str | None = None
    subject_token_type: str | None = None
    refresh_token: str | None = None
    scope: list[str] | None = None
    expires_in: int | None = None
    audience: str | None = None
    requested_token_type: str | None = None
    dpop: DPoPRequest | None = None
    client_ip: str | None = None


@dataclass(slots=True)
class TokenResponse:
    access: Issued
    refresh: Issued | None
    now: datetime
    issued_token_type: str | None = None

    def body(self) -> dict[str, Any]:
        record = self.access.record
        assert record.expires_at is not None
        body: dict[str, Any] = {
            "access_token": self.access.secret,
            "token_type": "DPoP" if record.dpop_jkt else "Bearer",
            "expires_in": max(0, int((record.expires_at - self.now).total_seconds())),
            "scope": " ".join(record.scopes),
            "token_id": record.id,
        }
        if self.issued_token_type:
            body["issued_token_type"] = self.issued_token_type
        if self.refresh is not None:
            body["refresh_token"] = self.refresh.secret
            refresh_expiry = self.refresh.record.expires_at
            if refresh_expiry is not None:
                seconds = int((refresh_expiry - self.now).total_seconds())
                body["refresh_token_expires_in"] = max(0, seconds)
        return body


@dataclass(slots=True)
class Lifetimes:
    access_default: int = 900
    access_max: int = 3600
    refresh: int = 86400
    reuse_grace: int = 10


class TokenExchange:
    def __init__(
        self,
        tokens: TokenService,
        sessions: SessionStore,
        policies: PolicyStore,
        identity: IdentityVerifier,
        events: EventBus,
        lifetimes: Lifetimes,
    ) -> None:
        self.tokens = tokens
        self.sessions = sessions
        self.policies = policies
        self.identity = identity
        self.events = events
        self.lifetimes = lifetimes

    @property
    def verifier(self) -> Any:
        return self.tokens.verifier

    @property
    def dpop(self) -> DPoPChecker:
        checker: DPoPChecker = self.tokens.verifier.dpop
        return checker

    async def handle(self, req: TokenRequest) -> TokenResponse:
        if req.scope is not None:
            try:
                req.scope = validate_scopes(req.scope)
            except ScopeError as exc:
                raise oauth_error("invalid_scope", str(exc)) from None
            if not req.scope:
                req.scope = None
        if req.expires_in is not None and req.expires_in < 1:
            raise oauth_error("invalid_request", "expires_in must be a positive number of seconds")
        if req.requested_token_type not in (None, TYPE_ACCESS):
            raise oauth_error("invalid_request", "only access tokens can be requested")
        if req.grant_type == GRANT_REFRESH:
            if not req.refresh_token:
                raise oauth_error("invalid_request", "refresh_token is required")
            return await self.refresh(req)
        if req.grant_type != GRANT_EXCHANGE:
            raise oauth_error(
                "unsupported_grant_type",
                f"grant_type must be {GRANT_EXCHANGE} or {GRANT_REFRESH}",
            )
        if not req.subject_token or not req.subject_token_type:
            raise oauth_error(
                "invalid_request", "subject_token and subject_token_type are required"
            )
        if req.subject_token_type in TOKENWARD_TYPES:
            return await self.exchange_token(req)
        if req.subject_token_type in IDENTITY_TYPES:
            return await self.exchange_identity(req)
        raise oauth_error("invalid_request", "unsupported subject_token_type")

    # -- exchange a tokenward token -------------------------------------------------------
    async def exchange_token(self, req: TokenRequest) -> TokenResponse:
        assert req.subject_token is not None
        started = time.perf_counter()
        decision = await self.verifier.verify(req.subject_token, ip=req.client_ip, dpop=req.dpop)
        await self._access_event(decision, started, req.subject_token)
        if decision.reason == Reason.UNAVAILABLE:
            raise Unavailable("unavailable", "a dependency is unavailable; access denied")
        if not decision.allowed or decision.token is None:
            raise invalid_grant(f"the subject token is not valid: {decision.reason.value}")
        subject = decision.token
        if subject.kind not in (TokenKind.API_KEY, TokenKind.ACCESS):
            raise invalid_grant("only API keys and access tokens can be exchanged")
        if subject.remaining_uses is not None:
            raise invalid_grant("a token limited in uses cannot be exchanged")
        now = self.tokens.now
        jkt = subject.dpop_jkt or await self._proof_key(req, now)
        policy = await self._policy(subject.project_id)
        if policy.require_dpop and jkt is None:
            raise oauth_error("invalid_dpop_proof", "this project requires DPoP-bound tokens")
        scopes = self._narrow(req.scope, subject.scopes)
        expires_at = self._access_expiry(req, policy, now, None, subject.expires_at)
        family = subject.family_id if subject.kind == TokenKind.ACCESS else None
        family = family or new_public_id("fam")
        origin = subject.id
        if subject.kind == TokenKind.ACCESS:
            link = await self.tokens.store.grant_link(subject.id)
            origin = (link.origin_id if link else None) or subject.id
        access = await self._mint(
            subject, TokenKind.ACCESS, scopes, expires_at, family, jkt, origin
        )
        refresh = None
        if subject.kind == TokenKind.API_KEY:
            refresh_expiry = self._cap(now + timedelta(seconds=self.lifetimes.refresh), subject)
            refresh = await self._mint(
                subject, TokenKind.REFRESH, scopes, refresh_expiry, family, jkt, origin
            )
        await self._recheck_origin(subject, family, origin, req, now)
        return TokenResponse(access, refresh, now, TYPE_ACCESS)

    # -- exchange a CI identity token -----------------------------------------------------
    async def exchange_identity(self, req: TokenRequest) -> TokenResponse:
        assert req.subject_token is not None
        now = self.tokens.now
        started = time.perf_counter()
        try:
            trust, claims = await self.identity.verify(req.subject_token, now, req.audience)
        except BadRequest:
            await self._access_event(Decision(False, Reason.UNKNOWN), started, req.subject_token)
            raise
        jkt = await self._proof_key(req, now)
        policy = await self._policy(trust.project_id)
        if policy.require_dpop and jkt is None:
            raise oauth_error("invalid_dpop_proof", "this project requires DPoP-bound tokens")
        longest = max(trust.max_ttl, trust.refresh_ttl or 0)
        principal = str(claims.get(trust.principal_claim) or claims.get("sub") or trust.name)
        actor = TokenRecord(
            id=trust.id,
            project_id=trust.project_id,
            project=trust.project,
            environment=trust.environment,
            name=trust.name,
            kind=TokenKind.API_KEY.value,
            principal=principal[:128],
            scopes=list(trust.scopes),
            created_at=now,
            expires_at=now + timedelta(seconds=longest),
            metadata=_identity_metadata(trust.id, claims),
        )
        scopes = self._narrow(req.scope, trust.scopes)
        expires_at = self._access_expiry(req, policy, now, trust.max_ttl, None)
        family = new_public_id("fam")
        access = await self._mint(actor, TokenKind.ACCESS, scopes, expires_at, family, jkt, None)
        refresh = None
        if trust.refresh_ttl:
            refresh_expiry = now + timedelta(seconds=trust.refresh_ttl)
            refresh = await self._mint(
                actor, TokenKind.REFRESH, scopes, refresh_expiry, family, jkt, None
            )
        await self._access_event(Decision(True, Reason.OK, access.record), started)
        return TokenResponse(access, refresh, now, TYPE_ACCESS)

    # -- refresh --------------------------------------------------------------------------
    async def refresh(self, req: TokenRequest) -> TokenResponse:
        assert req.refresh_token is not None
        started = time.perf_counter()
        try:
            parse_token(req.refresh_token)
        except TokenFormatError:
            raise invalid_grant("the refresh token is malformed") from None
        hasher = self.tokens.hasher
        try:
            found = await self.tokens.store.find_by_hash(hasher.candidates(req.refresh_token))
        except OSError as exc:  # pragma: no cover - store errors surface as SQLAlchemy errors
            raise Unavailable("unavailable", "the token store is unavailable") from exc
        record = found[0] if found else None
        now = self.tokens.now
        if record is None or record.kind != TokenKind.REFRESH:
            await self._access_event(Decision(False, Reason.UNKNOWN), started, req.refresh_token)
            raise invalid_grant("the refresh token is not valid")
        state = record.state(now)
        if state in (TokenState.REVOKED, TokenState.EXPIRED):
            await self._access_event(Decision(False, Reason(state.value), record), started)
            raise invalid_grant(f"the refresh token is {state.value}")
        if record.ip_allowlist and not ip_allowed(
            req.client_ip, parse_networks(record.ip_allowlist)
        ):
            await self._access_event(Decision(False, Reason.IP_NOT_ALLOWED, record), started)
            raise invalid_grant("the refresh token may not be used from this address")
        if record.dpop_jkt is not None:
            try:
                await self.dpop.check(req.dpop, now=now, expected_jkt=record.dpop_jkt)
            except DPoPError as exc:
                await self._access_event(Decision(False, Reason(exc.reason), record), started)
                raise oauth_error("invalid_dpop_proof", exc.message) from None
        link = await self.tokens.store.grant_link(record.id)
        origin = link.origin_id if link else None
        problem = await self._origin_problem(origin, now)
        if problem is not None:
            await self._access_event(Decision(False, Reason(problem), record), started)
            await self._origin_gone(record, origin, problem, req, now)
            raise invalid_grant(f"the grant's origin is {problem}; its tokens are revoked")
        if record.replaced_by is None:
            try:
                new_refresh, _ = await self.tokens.rotate_token(
                    record, record.id, timedelta(seconds=self.lifetimes.reuse_grace)
                )
            except (Conflict, Invalid):
                # A concurrent refresh got there first: judge it as a second use.
                fresh = await self.tokens.store.get_token(record.id)
                assert fresh is not None
                record = fresh
            else:
                await self._access_event(Decision(True, Reason.OK, record), started)
                return await self._after_refresh(req, record, new_refresh, now, origin)
        if record.grace_until is not None and now < record.grace_until:
            # Within the grace a second use is taken for a race of the same client, not for
            # theft: the family lives on and no alarm is raised. But a spent refresh token
            # has exactly one successor, the one of its first use: nothing new is minted, so
            # racing presenters can never multiply the grant.
            await self._access_event(Decision(False, Reason.ALREADY_REFRESHED, record), started)
            raise invalid_grant(
                "the refresh token was used a moment ago; "
                "use the refresh token of that answer or exchange the credential again"
            )
        await self._access_event(Decision(False, Reason.ROTATED, record), started)
        await self._reuse_detected(record, req, now)
        raise invalid_grant("the refresh token was already used; its family is revoked")

    async def _after_refresh(
        self,
        req: TokenRequest,
        record: TokenRecord,
        new_refresh: Issued,
        now: datetime,
        origin: str | None,
    ) -> TokenResponse:
        policy = await self._policy(record.project_id)
        scopes = self._narrow(req.scope, record.scopes)
        expires_at = self._access_expiry(req, policy, now, None, record.expires_at)
        access = await self._mint(
            record, TokenKind.ACCESS, scopes, expires_at, record.family_id, record.dpop_jkt, origin
        )
        await self._recheck_origin(record, record.family_id, origin, req, now)
        return TokenResponse(access, new_refresh, now)

    async def _origin_problem(self, origin: str | None, now: datetime) -> str | None:
        """Why the grant's origin no longer backs it (a :class:`Reason` value), read from the
        store, not the cache; ``None`` while it is valid or the grant has no origin token."""
        if origin is None:
            return None
        record = await self.tokens.store.get_token(origin)
        if record is None:
            return Reason.UNKNOWN.value
        if record.quarantined_at is not None:
            return Reason.QUARANTINED.value
        if record.disabled_at is not None:
            return Reason.DISABLED.value
        state = record.state(now)
        if state in (TokenState.ACTIVE, TokenState.ROTATED_IN_GRACE):
            return None
        return state.value

    async def _recheck_origin(
        self,
        actor: TokenRecord,
        family: str | None,
        origin: str | None,
        req: TokenRequest,
        now: datetime,
    ) -> None:
        """After minting: a revocation of the origin that ran meanwhile may have missed the
        new tokens; then revoke their family here and refuse the grant."""
        problem = await self._origin_problem(origin, now)
        if problem is not None:
            await self._origin_gone(actor, origin, problem, req, now, family)
            raise invalid_grant(f"the grant's origin is {problem}; its tokens are revoked")

    async def _origin_gone(
        self,
        record: TokenRecord,
        origin: str | None,
        problem: str,
        req: TokenRequest,
        now: datetime,
        family: str | None = None,
    ) -> None:
        await self._revoke_family_audited(
            record,
            family or record.family_id,
            f"grant origin {problem}",
            now,
            actor_id=None,
            client_ip=req.client_ip,
            reason="origin_not_valid",
            origin=origin,
            origin_state=problem,
        )

    async def _revoke_family(self, family: str | None, reason: str, now: datetime) -> list[str]:
        """Revoke every live token of ``family`` on every replica; the ids revoked."""
        revoked = await self.sessions.revoke_family(family, reason, now) if family else []
        for token_id in revoked:
            self.verifier.invalidate(token_id)
            if self.tokens.on_change is not None:
                await self.tokens.on_change(token_id)
        return revoked

    async def _revoke_family_audited(
        self,
        record: TokenRecord,
        family: str | None,
        why: str,
        now: datetime,
        *,
        actor_id: str | None,
        client_ip: str | None,
        **detail: Any,
    ) -> list[str]:
        """Revoke ``family`` (see :meth:`_revoke_family`) and record one
        ``token.family_revoke`` event naming ``record``, with ``detail`` (its ``reason``)."""
        revoked = await self._revoke_family(family, why, now)
        ctx = current_request.get()
        await self.events.admin(
            AdminEvent(
                at=now,
                action="token.family_revoke",
                actor_id=actor_id,
                project_id=record.project_id,
                token_id=record.id,
                request_id=ctx.request_id if ctx else None,
                client_ip=client_ip,
                detail={"family_id": family, "revoked": revoked, **detail},
            )
        )
        return revoked

    async def revoke_grant(
        self, record: TokenRecord, *, actor_id: str | None, client_ip: str | None
    ) -> list[str]:
        """RFC 7009 §2.1: revoking a refresh token also revokes the access tokens of its
        grant, i.e. its whole family. Other tokens: nothing more to do."""
        if record.kind != TokenKind.REFRESH or not record.family_id:
            return []
        return await self._revoke_family_audited(
            record,
            record.family_id,
            "refresh token revoked",
            self.tokens.now,
            actor_id=actor_id,
            client_ip=client_ip,
            reason="refresh_token_revoked",
        )

    async def _reuse_detected(self, record: TokenRecord, req: TokenRequest, now: datetime) -> None:
        family = record.family_id
        revoked = await self._revoke_family_audited(
            record,
            family,
            "refresh token reuse detected",
            now,
            actor_id=None,
            client_ip=req.client_ip,
            reason="refresh_token_reuse",
        )
        await self.events.security(
            SecurityEvent(
                at=now,
                kind="refresh_token_reuse",
                severity="critical",
                project_id=record.project_id,
                token_id=record.id,
                client_ip=req.client_ip,
                evidence={
                    "family_id": family,
                    "replaced_by": record.replaced_by,
                    "first_used_at": _iso(record.grace_until, -self.lifetimes.reuse_grace),
                    "revoked_token_ids": revoked,
                    "principal": record.principal,
                },
            )
        )

    # -- helpers --------------------------------------------------------------------------
    async def _mint(
        self,
        actor: TokenRecord,
        kind: TokenKind,
        scopes: list[str],
        expires_at: datetime,
        family: str | None,
        jkt: str | None,
        origin: str | None,
    ) -> Issued:
        metadata = {**actor.metadata, "grant_from": actor.id}
        spec = TokenSpec(
            project=actor.project_id,
            scopes=scopes,
            environment=actor.environment,
            name=f"{kind.value} for {actor.name or actor.id}"[:128],
            kind=kind.value,
            principal=actor.principal,
            expires_at=expires_at,
            ip_allowlist=list(actor.ip_allowlist),
            rate_limit=list(actor.rate_limit),
            # The subject's rate limit carries over as one budget, not as a copy: every token
            # of the lineage counts on the subject's counter (its origin's, for a chain).
            rate_limit_key=actor.rate_limit_counter,
            identity_id=actor.identity_id,  # and the identity's limit still counts
            metadata={k: v for k, v in metadata.items() if k != "bootstrap"},
            family_id=family,
            dpop_jkt=jkt,
            grant=GrantLink(actor.id, origin),
        )
        try:
            return await self.tokens.create_token(actor, spec)
        except Forbidden as exc:
            raise oauth_error("invalid_scope", exc.message) from None
        except Invalid as exc:
            raise oauth_error("invalid_request", exc.message) from None

    async def _proof_key(self, req: TokenRequest, now: datetime) -> str | None:
        if req.dpop is None or req.dpop.proof is None:
            return None
        try:
            return await self.dpop.check(req.dpop, now=now)
        except DPoPError as exc:
            raise oauth_error("invalid_dpop_proof", exc.message) from None

    async def _policy(self, project_id: str | None) -> ProjectPolicy:
        return ProjectPolicy() if project_id is None else await self.policies.get(project_id)

    @staticmethod
    def _narrow(requested: list[str] | None, held: list[str]) -> list[str]:
        if requested is None:
            return list(held)
        if not is_narrower(requested, held):
            raise oauth_error("invalid_scope", "the requested scopes exceed those of the grant")
        return requested

    def _access_expiry(
        self,
        req: TokenRequest,
        policy: ProjectPolicy,
        now: datetime,
        grant_max: int | None,
        subject_expiry: datetime | None,
    ) -> datetime:
        longest = min(
            x
            for x in (self.lifetimes.access_max, policy.access_token_ttl, grant_max)
            if x is not None
        )
        if req.expires_in is not None and req.expires_in > longest:
            raise oauth_error(
                "invalid_request", f"the requested lifetime exceeds the allowed {longest} seconds"
            )
        seconds = req.expires_in or min(self.lifetimes.access_default, longest)
        expires_at = now + timedelta(seconds=seconds)
        return expires_at if subject_expiry is None else min(expires_at, subject_expiry)

    @staticmethod
    def _cap(expires_at: datetime, subject: TokenRecord) -> datetime:
        return expires_at if subject.expires_at is None else min(expires_at, subject.expires_at)

    async def _access_event(
        self, decision: Decision, started: float, credential: str | None = None
    ) -> None:
        ctx = current_request.get()
        fingerprint = None
        if decision.token is None and credential:
            with contextlib.suppress(Exception):
                fingerprint = self.tokens.hasher.fingerprint(credential)
        await self.events.access(
            AccessEvent(
                at=self.tokens.now,
                source="token_endpoint",
                decision=decision,
                request_id=ctx.request_id if ctx else new_request_id(),
                client_ip=ctx.client_ip if ctx else None,
                user_agent=ctx.user_agent if ctx else None,
                method="POST",
                path="/v1/token",
                latency_ms=(time.perf_counter() - started) * 1000,
                fingerprint=fingerprint,
            )
        )


def _identity_metadata(policy_id: str, claims: dict[str, Any]) -> dict[str, str]:
    meta = {"grant": "workload_identity", "trust_policy": policy_id}
    for name in ("iss", "sub", "repository", "ref", "workflow", "run_id", "job_workflow_ref"):
        value = claims.get(name)
        if isinstance(value, str | int) and not isinstance(value, bool):
            meta[f"oidc_{name}"] = str(value)[:512]
    return meta


def _iso(value: datetime | None, shift_seconds: int = 0) -> str | None:
    if value is None:
        return None
    return (value + timedelta(seconds=shift_seconds)).isoformat().replace("+00:00", "Z")
