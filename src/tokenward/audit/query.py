"""Reading the audit log: filters, cursor pagination, JSON-lines export.

:func:`list_events` is the read API of the audit log (the admin API, the CLI and the
dashboard use it); its signature is stable. Every writer appends to a chain of its own, so
the log is read in one order that merges them: ``(at, chain_id, seq)``, a total order (no
two events share a chain and a seq) that every index of the table ends with. A cursor is
that position, as text (``<at in µs since 1970>.<chain>.<seq>``): keyset pagination, stable
while events arrive.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from sqlalchemy import Select, literal, select, tuple_
from sqlalchemy.ext.asyncio import AsyncEngine

from tokenward.audit.records import iso
from tokenward.audit.tables import audit_events
from tokenward.errors import Invalid
from tokenward.store.tables import UTCDateTime

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

    @property
    def chain_id(self) -> str:
        return str(self.values["chain_id"])

    @property
    def cursor(self) -> str:
        """The event's place in the merged order, as a ``cursor`` takes it."""
        return make_cursor(self.values["at"], self.chain_id, self.seq)

    def public(self) -> dict[str, Any]:
        v = self.values
        latency = v.get("latency_us")
        return {
            "chain": v["chain_id"],
            "seq": self.seq,
            "cursor": self.cursor,
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


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_CURSOR = re.compile(r"(\d{1,18})\.([A-Za-z0-9-]{1,32})\.(\d{1,18})")

#: A position in the merged order: (at, chain_id, seq).
Position = tuple[datetime, str, int]


def make_cursor(at: datetime, chain_id: str, seq: int) -> str:
    return f"{(at - _EPOCH) // timedelta(microseconds=1)}.{chain_id}.{seq}"


def valid_cursor(text: str) -> bool:
    return text.isascii() and _CURSOR.fullmatch(text) is not None


def parse_cursor(cursor: str | None) -> Position | None:
    if cursor is None or cursor == "":
        return None
    match = _CURSOR.fullmatch(cursor) if cursor.isascii() else None
    if match is None:
        raise Invalid("invalid_cursor", "cursor must be a value returned as next_cursor")
    at = _EPOCH + timedelta(microseconds=int(match[1]))
    return at, match[2], int(match[3])


def _key() -> Any:
    c = audit_events.c
    return tuple_(c.at, c.chain_id, c.seq)


def _position(at: datetime, chain_id: str, seq: int) -> Any:
    return tuple_(literal(at, UTCDateTime()), literal(chain_id), literal(seq))


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
        query = query.order_by(c.at.desc(), c.chain_id.desc(), c.seq.desc())
        if after is not None:
            query = query.where(_key() < _position(*after))
    else:
        query = query.order_by(c.at.asc(), c.chain_id.asc(), c.seq.asc())
        if after is not None:
            query = query.where(_key() > _position(*after))
    query = query.limit(limit + 1)
    async with engine.connect() as conn:
        rows = (await conn.execute(query)).all()
    events = [AuditEvent(int(r.seq), dict(r._mapping)) for r in rows[:limit]]
    more = len(rows) > limit
    return AuditPage(events, events[-1].cursor if more and events else None)


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
