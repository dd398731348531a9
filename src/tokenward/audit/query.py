"""Reading the audit log: filters, cursor pagination, JSON-lines export.

:func:`list_events` is the read API of the audit log (the admin API, the CLI and the
dashboard use it); its signature is stable.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import Select, select
from sqlalchemy.ext.asyncio import AsyncEngine

from tokenward.audit.records import iso
from tokenward.audit.tables import audit_events
from tokenward.errors import Invalid

Order = Literal["desc", "asc"]


@dataclass(slots=True)
class AuditFilter:
    """Which events to return; every field narrows, ``None`` means "any".

    ``project_ids`` is the tenant boundary: a project-bound caller passes its own project
    and sees nothing else (not even events without a project).
    """

    project_ids: Sequence[str] | None = None
    token_id: str | None = None
    principal: str | None = None
    actor_id: str | None = None
    decision: str | None = None
    reason: str | None = None
    client_ip: str | None = None
    kind: str | None = None
    action: str | None = None
    request_id: str | None = None
    fingerprint: str | None = None
    since: datetime | None = None
    until: datetime | None = None


@dataclass(slots=True)
class AuditEvent:
    """One stored event, as the API shows it."""

    seq: int
    values: dict[str, Any]

    def public(self) -> dict[str, Any]:
        v = self.values
        latency = v.get("latency_us")
        return {
            "seq": self.seq,
            "id": v["id"],
            "at": iso(v["at"]),
            "kind": v["kind"],
            "source": v["source"],
            "action": v["action"],
            "request_id": v["request_id"],
            "project_id": v["project_id"],
            "environment": v["environment"],
            "actor_id": v["actor_id"],
            "token_id": v["token_id"],
            "principal": v["principal"],
            "method": v["method"],
            "resource": v["resource"],
            "scope": v["scope"],
            "decision": v["decision"],
            "reason": v["reason"],
            "client_ip": v["client_ip"],
            "user_agent": v["user_agent"],
            "latency_ms": None if latency is None else latency / 1000,
            "fingerprint": v["fingerprint"],
            "detail": v["detail"],
            "hash": v["hash"],
        }


@dataclass(slots=True)
class AuditPage:
    events: list[AuditEvent]
    #: pass as ``cursor`` to get the next page; ``None`` when this page is the last one
    next_cursor: str | None


def _where(query: Select[Any], f: AuditFilter) -> Select[Any]:
    c = audit_events.c
    if f.project_ids is not None:
        query = query.where(c.project_id.in_(list(f.project_ids)))
    exact = {
        "token_id": c.token_id,
        "principal": c.principal,
        "actor_id": c.actor_id,
        "decision": c.decision,
        "reason": c.reason,
        "client_ip": c.client_ip,
        "kind": c.kind,
        "action": c.action,
        "request_id": c.request_id,
        "fingerprint": c.fingerprint,
    }
    for name, column in exact.items():
        value = getattr(f, name)
        if value is not None:
            query = query.where(column == value)
    if f.since is not None:
        query = query.where(c.at >= f.since)
    if f.until is not None:
        query = query.where(c.at < f.until)
    return query


def parse_cursor(cursor: str | None) -> int | None:
    if cursor is None or cursor == "":
        return None
    if not (cursor.isascii() and cursor.isdigit()) or len(cursor) > 19 or int(cursor) >= 2**63:
        raise Invalid("invalid_cursor", "cursor must be a value returned as next_cursor")
    return int(cursor)


async def list_events(
    engine: AsyncEngine,
    filters: AuditFilter | None = None,
    *,
    limit: int = 100,
    cursor: str | None = None,
    order: Order = "desc",
) -> AuditPage:
    """Events matching ``filters``, newest first (``order="asc"``: oldest first).

    This is the read API of the audit log. ``cursor`` continues after the last event of
    the previous page (its ``next_cursor``); pages are stable while new events arrive.
    """
    if not 1 <= limit <= 1000:
        raise Invalid("invalid_limit", "limit must be between 1 and 1000")
    after = parse_cursor(cursor)
    c = audit_events.c
    query = _where(select(audit_events), filters or AuditFilter())
    if order == "desc":
        query = query.order_by(c.seq.desc())
        if after is not None:
            query = query.where(c.seq < after)
    else:
        query = query.order_by(c.seq.asc())
        if after is not None:
            query = query.where(c.seq > after)
    query = query.limit(limit + 1)
    async with engine.connect() as conn:
        rows = (await conn.execute(query)).all()
    events = [AuditEvent(int(r.seq), dict(r._mapping)) for r in rows[:limit]]
    more = len(rows) > limit
    return AuditPage(events, str(events[-1].seq) if more and events else None)


async def latest_seq(engine: AsyncEngine, filters: AuditFilter | None = None) -> int:
    """The newest event's ``seq`` (0 when there is none): where ``tail -f`` starts."""
    c = audit_events.c
    query = _where(select(c.seq), filters or AuditFilter()).order_by(c.seq.desc()).limit(1)
    async with engine.connect() as conn:
        value = (await conn.execute(query)).scalar()
    return int(value or 0)


async def export_jsonl(
    engine: AsyncEngine, filters: AuditFilter | None = None, *, page_size: int = 1000
) -> AsyncIterator[str]:
    """Every matching event, oldest first, one JSON object per line."""
    cursor: str | None = None
    while True:
        page = await list_events(engine, filters, limit=page_size, cursor=cursor, order="asc")
        for event in page.events:
            yield json.dumps(event.public(), separators=(",", ":")) + "\n"
        if page.next_cursor is None:
            return
        cursor = page.next_cursor
