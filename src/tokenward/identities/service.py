"""Admin operations on identities, with the rules of :mod:`tokenward.service`: an actor sees
only its own project's identities (others look like they do not exist), every change that a
verification reads is dropped from every replica's cache before it is acknowledged, and
every change is audited."""

from __future__ import annotations

from dataclasses import dataclass

from tokenward.errors import Invalid, NotFound, refuse_pasted_tokens
from tokenward.identities.model import Identity, valid_external_id
from tokenward.identities.store import IdentityStore
from tokenward.service import TokenService
from tokenward.tokens.durations import DurationError, parse_rates
from tokenward.tokens.model import TokenRecord
from tokenward.verify import identity_message

#: most metadata entries of an identity (as for a token)
MAX_METADATA = 32


@dataclass(slots=True)
class IdentityChanges:
    """What to change on an identity (``None``: leave as is; ``""`` clears the rate limit)."""

    metadata: dict[str, str] | None = None
    rate_limit: str | None = None


def _rates(text: str | None) -> list[str]:
    if not text:
        return []
    try:
        return parse_rates(text)
    except DurationError as exc:
        raise Invalid("invalid_rate_limit", str(exc)) from None


def _metadata(values: dict[str, str]) -> dict[str, str]:
    if len(values) > MAX_METADATA:
        raise Invalid("invalid_metadata", f"at most {MAX_METADATA} metadata entries")
    refuse_pasted_tokens(metadata=" ".join(f"{k} {v}" for k, v in values.items()))
    return dict(values)


class IdentityService:
    def __init__(self, store: IdentityStore, tokens: TokenService) -> None:
        self.store = store
        self.tokens = tokens

    async def create(
        self,
        actor: TokenRecord,
        project: str,
        external_id: str,
        *,
        metadata: dict[str, str] | None = None,
        rate_limit: str | None = None,
    ) -> Identity:
        refuse_pasted_tokens(external_id=external_id)
        if not valid_external_id(external_id):
            raise Invalid(
                "invalid_external_id",
                "an external id is 1 to 128 letters, digits and . _ @ : + - (a letter or "
                "digit first)",
            )
        found = await self.tokens.project_for(actor, project)
        identity = await self.store.create(
            found.id, external_id, _metadata(metadata or {}), _rates(rate_limit), self.tokens.now
        )
        await self.tokens.record_action(
            "identity.create",
            actor,
            found.id,
            None,
            {"identity": identity.id, "external_id": external_id},
        )
        return identity

    async def get(self, actor: TokenRecord, project: str, external_id: str) -> Identity:
        found = await self.tokens.project_for(actor, project)
        identity = await self.store.get(found.id, external_id)
        if identity is None:
            raise NotFound("identity_not_found", "no identity with this external id")
        return identity

    async def list_identities(
        self, actor: TokenRecord, project: str, *, limit: int = 100, after: str | None = None
    ) -> list[Identity]:
        found = await self.tokens.project_for(actor, project)
        return await self.store.list_identities(found.id, limit=limit, after=after)

    async def update(
        self, actor: TokenRecord, project: str, external_id: str, changes: IdentityChanges
    ) -> Identity:
        """Change metadata or the rate limit; effective on every replica at once."""
        identity = await self.get(actor, project, external_id)
        values: dict[str, object] = {}
        if changes.metadata is not None:
            values["metadata"] = _metadata(changes.metadata)
        if changes.rate_limit is not None:
            values["rate_limit"] = _rates(changes.rate_limit)
        if not values:
            return identity
        updated = await self.store.update(identity.id, values, self.tokens.now)
        await self._changed(identity.id)
        await self.tokens.record_action(
            "identity.update",
            actor,
            identity.project_id,
            None,
            {"identity": identity.id, "changed": sorted(values)},
        )
        return updated

    async def delete(
        self, actor: TokenRecord, project: str, external_id: str, *, confirm: bool
    ) -> list[str]:
        """Delete an identity and revoke every one of its tokens; the ids revoked.

        ``confirm`` must be true: the revocations cannot be undone.
        """
        if not confirm:
            raise Invalid(
                "confirmation_required",
                "deleting an identity revokes all its tokens: confirm it (confirm=true)",
            )
        identity = await self.get(actor, project, external_id)
        reason = f"identity deleted ({identity.external_id})"
        revoked = await self.store.delete(identity.id, reason, self.tokens.now)
        await self._changed(identity.id)
        await self.tokens.record_action(
            "identity.delete",
            actor,
            identity.project_id,
            None,
            {"identity": identity.id, "external_id": identity.external_id, "revoked": revoked},
        )
        return revoked

    async def _changed(self, identity_id: str) -> None:
        """Every cached token of the identity is dropped here and, with one fan-out message,
        on every other replica."""
        self.tokens.verifier.invalidate_identity(identity_id)
        if self.tokens.on_change is not None:
            await self.tokens.on_change(identity_message(identity_id))
