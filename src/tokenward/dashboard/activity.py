"""What the dashboard shows of events: recent access decisions, admin actions and alerts.

:class:`ActivitySource` is the small interface the pages read. :class:`RecentActivity`
implements it with a bounded in-process buffer fed by the event bus: enough for the pages on
one replica (the last ``capacity`` events since start). The durable, hash-chained audit log
implements the same interface for every replica and all history.
"""

from __future__ import annotations

import itertools
from collections import Counter, deque
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

from tokenward.events import AccessEvent, AdminEvent, SecurityEvent


@dataclass(slots=True)
class Entry:
    """One row of the activity feed (never holds a secret)."""

    seq: int
    at: datetime
    kind: str  # access | admin | security
    action: str  # access: the source (verify_api, authz…); admin: token.revoke…
    project_id: str | None = None
    token_id: str | None = None
    actor_id: str | None = None
    decision: str | None = None  # allow | deny (access only)
    reason: str | None = None
    severity: str | None = None  # security only
    client_ip: str | None = None
    request_id: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    def public(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "at": self.at.isoformat().replace("+00:00", "Z"),
            "kind": self.kind,
            "action": self.action,
            "project_id": self.project_id,
            "token_id": self.token_id,
            "actor_id": self.actor_id,
            "decision": self.decision,
            "reason": self.reason,
            "severity": self.severity,
            "client_ip": self.client_ip,
            "request_id": self.request_id,
            "detail": self.detail,
        }


@dataclass(slots=True)
class Query:
    project_ids: set[str] | None = None  # None: every project and global events
    token_id: str | None = None
    kind: str | None = None
    decision: str | None = None
    text: str | None = None
    after_seq: int | None = None
    before_seq: int | None = None
    limit: int = 50


@dataclass(slots=True)
class Bucket:
    start: datetime
    allowed: int = 0
    denied: Counter[str] = field(default_factory=Counter)

    @property
    def denied_total(self) -> int:
        return sum(self.denied.values())


class ActivitySource(Protocol):
    async def query(self, q: Query) -> list[Entry]:
        """Newest first."""
        ...

    async def buckets(
        self, q: Query, *, since: datetime, until: datetime, step: timedelta
    ) -> list[Bucket]:
        """Access decisions counted per ``step`` (allowed, denied by reason)."""
        ...


def _matches(entry: Entry, q: Query) -> bool:
    if q.project_ids is not None and entry.project_id not in q.project_ids:
        return False
    if q.token_id is not None and entry.token_id != q.token_id:
        return False
    if q.kind is not None and entry.kind != q.kind:
        return False
    if q.decision is not None and entry.decision != q.decision:
        return False
    if q.after_seq is not None and entry.seq <= q.after_seq:
        return False
    if q.before_seq is not None and entry.seq >= q.before_seq:
        return False
    if q.text:
        needle = q.text.lower()
        hay = " ".join(
            str(v)
            for v in (entry.action, entry.token_id, entry.reason, entry.client_ip, entry.actor_id)
            if v
        ).lower()
        if needle not in hay:
            return False
    return True


class RecentActivity:
    """An event-bus subscriber keeping the last ``capacity`` events in memory."""

    def __init__(self, capacity: int = 50_000) -> None:
        self._entries: deque[Entry] = deque(maxlen=capacity)
        self._seq = itertools.count(1)

    # -- EventSink ------------------------------------------------------------------------
    async def access(self, event: AccessEvent) -> None:
        token = event.decision.token
        self._entries.append(
            Entry(
                seq=next(self._seq),
                at=event.at,
                kind="access",
                action=event.source,
                project_id=token.project_id if token else None,
                token_id=token.id if token else None,
                decision="allow" if event.decision.allowed else "deny",
                reason=event.decision.reason.value,
                client_ip=event.client_ip,
                request_id=event.request_id,
                detail={
                    k: v
                    for k, v in (
                        ("scope", event.scope),
                        ("method", event.method),
                        ("path", event.path),
                        ("latency_ms", round(event.latency_ms, 2)),
                        ("fingerprint", event.fingerprint),
                    )
                    if v is not None
                },
            )
        )

    async def admin(self, event: AdminEvent) -> None:
        self._entries.append(
            Entry(
                seq=next(self._seq),
                at=event.at,
                kind="admin",
                action=event.action,
                project_id=event.project_id,
                token_id=event.token_id,
                actor_id=event.actor_id,
                client_ip=event.client_ip,
                request_id=event.request_id,
                detail=dict(event.detail),
            )
        )

    async def security(self, event: SecurityEvent) -> None:
        self._entries.append(
            Entry(
                seq=next(self._seq),
                at=event.at,
                kind="security",
                action=event.kind,
                project_id=event.project_id,
                token_id=event.token_id,
                severity=event.severity,
                client_ip=event.client_ip,
                detail=dict(event.evidence),
            )
        )

    # -- ActivitySource -------------------------------------------------------------------
    async def query(self, q: Query) -> list[Entry]:
        out: list[Entry] = []
        for entry in reversed(self._entries):
            if _matches(entry, q):
                out.append(entry)
                if len(out) >= q.limit:
                    break
        return out

    async def buckets(
        self, q: Query, *, since: datetime, until: datetime, step: timedelta
    ) -> list[Bucket]:
        count = max(1, int((until - since) / step))
        result = [Bucket(since + i * step) for i in range(count)]
        scoped = Query(project_ids=q.project_ids, token_id=q.token_id, kind="access")
        for entry in reversed(self._entries):
            if entry.at < since:
                break
            if not _matches(entry, scoped):
                continue
            index = int((entry.at - since) / step)
            if 0 <= index < count:
                bucket = result[index]
                if entry.decision == "allow":
                    bucket.allowed += 1
                else:
                    bucket.denied[entry.reason or "denied"] += 1
        return result
