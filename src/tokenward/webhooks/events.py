"""Which events become webhooks: admin actions, security events, alerts.

An event sink on the bus (:class:`tokenward.events.EventBus`): each admin action with a
lifecycle meaning is queued for the endpoints of its project, by its webhook type. Alerts
come from anomaly handling (:meth:`WebhookEvents.alert`), ``token.expiring`` from the
expiry scan of the rotation scheduler (a security event ``token_expiring``, raised once per
token and warning period).
"""

from __future__ import annotations

from typing import Any

import structlog

from tokenward.events import AccessEvent, AdminEvent, SecurityEvent
from tokenward.webhooks.sender import WebhookSender

log = structlog.get_logger("tokenward.webhooks")

#: admin action → webhook type
ADMIN_TYPES = {
    "token.create": "token.created",
    "token.update": "token.updated",
    "token.rotate": "token.rotated",
    "token.revoke": "token.revoked",
    "token.cascade_revoke": "token.revoked",
    "token.family_revoke": "token.revoked",
    "token.quarantine": "token.quarantined",
    "token.leaked": "token.leaked",
}
#: security event kind → webhook type
SECURITY_TYPES = {"token_expiring": "token.expiring"}


def _iso(value: Any) -> Any:
    return value.isoformat().replace("+00:00", "Z") if hasattr(value, "isoformat") else value


class WebhookEvents:
    """Turns bus events into queued deliveries; never fails the action that raised them."""

    def __init__(self, sender: WebhookSender) -> None:
        self.sender = sender

    async def access(self, event: AccessEvent) -> None:
        return None

    async def admin(self, event: AdminEvent) -> None:
        event_type = ADMIN_TYPES.get(event.action)
        if event_type is None:
            return
        data = {
            "token_id": event.token_id,
            "project_id": event.project_id,
            "actor_id": event.actor_id,
            "request_id": event.request_id,
            "at": _iso(event.at),
            "detail": event.detail,
        }
        await self._enqueue(event_type, event.project_id, data, event.token_id)

    async def security(self, event: SecurityEvent) -> None:
        event_type = SECURITY_TYPES.get(event.kind)
        if event_type is None:
            return
        data = {
            "token_id": event.token_id,
            "project_id": event.project_id,
            "at": _iso(event.at),
            **event.evidence,
        }
        await self._enqueue(event_type, event.project_id, data, event.token_id)

    async def wanted(self, event_type: str, project_id: str | None) -> bool:
        """Whether any endpoint would receive ``event_type`` of ``project_id``."""
        endpoints = await self.sender.store.endpoints_for(project_id)
        return any(e.wants(event_type) for e in endpoints)

    async def alert(
        self, alert: dict[str, Any], project_id: str | None, also: list[tuple[str, str]]
    ) -> None:
        await self._enqueue("alert.raised", project_id, {"alert": alert}, alert["id"], also)

    async def _enqueue(
        self,
        event_type: str,
        project_id: str | None,
        data: dict[str, Any],
        subject: str | None,
        also: list[tuple[str, str]] | None = None,
    ) -> None:
        try:
            await self.sender.enqueue(event_type, project_id, data, subject=subject, also=also)
        except Exception as exc:  # a webhook must not undo or fail the action itself
            log.error("webhook_enqueue_failed", type=event_type, error=type(exc).__name__)
