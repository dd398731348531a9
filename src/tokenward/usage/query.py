"""Usage over a range: requests, allowed and denied by reason, per minute, hour or day.

Answers from the rollup's counts (:mod:`tokenward.usage.rollup`), never from the raw audit
events: minutes from ``usage_minutes``, hours and days from ``usage_hours``. One query,
grouped by bucket, decision and reason, on an index that starts with the filter (project,
token, or time alone), so its cost follows the range asked for, not the size of the log.

An answer holds at most :data:`MAX_BUCKETS` buckets (a day of minutes, two months of hours,
four years of days), every bucket of the range, empty ones too, in UTC.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from tokenward.errors import Invalid
from tokenward.store.tables import tokens
from tokenward.usage.tables import PROJECT_TOTAL, usage_hours, usage_minutes

Granularity = Literal["minute", "hour", "day"]
GRANULARITIES: dict[str, int] = {"minute": 60, "hour": 3600, "day": 86400}
MAX_BUCKETS = 1500
#: the range when only its end (or nothing) is given
DEFAULT_SPAN = {"minute": timedelta(hours=1), "hour": timedelta(hours=24), "day": timedelta(30)}


def identities_supported() -> bool:
    """Whether tokens have an owner identity (``tokens.identity_id``) in this schema."""
    return "identity_id" in tokens.c


@dataclass(slots=True)
class UsageFilter:
    """What to count; ``project_ids`` is the tenant boundary (``None``: every project)."""

    project_ids: Sequence[str] | None = None
    token_id: str | None = None
    identity_id: str | None = None


@dataclass(slots=True)
class Bucket:
    start: datetime
    allowed: int = 0
    denied: dict[str, int] = field(default_factory=dict)

    @property
    def denied_total(self) -> int:
        return sum(self.denied.values())

    @property
    def requests(self) -> int:
        return self.allowed + self.denied_total

    def public(self) -> dict[str, Any]:
        return {
            "start": _iso(self.start),
            "requests": self.requests,
            "allowed": self.allowed,
            "denied": self.denied_total,
            "denied_by_reason": dict(sorted(self.denied.items())),
        }


@dataclass(slots=True)
class UsageReport:
    granularity: str
    start: datetime
    end: datetime
    buckets: list[Bucket]

    @property
    def totals(self) -> Bucket:
        total = Bucket(self.start)
        for b in self.buckets:
            total.allowed += b.allowed
            for reason, n in b.denied.items():
                total.denied[reason] = total.denied.get(reason, 0) + n
        return total

    def public(self) -> dict[str, Any]:
        totals = self.totals.public()
        del totals["start"]
        return {
            "granularity": self.granularity,
            "from": _iso(self.start),
            "to": _iso(self.end),
            "totals": totals,
            "buckets": [b.public() for b in self.buckets],
        }


def _iso(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")


def _floor(at: datetime, step: int) -> int:
    return int(at.timestamp()) // step * step


def resolve_range(
    granularity: str, start: datetime | None, end: datetime | None, now: datetime
) -> tuple[datetime, datetime]:
    """The range ``[start, end)`` widened to whole buckets; checked and bounded. Without an
    ``end``, the range ends with the bucket that holds ``now``."""
    if granularity not in GRANULARITIES:
        raise Invalid("invalid_granularity", "granularity must be minute, hour or day")
    step = GRANULARITIES[granularity]
    if end is None:  # up to now, the current bucket included
        end = datetime.fromtimestamp(_floor(now, step) + step, UTC)
    start = start or end - DEFAULT_SPAN[granularity]
    if start.tzinfo is None or end.tzinfo is None:
        raise Invalid("invalid_time_range", "from and to need a time zone (e.g. Z)")
    if start >= end:
        raise Invalid("invalid_time_range", "from must be before to")
    lo = _floor(start, step)
    hi = -(-int(end.timestamp()) // step) * step  # ceil
    if (hi - lo) // step > MAX_BUCKETS:
        raise Invalid(
            "range_too_large",
            f"at most {MAX_BUCKETS} buckets per answer: narrow the range or use a coarser "
            "granularity",
        )
    return datetime.fromtimestamp(lo, UTC), datetime.fromtimestamp(hi, UTC)


async def usage(
    engine: AsyncEngine,
    filters: UsageFilter,
    granularity: str,
    start: datetime | None,
    end: datetime | None,
    now: datetime,
) -> UsageReport:
    lo_at, hi_at = resolve_range(granularity, start, end, now)
    step = GRANULARITIES[granularity]
    lo, hi = int(lo_at.timestamp()), int(hi_at.timestamp())
    if granularity == "minute":
        table, column, per = usage_minutes, usage_minutes.c.minute, 60
    else:
        table, column, per = usage_hours, usage_hours.c.hour, 3600
    # the bucket in units of the table (minutes or hours since 1970), grouped to the step
    ratio = step // per
    bucket: ColumnElement[Any] = column if ratio == 1 else (column // ratio)
    c = table.c
    query = select(bucket.label("b"), c.decision, c.reason, func.sum(c["count"]).label("n")).where(
        column >= lo // per, column < hi // per
    )
    if filters.project_ids is not None:
        query = query.where(c.project_id.in_(list(filters.project_ids)))
    if filters.identity_id is not None:
        if not identities_supported():
            raise Invalid("identities_unsupported", "this server has no identities")
        owned = select(tokens.c.id).where(tokens.c["identity_id"] == filters.identity_id)
        query = query.where(c.token_id.in_(owned))
    if filters.token_id is not None:
        query = query.where(c.token_id == filters.token_id)
    elif filters.identity_id is None:  # a project's (or every project's) totals
        query = query.where(c.token_id == PROJECT_TOTAL)
    query = query.group_by(bucket, c.decision, c.reason)
    async with engine.connect() as conn:
        rows = (await conn.execute(query)).all()
    buckets = [Bucket(datetime.fromtimestamp(t, UTC)) for t in range(lo, hi, step)]
    for row in rows:
        index = (int(row.b) * step - lo) // step
        if not 0 <= index < len(buckets):
            continue
        if row.decision == "allow":
            buckets[index].allowed += int(row.n)
        else:
            denied = buckets[index].denied
            reason = row.reason or "unknown"
            denied[reason] = denied.get(reason, 0) + int(row.n)
    return UsageReport(granularity, lo_at, hi_at, buckets)
