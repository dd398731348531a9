"""Webhook endpoints and deliveries in SQL (the same code on SQLite and PostgreSQL)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, delete, func, insert, or_, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from tokenward.errors import refuse_pasted_tokens
from tokenward.tokens.format import new_public_id
from tokenward.webhooks.tables import webhook_endpoints, webhook_messages

#: every event type an endpoint can subscribe to
EVENT_TYPES = (
    "token.created",
    "token.updated",
    "token.rotated",
    "token.revoked",
    "token.expiring",
    "token.leaked",
    "token.quarantined",
    "alert.raised",
)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value is not None else None


@dataclass(slots=True)
class Endpoint:
    id: str
    project_id: str | None
    url: str
    events: list[str]
    sealed_secret: str
    description: str
    created_at: datetime
    created_by: str | None

    def wants(self, event_type: str) -> bool:
        return "*" in self.events or event_type in self.events

    def public(self, project: str | None = None) -> dict[str, Any]:
        return {
            "id": self.id,
            "project_id": self.project_id,
            "project": project,
            "url": self.url,
            "events": self.events,
            "description": self.description,
            "created_at": _iso(self.created_at),
            "created_by": self.created_by,
        }


def _endpoint(row: Any) -> Endpoint:
    m = row._mapping
    return Endpoint(
        m["id"],
        m["project_id"],
        m["url"],
        list(m["events"]),
        m["secret"],
        m["description"],
        m["created_at"],
        m["created_by"],
    )


@dataclass(slots=True)
class Message:
    """One delivery: an event for one URL, with where it stands."""

    id: str
    endpoint_id: str | None
    project_id: str | None
    url: str
    sealed_secret: str | None
    type: str
    subject: str | None
    payload: dict[str, Any]
    status: str
    attempts: int
    created_at: datetime
    next_attempt_at: datetime | None
    last_attempt_at: datetime | None
    last_status: int | None
    last_error: str | None

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "endpoint_id": self.endpoint_id,
            "type": self.type,
            "subject": self.subject,
            "status": self.status,
            "attempts": self.attempts,
            "created_at": _iso(self.created_at),
            "next_attempt_at": _iso(self.next_attempt_at) if self.status == "pending" else None,
            "last_attempt_at": _iso(self.last_attempt_at),
            "last_status": self.last_status,
            "last_error": self.last_error,
        }


def _message(row: Any) -> Message:
    m = row._mapping
    return Message(
        m["id"],
        m["endpoint_id"],
        m["project_id"],
        m["url"],
        m["secret"],
        m["type"],
        m["subject"],
        dict(m["payload"]),
        m["status"],
        m["attempts"],
        m["created_at"],
        m["next_attempt_at"],
        m["last_attempt_at"],
        m["last_status"],
        m["last_error"],
    )


class WebhookStore:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    # -- endpoints ------------------------------------------------------------------------
    async def add_endpoint(self, endpoint: Endpoint) -> None:
        refuse_pasted_tokens(url=endpoint.url, description=endpoint.description)
        async with self.engine.begin() as conn:
            await conn.execute(
                insert(webhook_endpoints).values(
                    id=endpoint.id,
                    project_id=endpoint.project_id,
                    url=endpoint.url,
                    events=endpoint.events,
                    secret=endpoint.sealed_secret,
                    description=endpoint.description,
                    created_at=endpoint.created_at,
                    created_by=endpoint.created_by,
                )
            )

    async def get_endpoint(self, endpoint_id: str) -> Endpoint | None:
        query = select(webhook_endpoints).where(webhook_endpoints.c.id == endpoint_id)
        async with self.engine.connect() as conn:
            row = (await conn.execute(query)).first()
        return _endpoint(row) if row else None

    async def endpoints(self, project_ids: Sequence[str] | None) -> list[Endpoint]:
        """Endpoints of ``project_ids`` (``None``: all, the server-wide ones too)."""
        c = webhook_endpoints.c
        query = select(webhook_endpoints).order_by(c.created_at, c.id).limit(1000)
        if project_ids is not None:
            query = query.where(c.project_id.in_(list(project_ids)))
        async with self.engine.connect() as conn:
            return [_endpoint(r) for r in (await conn.execute(query)).all()]

    async def endpoints_for(self, project_id: str | None) -> list[Endpoint]:
        """The endpoints an event of ``project_id`` goes to: the project's and the
        server-wide ones."""
        c = webhook_endpoints.c
        where: ColumnElement[bool] = c.project_id.is_(None)
        if project_id is not None:
            where = or_(where, c.project_id == project_id)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(select(webhook_endpoints).where(where))).all()
        return [_endpoint(r) for r in rows]

    async def remove_endpoint(self, endpoint_id: str) -> bool:
        """Remove the endpoint; its pending deliveries are dropped, the log is kept."""
        async with self.engine.begin() as conn:
            gone = await conn.execute(
                delete(webhook_endpoints).where(webhook_endpoints.c.id == endpoint_id)
            )
            await conn.execute(
                update(webhook_messages)
                .where(
                    webhook_messages.c.endpoint_id == endpoint_id,
                    webhook_messages.c.status == "pending",
                )
                .values(status="dropped", last_error="endpoint removed")
            )
        return bool(gone.rowcount)

    # -- deliveries -----------------------------------------------------------------------
    async def pending_count(self, endpoint_id: str | None, url: str) -> int:
        c = webhook_messages.c
        target = c.endpoint_id == endpoint_id if endpoint_id else c.url == url
        query = select(func.count()).where(target, c.status == "pending")
        async with self.engine.connect() as conn:
            return int((await conn.execute(query)).scalar_one())

    async def add_messages(self, messages: Sequence[Message]) -> None:
        if not messages:
            return
        async with self.engine.begin() as conn:
            await conn.execute(
                insert(webhook_messages),
                [
                    {
                        "id": m.id,
                        "endpoint_id": m.endpoint_id,
                        "project_id": m.project_id,
                        "url": m.url[:2048],
                        "secret": m.sealed_secret,
                        "type": m.type,
                        "subject": m.subject,
                        "payload": m.payload,
                        "status": m.status,
                        "attempts": m.attempts,
                        "created_at": m.created_at,
                        "next_attempt_at": m.next_attempt_at,
                        "last_attempt_at": m.last_attempt_at,
                        "last_status": m.last_status,
                        "last_error": (m.last_error or "")[:300] or None,
                    }
                    for m in messages
                ],
            )

    async def claim_due(self, now: datetime, lease: timedelta, limit: int) -> list[Message]:
        """Deliveries due now, each leased to this replica (others skip them meanwhile)."""
        c = webhook_messages.c
        free = or_(c.lease_until.is_(None), c.lease_until < now)
        due = and_(c.status == "pending", c.next_attempt_at <= now, free)
        query = select(c.id).where(due).order_by(c.next_attempt_at).limit(limit)
        claimed: list[Message] = []
        async with self.engine.connect() as conn:
            ids = list((await conn.execute(query)).scalars())
        for message_id in ids:
            async with self.engine.begin() as conn:
                got = await conn.execute(
                    update(webhook_messages)
                    .where(c.id == message_id, due)
                    .values(lease_until=now + lease)
                )
                if got.rowcount == 1:
                    row = (
                        await conn.execute(select(webhook_messages).where(c.id == message_id))
                    ).one()
                    claimed.append(_message(row))
        return claimed

    async def record_attempt(
        self,
        message_id: str,
        *,
        at: datetime,
        attempts: int,
        status: str,
        next_attempt_at: datetime | None,
        last_status: int | None,
        last_error: str | None,
    ) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                update(webhook_messages)
                .where(webhook_messages.c.id == message_id)
                .values(
                    attempts=attempts,
                    status=status,
                    next_attempt_at=next_attempt_at,
                    lease_until=None,
                    last_attempt_at=at,
                    last_status=last_status,
                    last_error=(last_error or "")[:300] or None,
                )
            )

    async def messages(
        self,
        *,
        endpoint_id: str | None = None,
        subject: str | None = None,
        limit: int = 100,
    ) -> list[Message]:
        """Deliveries newest first (the log)."""
        c = webhook_messages.c
        query = select(webhook_messages).order_by(c.created_at.desc(), c.id.desc()).limit(limit)
        if endpoint_id is not None:
            query = query.where(c.endpoint_id == endpoint_id)
        if subject is not None:
            query = query.where(c.subject == subject)
        async with self.engine.connect() as conn:
            return [_message(r) for r in (await conn.execute(query)).all()]

    async def prune(self, before: datetime) -> int:
        """Forget finished deliveries created before ``before`` (the log's bound)."""
        c = webhook_messages.c
        async with self.engine.begin() as conn:
            result = await conn.execute(
                delete(webhook_messages).where(c.status != "pending", c.created_at < before)
            )
        return int(result.rowcount or 0)


def new_endpoint(
    project_id: str | None,
    url: str,
    events: list[str],
    sealed_secret: str,
    description: str,
    now: datetime,
    created_by: str | None,
) -> Endpoint:
    return Endpoint(
        new_public_id("whk"), project_id, url, events, sealed_secret, description, now, created_by
    )
