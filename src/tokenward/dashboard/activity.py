"""What the dashboard reads of the audit log: feeds, the live tail and hourly counts.

The audit log (:mod:`tokenward.audit`) is the source: durable, shared by every replica,
hash-chained. This module adapts its read API to what pages need, and adds one aggregate the
charts want (access decisions per hour, allowed and denied by reason), computed in SQL.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from tokenward.audit.query import AuditEvent, AuditFilter, export_jsonl, list_events
from tokenward.audit.tables import audit_events

HOUR = timedelta(hours=1)
#: Seconds the live tail stays behind the present (see :meth:`Activity.query`).
TAIL_SETTLE = 1.0


@dataclass(slots=True)
class Entry:
    """One row of a feed (never holds a secret)."""

    seq: int
    cursor: str  # the entry's place in the merged order of the writers' chains
    at: datetime
    kind: str  # access | admin | security
    action: str
    project_id: str | None
    token_id: str | None
    actor_id: str | None
    decision: str | None
    reason: str | None
    client_ip: str | None
    request_id: str | None
    detail: dict[str, Any]

    @classmethod
    def of(cls, event: AuditEvent) -> Entry:
        v = event.values
        detail = dict(v["detail"] or {})
        for name in ("scope", "method", "resource", "principal"):
            if v.get(name):
                detail[name] = v[name]
        return cls(
            seq=event.seq,
            cursor=event.cursor,
            at=v["at"],
            kind=v["kind"],
            action=v["action"],
            project_id=v["project_id"],
            token_id=v["token_id"],
            actor_id=v["actor_id"],
            decision=v["decision"],
            reason=v["reason"],
            client_ip=v["client_ip"],
            request_id=v["request_id"],
            detail=detail,
        )

    @property
    def severity(self) -> str | None:
        value = self.detail.get("severity")
        return str(value) if value is not None else None

    def public(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "chain": self.cursor.split(".")[1],
            "cursor": self.cursor,
            "at": self.at.isoformat().replace("+00:00", "Z"),
            "kind": self.kind,
            "action": self.action,
            "project_id": self.project_id,
            "token_id": self.token_id,
            "actor_id": self.actor_id,
            "decision": self.decision,
            "reason": self.reason,
            "client_ip": self.client_ip,
            "request_id": self.request_id,
            "detail": self.detail,
        }


@dataclass(slots=True)
class Query:
    """A feed query. ``project_ids`` is the tenant boundary (``None``: everything)."""

    project_ids: Sequence[str] | None = None
    token_id: str | None = None
    kind: str | None = None
    decision: str | None = None
    reason: str | None = None
    client_ip: str | None = None
    actor_id: str | None = None
    before: str | None = None  # a cursor: entries older than it
    after: str | None = None  # a cursor: entries newer than it (the live tail)
    limit: int = 50

    def audit_filter(self) -> AuditFilter:
        return AuditFilter(
            project_ids=self.project_ids,
            token_id=self.token_id,
            kind=self.kind,
            decision=self.decision,
            reason=self.reason,
            client_ip=self.client_ip,
            actor_id=self.actor_id,
        )


@dataclass(slots=True)
class Bucket:
    start: datetime
    allowed: int = 0
    denied: Counter[str] = field(default_factory=Counter)

    @property
    def denied_total(self) -> int:
        return sum(self.denied.values())


class Activity:
    """Feeds and counts from the audit log in ``engine``."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    async def query(self, q: Query) -> list[Entry]:
        """Newest first; ``after`` (the live tail) returns what came after it, up to
        ``TAIL_SETTLE`` seconds ago: the writers commit their chains independently, and an
        event committed a moment after a newer one of another writer is not skipped."""
        if q.after is not None:
            filters = q.audit_filter()
            filters.until = datetime.now(UTC) - timedelta(seconds=TAIL_SETTLE)
            page = await list_events(
                self.engine, filters, limit=q.limit, cursor=q.after, order="asc"
            )
            return [Entry.of(e) for e in reversed(page.events)]
        page = await list_events(self.engine, q.audit_filter(), limit=q.limit, cursor=q.before)
        return [Entry.of(e) for e in page.events]

    def export(self, q: Query) -> AsyncIterator[str]:
        return export_jsonl(self.engine, q.audit_filter())

    async def hourly(self, q: Query, *, since: datetime, until: datetime) -> list[Bucket]:
        """Access decisions per hour from ``since`` (an hour boundary) to ``until``."""
        count = max(1, int((until - since) / HOUR) + 1)
        buckets = [Bucket(since + i * HOUR) for i in range(count)]
        c = audit_events.c
        if self.engine.dialect.name == "postgresql":
            hour: Any = func.date_trunc("hour", func.timezone("UTC", c.at))
        else:
            hour = func.strftime("%Y-%m-%d %H:00:00", c.at)
        query = (
            select(hour.label("hour"), c.decision, c.reason, func.count().label("n"))
            .where(c.kind == "access", c.at >= since, c.at < until + HOUR)
            .group_by(hour, c.decision, c.reason)
        )
        if q.project_ids is not None:
            query = query.where(c.project_id.in_(list(q.project_ids)))
        if q.token_id is not None:
            query = query.where(c.token_id == q.token_id)
        async with self.engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        for row in rows:
            start = row.hour if isinstance(row.hour, datetime) else datetime.fromisoformat(row.hour)
            index = int((start.replace(tzinfo=UTC) - since) / HOUR)
            if 0 <= index < count:
                if row.decision == "allow":
                    buckets[index].allowed += int(row.n)
                else:
                    buckets[index].denied[row.reason or "denied"] += int(row.n)
        return buckets
