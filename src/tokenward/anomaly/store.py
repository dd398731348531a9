"""Alerts, webhook deliveries, IP blocks, detector settings and learnt networks (SQL)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import and_, insert, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from tokenward.anomaly.tables import (
    alerts,
    anomaly_settings,
    ip_blocks,
    token_networks,
    webhook_deliveries,
)
from tokenward.errors import Invalid, refuse_pasted_tokens
from tokenward.tokens.format import new_public_id

GLOBAL = "*"


def _iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value is not None else None


@dataclass(slots=True)
class Alert:
    detector: str
    severity: str
    summary: str
    created_at: datetime
    id: str = field(default_factory=lambda: new_public_id("alt"))
    project_id: str | None = None
    token_id: str | None = None
    client_ip: str | None = None
    request_id: str | None = None
    evidence: dict[str, Any] = field(default_factory=dict)
    actions: list[str] = field(default_factory=list)
    acknowledged_at: datetime | None = None
    acknowledged_by: str | None = None
    ack_note: str | None = None

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "created_at": _iso(self.created_at),
            "project_id": self.project_id,
            "detector": self.detector,
            "severity": self.severity,
            "summary": self.summary,
            "token_id": self.token_id,
            "client_ip": self.client_ip,
            "request_id": self.request_id,
            "evidence": self.evidence,
            "actions": self.actions,
            "acknowledged_at": _iso(self.acknowledged_at),
            "acknowledged_by": self.acknowledged_by,
            "ack_note": self.ack_note,
        }


def _alert(row: Any) -> Alert:
    m = row._mapping
    return Alert(
        detector=m["detector"],
        severity=m["severity"],
        summary=m["summary"],
        created_at=m["created_at"],
        id=m["id"],
        project_id=m["project_id"],
        token_id=m["token_id"],
        client_ip=m["client_ip"],
        request_id=m["request_id"],
        evidence=dict(m["evidence"]),
        actions=list(m["actions"]),
        acknowledged_at=m["acknowledged_at"],
        acknowledged_by=m["acknowledged_by"],
        ack_note=m["ack_note"],
    )


@dataclass(slots=True)
class AlertFilter:
    project_ids: Sequence[str] | None = None
    detector: str | None = None
    severity: str | None = None
    token_id: str | None = None
    acknowledged: bool | None = None


@dataclass(slots=True)
class IPBlock:
    id: str
    network: str
    reason: str
    alert_id: str | None
    created_at: datetime
    expires_at: datetime
    lifted_at: datetime | None = None
    #: ``None``: refused everywhere; a project id: refused for that project's verifications
    project_id: str | None = None

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "network": self.network,
            "project_id": self.project_id,
            "reason": self.reason,
            "alert_id": self.alert_id,
            "created_at": _iso(self.created_at),
            "expires_at": _iso(self.expires_at),
            "lifted_at": _iso(self.lifted_at),
        }


def _cursor(alert: Alert) -> str:
    return f"{int(alert.created_at.timestamp() * 1_000_000)}.{alert.id}"


def _parse_cursor(cursor: str) -> tuple[datetime, str]:
    micros, _, alert_id = cursor.partition(".")
    digits = micros.isascii() and micros.isdigit() and len(micros) <= 16  # before year 2286
    if not digits or not alert_id.startswith("alt_") or len(cursor) > 64:
        raise Invalid("invalid_cursor", "cursor must be a value returned as next_cursor")
    return datetime.fromtimestamp(int(micros) / 1_000_000, UTC), alert_id


class AnomalyStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    # -- alerts ---------------------------------------------------------------------------
    async def insert_alert(self, alert: Alert) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                insert(alerts).values(
                    id=alert.id,
                    created_at=alert.created_at,
                    project_id=alert.project_id,
                    detector=alert.detector,
                    severity=alert.severity,
                    summary=alert.summary[:300],
                    token_id=alert.token_id,
                    client_ip=alert.client_ip,
                    request_id=alert.request_id,
                    evidence=alert.evidence,
                    actions=alert.actions,
                )
            )

    async def set_actions(self, alert_id: str, actions: list[str]) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                update(alerts).where(alerts.c.id == alert_id).values(actions=actions)
            )

    async def get_alert(self, alert_id: str) -> Alert | None:
        async with self.engine.connect() as conn:
            row = (await conn.execute(select(alerts).where(alerts.c.id == alert_id))).first()
        return _alert(row) if row else None

    async def list_alerts(
        self, filters: AlertFilter, *, limit: int = 100, cursor: str | None = None
    ) -> tuple[list[Alert], str | None]:
        """Alerts newest first, keyset-paginated; the second value is the next cursor."""
        c = alerts.c
        query = select(alerts).order_by(c.created_at.desc(), c.id.desc()).limit(limit + 1)
        if filters.project_ids is not None:
            query = query.where(c.project_id.in_(list(filters.project_ids)))
        for name in ("detector", "severity", "token_id"):
            value = getattr(filters, name)
            if value is not None:
                query = query.where(c[name] == value)
        if filters.acknowledged is True:
            query = query.where(c.acknowledged_at.is_not(None))
        elif filters.acknowledged is False:
            query = query.where(c.acknowledged_at.is_(None))
        if cursor:
            at, alert_id = _parse_cursor(cursor)
            query = query.where(or_(c.created_at < at, and_(c.created_at == at, c.id < alert_id)))
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        items = [_alert(r) for r in rows[:limit]]
        return items, (_cursor(items[-1]) if len(rows) > limit and items else None)

    async def acknowledge(self, alert_id: str, by: str, note: str, at: datetime) -> Alert | None:
        refuse_pasted_tokens(note=note)
        async with self.engine.begin() as conn:
            await conn.execute(
                update(alerts)
                .where(alerts.c.id == alert_id, alerts.c.acknowledged_at.is_(None))
                .values(acknowledged_at=at, acknowledged_by=by, ack_note=note[:300] or None)
            )
        return await self.get_alert(alert_id)

    # -- webhook deliveries ---------------------------------------------------------------
    async def deliveries(self, alert_id: str) -> list[dict[str, Any]]:
        """Deliveries logged by the alert webhooks before the one webhook sender (their
        history; new deliveries are in ``webhook_messages``, see :mod:`tokenward.webhooks`)."""
        c = webhook_deliveries.c
        query = select(webhook_deliveries).where(c.alert_id == alert_id).order_by(c.attempt)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        return [
            {
                "attempt": r.attempt,
                "at": _iso(r.at),
                "url": r.url,
                "status_code": r.status_code,
                "error": r.error,
                "delivered": bool(r.delivered),
            }
            for r in rows
        ]

    # -- IP blocks ------------------------------------------------------------------------
    async def add_block(
        self,
        network: str,
        reason: str,
        alert_id: str | None,
        now: datetime,
        until: datetime,
        *,
        project_id: str | None = None,
    ) -> IPBlock:
        refuse_pasted_tokens(reason=reason)
        block = IPBlock(
            new_public_id("blk"), network, reason[:300], alert_id, now, until, None, project_id
        )
        async with self.engine.begin() as conn:
            await conn.execute(
                insert(ip_blocks).values(
                    id=block.id,
                    network=network,
                    reason=block.reason,
                    alert_id=alert_id,
                    created_at=now,
                    expires_at=until,
                    project_id=project_id,
                )
            )
        return block

    async def blocks(self, now: datetime, *, active_only: bool = True) -> list[IPBlock]:
        c = ip_blocks.c
        query = select(ip_blocks).order_by(c.created_at.desc())
        if active_only:
            query = query.where(c.expires_at > now, c.lifted_at.is_(None))
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query.limit(10_000))).all()
        return [
            IPBlock(
                r.id,
                r.network,
                r.reason,
                r.alert_id,
                r.created_at,
                r.expires_at,
                r.lifted_at,
                r.project_id,
            )
            for r in rows
        ]

    async def lift_block(self, block_id: str, now: datetime) -> bool:
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(ip_blocks)
                .where(ip_blocks.c.id == block_id, ip_blocks.c.lifted_at.is_(None))
                .values(lifted_at=now)
            )
        return bool(result.rowcount)

    # -- settings -------------------------------------------------------------------------
    async def get_settings(self, scope: str) -> tuple[dict[str, Any], str | None]:
        query = select(anomaly_settings).where(anomaly_settings.c.scope == scope)
        async with self.engine.connect() as conn:
            row = (await conn.execute(query)).first()
        if row is None:
            return {}, None
        return dict(row.config), row.webhook_secret

    async def put_settings(
        self, scope: str, config: dict[str, Any], sealed_secret: str | None, now: datetime
    ) -> None:
        refuse_pasted_tokens(settings=config)  # a webhook URL above all
        values = {"config": config, "webhook_secret": sealed_secret, "updated_at": now}
        async with self.engine.begin() as conn:
            result = await conn.execute(
                update(anomaly_settings).where(anomaly_settings.c.scope == scope).values(**values)
            )
            if result.rowcount == 0:
                await conn.execute(insert(anomaly_settings).values(scope=scope, **values))

    # -- learnt networks ------------------------------------------------------------------
    async def networks(self, token_id: str) -> set[str]:
        query = select(token_networks.c.network).where(token_networks.c.token_id == token_id)
        async with self.engine.connect() as conn:
            return {r[0] for r in (await conn.execute(query)).all()}

    async def add_network(self, token_id: str, network: str, at: datetime) -> None:
        try:
            async with self.engine.begin() as conn:
                await conn.execute(
                    insert(token_networks).values(token_id=token_id, network=network, first_seen=at)
                )
        except IntegrityError:
            pass  # another replica learnt it first
