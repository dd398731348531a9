"""Per-project policy, kept in the project's ``settings``.

* ``max_token_lifetime``: no token of the project may live longer (seconds). A token created
  without an expiry gets this one; a longer request is refused; a rotation is clamped.
* ``access_token_ttl``: the longest life of an access token from the token endpoint.
* ``require_dpop``: every access token of the project must be DPoP-bound.
* ``expiry_warning_days``: warn this many days before a long-lived token expires.
* ``leak_action``: what a confirmed leak does to a live token (``tokenward scan --revoke``,
  ``POST /v1/leaks``): ``revoke`` (the default: a public secret is spent) or ``quarantine``
  (suspended, reversibly, for a team that wants to look first). See docs/leaks.md.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from tokenward.errors import Invalid
from tokenward.store.repository import TokenStore
from tokenward.tokens.durations import format_duration

POLICY_KEY = "policy"
#: the values of ``leak_action``
LEAK_ACTIONS = ("revoke", "quarantine")


@dataclass(slots=True)
class ProjectPolicy:
    max_token_lifetime: int | None = None
    access_token_ttl: int | None = None
    require_dpop: bool = False
    expiry_warning_days: int | None = None
    leak_action: str = "revoke"

    def public(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> ProjectPolicy:
        raw = settings.get(POLICY_KEY) or {}
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})


class PolicyStore:
    """Reads and writes project policies, and enforces the lifetime cap for TokenService."""

    def __init__(self, store: TokenStore) -> None:
        self.store = store

    async def get(self, project_id: str) -> ProjectPolicy:
        return ProjectPolicy.from_settings(await self.store.project_settings(project_id))

    async def set(self, project_id: str, policy: ProjectPolicy) -> None:
        settings = await self.store.project_settings(project_id)
        settings[POLICY_KEY] = policy.public()
        await self.store.set_project_settings(project_id, settings)

    async def cap_lifetime(
        self, project_id: str, expires_at: datetime | None, now: datetime, clamp: bool
    ) -> datetime | None:
        """The expiry allowed by the project's ``max_token_lifetime`` (see module doc)."""
        cap = (await self.get(project_id)).max_token_lifetime
        if cap is None:
            return expires_at
        latest = now + timedelta(seconds=cap)
        if expires_at is None or (clamp and expires_at > latest):
            return latest
        if expires_at > latest:
            raise Invalid(
                "lifetime_exceeds_policy",
                f"the project's policy allows tokens to live at most {_human(cap)}",
            )
        return expires_at


def _human(seconds: int) -> str:
    if seconds % 86400 == 0:
        days = seconds // 86400
        return f"{days} day" if days == 1 else f"{days} days"
    return format_duration(timedelta(seconds=seconds))
