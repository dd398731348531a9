"""Credits that refill: a token's remaining uses set back to an amount every hour, day or
month (on a day of the month), and what a request costs (no I/O here).

A refill *sets* the remaining uses to its amount (unused credits do not pile up). It happens
at the first spend after a period boundary: a token whose ``refilled_at`` is before the
start of the current period has ``amount`` credits, whatever its stored count says. The store
makes that read-and-set one conditional statement (see ``TokenStore.consume_use``), so the
refill is counted once however many replicas spend at the boundary.

Periods are in UTC. A monthly refill on day 31 happens on the last day of shorter months.
"""

from __future__ import annotations

import calendar
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

#: the largest remaining-uses count or refill amount (as for ``uses``)
MAX_CREDITS = 1_000_000_000
#: the largest cost of one request
MAX_COST = 1_000_000


class RefillInterval(StrEnum):
    HOUR = "hour"
    DAY = "day"
    MONTH = "month"


class CreditsError(ValueError):
    """A refill or cost that breaks a rule; the message never repeats the value."""


_REFILL = re.compile(r"^\s*([0-9]{1,10})\s*/\s*(hour|day|month)\s*$", re.ASCII)


@dataclass(frozen=True, slots=True)
class Refill:
    amount: int
    interval: RefillInterval
    #: the day of the month a monthly refill happens on (1 to 31); ``None`` otherwise
    day: int | None = None

    def public(self) -> dict[str, Any]:
        return {"amount": self.amount, "interval": self.interval.value, "day": self.day}

    def __str__(self) -> str:
        return f"{self.amount}/{self.interval.value}"


def parse_refill(text: str, day: int | None = None) -> Refill:
    """``"1000/month"`` (and a day of the month, default 1) → :class:`Refill`."""
    match = _REFILL.match(text) if isinstance(text, str) else None
    if match is None:
        raise CreditsError("refill must look like 1000/month, 100/day or 10/hour")
    amount = int(match.group(1))
    if not 1 <= amount <= MAX_CREDITS:
        raise CreditsError(f"a refill amount is 1 to {MAX_CREDITS}")
    interval = RefillInterval(match.group(2))
    if interval is RefillInterval.MONTH:
        day = 1 if day is None else day
        if not 1 <= day <= 31:
            raise CreditsError("refill_day is a day of the month, 1 to 31")
    elif day is not None:
        raise CreditsError("refill_day goes with a monthly refill only")
    return Refill(amount, interval, day)


def check_cost(cost: int) -> int:
    """A request's cost: 0 (checks that a credit is left, spends none) to :data:`MAX_COST`."""
    if isinstance(cost, bool) or not isinstance(cost, int) or not 0 <= cost <= MAX_COST:
        raise CreditsError(f"cost is an integer from 0 to {MAX_COST}")
    return cost


def period_start(refill: Refill, now: datetime) -> datetime:
    """The start of the refill period ``now`` is in (UTC, ``now``'s timezone kept)."""
    if refill.interval is RefillInterval.HOUR:
        return now.replace(minute=0, second=0, microsecond=0)
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if refill.interval is RefillInterval.DAY:
        return midnight
    day = refill.day or 1
    this_month = _on_day(midnight, midnight.year, midnight.month, day)
    if this_month <= now:
        return this_month
    year, month = (
        (midnight.year - 1, 12) if midnight.month == 1 else (midnight.year, midnight.month - 1)
    )
    return _on_day(midnight, year, month, day)


def next_refill(refill: Refill, now: datetime) -> datetime:
    """When the period after the current one starts (the next refill)."""
    start = period_start(refill, now)
    if refill.interval is RefillInterval.HOUR:
        return start + timedelta(hours=1)
    if refill.interval is RefillInterval.DAY:
        return start + timedelta(days=1)
    year, month = (start.year + 1, 1) if start.month == 12 else (start.year, start.month + 1)
    return _on_day(start, year, month, refill.day or 1)


def _on_day(midnight: datetime, year: int, month: int, day: int) -> datetime:
    return midnight.replace(
        year=year, month=month, day=min(day, calendar.monthrange(year, month)[1])
    )


def refill_due(refill: Refill | None, refilled_at: datetime | None, now: datetime) -> bool:
    """Whether a spend at ``now`` refills first (the last refill is before this period)."""
    if refill is None:
        return False
    return refilled_at is None or refilled_at < period_start(refill, now)


def available(
    remaining: int | None, refill: Refill | None, refilled_at: datetime | None, now: datetime
) -> int | None:
    """The credits a token has at ``now`` (``None``: unlimited)."""
    if remaining is None:
        return None
    return (
        refill.amount if refill is not None and refill_due(refill, refilled_at, now) else remaining
    )
