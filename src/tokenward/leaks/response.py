"""What the server does with a leaked token, whoever reports it (one implementation).

``tokenward scan --revoke`` (an admin, ``POST /v1/tokens/{id}/leaked``) and a secret-scanning
partner (``POST /v1/leaks``, :mod:`tokenward.leaks.partner`) both end in
:meth:`LeakResponder.respond`:

1. a live token (active, not yet valid, or rotated and still in its grace) is revoked or
   quarantined, as its project's policy says (``leak_action``, default ``revoke``); what is
   minted from it goes too (the service's cascade). A canary is left as it is: its use is
   what it is there to catch. A token already revoked, expired or rotated out is left alone;
2. an alert is raised: ``critical`` for a token that worked until now, ``warning`` for one
   that no longer did (a canary's is ``critical`` too), with the public URL as evidence;
3. an ``AdminEvent`` ``token.leaked`` goes through the event bus (the audit chain; lifecycle
   webhooks map it to their ``token.leaked`` type).

The secret is never kept: only the token's id, hint and the place it was seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from tokenward.anomaly.config import Action
from tokenward.anomaly.detectors import Finding
from tokenward.oauth.policy import PolicyStore
from tokenward.tokens.format import TokenFormatError, parse_token, redact_tokens, token_hint
from tokenward.tokens.model import TokenKind, TokenRecord, TokenState

if TYPE_CHECKING:
    from tokenward.anomaly.engine import AnomalyEngine
    from tokenward.service import TokenService

#: the alert's detector name (and the event's action)
DETECTOR = "token_leaked"
ACTION = "token.leaked"
#: states in which a token still works: a leak of one of these is acted on
LIVE = frozenset({TokenState.ACTIVE, TokenState.NOT_YET_VALID, TokenState.ROTATED_IN_GRACE})
#: how much of a reported place is kept (a URL, a file:line)
MAX_LOCATION = 1000
#: the actor of what a partner's report does (audited under this id)
SYSTEM_ACTOR_ID = "system:leaks"
#: what a lookup tells of a token found (all ``None`` for one not found)
_FIELDS = ("id", "project", "name", "kind", "state", "quarantined")


@dataclass(frozen=True, slots=True)
class LeakOutcome:
    token: TokenRecord
    #: ``revoked``, ``quarantined``, or ``none`` (canary, already dead, already quarantined)
    action: str
    alert_id: str | None


def system_actor(now: datetime) -> TokenRecord:
    """The actor of a partner's report: no credential, so no project and every scope."""
    return TokenRecord(
        id=SYSTEM_ACTOR_ID,
        project_id=None,
        project=None,
        environment="live",
        name="leak reports",
        kind=TokenKind.API_KEY.value,
        principal=SYSTEM_ACTOR_ID,
        scopes=["*"],
        created_at=now,
    )


def clean_location(text: str) -> str:
    """A reported place as it may be stored and shown: no token in it, bounded."""
    return redact_tokens(text)[:MAX_LOCATION]


class LeakResponder:
    def __init__(self, tokens: TokenService, anomaly: AnomalyEngine | None) -> None:
        self.tokens = tokens
        self.anomaly = anomaly
        self.policies = PolicyStore(tokens.store)

    async def find(self, secret: str) -> TokenRecord | None:
        """The token ``secret`` is, when it is well-formed (checksum) and known."""
        try:
            parse_token(secret)
        except TokenFormatError:
            return None
        found = await self.tokens.store.find_by_hash(self.tokens.hasher.candidates(secret))
        return found[0] if found is not None else None

    async def lookup(self, actor: TokenRecord, secrets: list[str]) -> list[dict[str, Any]]:
        """What ``actor`` may know of each secret, in order; a token of a project the actor
        cannot see is "not found", as everywhere (tenant isolation)."""
        now = self.tokens.now
        answers: list[dict[str, Any]] = []
        for secret in secrets:
            record = await self.find(secret)
            if record is not None and actor.project_id not in (None, record.project_id):
                record = None
            if record is None:
                hint = token_hint(secret) if _well_formed(secret) else None
                answers.append({"found": False, "hint": hint, **dict.fromkeys(_FIELDS)})
                continue
            answers.append(
                {
                    "found": True,
                    "hint": record.hint,
                    "id": record.id,
                    "project": record.project,
                    "name": record.name,
                    "kind": record.kind,
                    "state": record.state(now).value,
                    "quarantined": record.quarantined_at is not None,
                }
            )
        return answers

    async def respond(
        self,
        actor: TokenRecord,
        record: TokenRecord,
        *,
        location: str,
        reporter: str,
        source: str | None = None,
        secret_type: str | None = None,
    ) -> LeakOutcome:
        """Act on one confirmed leak (see the module doc)."""
        now = self.tokens.now
        location = clean_location(location)
        state = record.state(now)
        live = state in LIVE and record.kind != TokenKind.CANARY
        action = "none"
        reason = f"leaked ({reporter}): {location}"[:200]
        if live:
            policy = await self.policies.get(record.project_id) if record.project_id else None
            if policy is not None and policy.leak_action == "quarantine":
                if record.quarantined_at is None:
                    record = await self.tokens.quarantine_token(actor, record.id, reason)
                    action = "quarantined"
            else:
                record = await self.tokens.revoke_token(actor, record.id, reason)
                action = "revoked"
        detail: dict[str, object] = {
            "location": location,
            "reporter": reporter,
            "action": action,
            "state": state.value,
        }
        if source:
            detail["source"] = source[:64]
        if secret_type:
            detail["type"] = secret_type[:64]
        await self.tokens.record_action(ACTION, actor, record.project_id, record.id, detail)
        alert_id = await self._alert(record, live or record.kind == TokenKind.CANARY, detail)
        return LeakOutcome(record, action, alert_id)

    async def _alert(
        self, record: TokenRecord, critical: bool, detail: dict[str, object]
    ) -> str | None:
        if self.anomaly is None:
            return None
        location = str(detail["location"])
        what = "canary token" if record.kind == TokenKind.CANARY else "token"
        finding = Finding(
            DETECTOR,
            "critical" if critical else "warning",
            f"{record.id}:{location}",  # one alert per token and place
            f"{what} {record.id} ({record.hint}) leaked: {location}"[:300],
            [Action.ALERT, Action.WEBHOOK],
            0,
            project_id=record.project_id,
            token_id=record.id,
            evidence=dict(detail),
        )
        settings = await self.anomaly.resolved(record.project_id)
        alert = await self.anomaly.respond(finding, settings, self.tokens.now)
        return alert.id if alert is not None else None


def _well_formed(secret: str) -> bool:
    try:
        parse_token(secret)
    except TokenFormatError:
        return False
    return True
