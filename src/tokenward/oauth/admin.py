"""Admin operations of this package, with the same rules as :mod:`tokenward.service`.

Tenant isolation (a project-bound admin sees only its project, anything else is 404) and
"scopes only narrow" (a trust policy cannot grant a scope its creator lacks) hold here too.
"""

from __future__ import annotations

from datetime import timedelta

from tokenward.errors import Conflict, Forbidden, Invalid, NotFound
from tokenward.events import AdminEvent, EventBus, current_request
from tokenward.oauth.identity import check_issuer_url
from tokenward.oauth.policy import PolicyStore, ProjectPolicy
from tokenward.oauth.store import Rotation, SessionStore, TrustPolicy
from tokenward.sealing import Sealer
from tokenward.service import TokenService
from tokenward.tokens.format import new_public_id
from tokenward.tokens.model import TokenKind, TokenRecord, TokenState
from tokenward.tokens.scopes import is_narrower, validate_scopes
from tokenward.webhooks.signing import check_webhook_url, new_webhook_secret

MIN_PERIOD = timedelta(minutes=1)


class SessionAdmin:
    def __init__(
        self,
        tokens: TokenService,
        sessions: SessionStore,
        policies: PolicyStore,
        box: Sealer,
        events: EventBus,
    ) -> None:
        self.tokens = tokens
        self.sessions = sessions
        self.policies = policies
        self.box = box
        self.events = events

    # -- project policy -------------------------------------------------------------------
    async def get_policy(self, actor: TokenRecord, project: str) -> ProjectPolicy:
        found = await self.tokens.project_for(actor, project)
        return await self.policies.get(found.id)

    async def set_policy(
        self, actor: TokenRecord, project: str, policy: ProjectPolicy
    ) -> ProjectPolicy:
        found = await self.tokens.project_for(actor, project)
        await self.policies.set(found.id, policy)
        await self._audit("project.policy", actor, found.id, None, policy.public())
        return policy

    # -- trust policies -------------------------------------------------------------------
    async def add_trust_policy(
        self,
        actor: TokenRecord,
        project: str,
        *,
        name: str,
        issuer: str,
        audience: str,
        claims: dict[str, str],
        scopes: list[str],
        environment: str,
        principal_claim: str,
        max_ttl: timedelta,
        refresh_ttl: timedelta | None,
    ) -> TrustPolicy:
        found = await self.tokens.project_for(actor, project)
        try:
            check_issuer_url(issuer)
        except ValueError as exc:
            raise Invalid("invalid_issuer", str(exc)) from None
        scopes = validate_scopes(scopes)
        if not scopes:
            raise Invalid("invalid_scope", "a trust policy needs at least one scope")
        if not is_narrower(scopes, actor.scopes):
            raise Forbidden(
                "scope_not_held", "a trust policy cannot grant a scope its creator lacks"
            )
        if actor.environment == "test" and environment == "live":
            raise Forbidden("environment_not_held", "a test credential cannot grant live tokens")
        if not claims:
            raise Invalid(
                "claims_required",
                "name at least one required claim (e.g. repository), or any job of the "
                "issuer would be trusted",
            )
        policy = TrustPolicy(
            id=new_public_id("trp"),
            project_id=found.id,
            project=found.name,
            name=name,
            issuer=issuer,
            audience=audience,
            claims=dict(claims),
            scopes=scopes,
            environment=environment,
            principal_claim=principal_claim,
            max_ttl=int(max_ttl.total_seconds()),
            refresh_ttl=int(refresh_ttl.total_seconds()) if refresh_ttl else None,
            created_at=self.tokens.now,
            created_by=actor.id,
        )
        await self.sessions.add_trust_policy(policy)
        await self._audit("trust_policy.create", actor, found.id, None, policy.public())
        return policy

    async def list_trust_policies(
        self, actor: TokenRecord, project: str | None
    ) -> list[TrustPolicy]:
        if project is not None:
            ids: list[str] | None = [(await self.tokens.project_for(actor, project)).id]
        else:
            ids = None if actor.project_id is None else [actor.project_id]
        return await self.sessions.trust_policies(ids)

    async def remove_trust_policy(self, actor: TokenRecord, project: str, name: str) -> None:
        found = await self.tokens.project_for(actor, project)
        policy = await self.sessions.trust_policy(found.id, name)
        if policy is None:
            raise NotFound("trust_policy_not_found", f"no trust policy {name!r} in {project!r}")
        await self.sessions.remove_trust_policy(policy.id)
        await self._audit("trust_policy.remove", actor, found.id, None, {"id": policy.id})

    # -- rotation -------------------------------------------------------------------------
    async def set_rotation(
        self,
        actor: TokenRecord,
        token_id: str,
        *,
        period: timedelta,
        grace: timedelta,
        quiet: timedelta | None,
        webhook_url: str,
    ) -> tuple[Rotation, str]:
        """Rotate ``token_id`` every ``period``; the webhook signing secret is returned once."""
        token = await self.tokens.get_token(actor, token_id)
        now = self.tokens.now
        if token.kind != TokenKind.API_KEY:
            raise Conflict("token_not_rotatable", "only API keys rotate automatically")
        if token.state(now) not in (TokenState.ACTIVE, TokenState.NOT_YET_VALID):
            raise Conflict("token_not_rotatable", f"the token is {token.state(now)}")
        if period < MIN_PERIOD:
            raise Invalid("invalid_period", "the rotation period must be at least 1 minute")
        if grace < timedelta(0) or grace >= period:
            raise Invalid("invalid_grace", "the grace must be shorter than the period")
        try:
            check_webhook_url(webhook_url)
        except ValueError as exc:
            raise Invalid("invalid_webhook_url", str(exc)) from None
        secret = new_webhook_secret()
        due = max(token.created_at + period - grace, now)
        rotation = Rotation(
            token_id=token.id,
            grace=int(grace.total_seconds()),
            quiet=int(quiet.total_seconds()) if quiet else None,
            webhook_url=webhook_url,
            webhook_secret=self.box.seal(secret),
            due_at=due,
            previous_id=None,
            attempts=0,
            last_error=None,
        )
        await self.sessions.set_rotation(rotation, int(period.total_seconds()))
        self.tokens.verifier.invalidate(token.id)
        await self._audit(
            "token.rotation_set",
            actor,
            token.project_id,
            token.id,
            {"period": int(period.total_seconds()), **rotation.public()},
        )
        return rotation, secret

    async def get_rotation(self, actor: TokenRecord, token_id: str) -> Rotation:
        token = await self.tokens.get_token(actor, token_id)
        rotation = await self.sessions.get_rotation(token.id)
        if rotation is None:
            raise NotFound("rotation_not_found", "the token has no automatic rotation")
        return rotation

    async def remove_rotation(self, actor: TokenRecord, token_id: str) -> None:
        token = await self.get_rotation(actor, token_id)
        await self.sessions.remove_rotation(token.token_id)
        self.tokens.verifier.invalidate(token.token_id)
        await self._audit("token.rotation_remove", actor, None, token.token_id, {})

    # -- DPoP binding ---------------------------------------------------------------------
    async def bind_key(self, actor: TokenRecord, token_id: str, jkt: str) -> TokenRecord:
        """Bind a token to a DPoP key: from now on it works only with proofs by that key."""
        token = await self.tokens.get_token(actor, token_id)
        if token.dpop_jkt is not None and token.dpop_jkt != jkt:
            raise Conflict("already_bound", "the token is already bound to another key")
        await self.sessions.set_token_fields(token.id, dpop_jkt=jkt)
        self.tokens.verifier.invalidate(token.id)
        if self.tokens.on_change is not None:
            await self.tokens.on_change(token.id)
        await self._audit("token.bind_key", actor, token.project_id, token.id, {"jkt": jkt})
        return await self.tokens.get_token(actor, token_id)

    async def _audit(
        self,
        action: str,
        actor: TokenRecord,
        project_id: str | None,
        token_id: str | None,
        detail: dict[str, object],
    ) -> None:
        ctx = current_request.get()
        await self.events.admin(
            AdminEvent(
                at=self.tokens.now,
                action=action,
                actor_id=actor.id,
                project_id=project_id,
                token_id=token_id,
                request_id=ctx.request_id if ctx else None,
                client_ip=ctx.client_ip if ctx else None,
                detail=dict(detail),
            )
        )
