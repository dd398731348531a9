"""Refill periods and costs: the pure rules (UTC, months of every length)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from tokenward.tokens.credits import (
    CreditsError,
    Refill,
    RefillInterval,
    available,
    check_cost,
    next_refill,
    parse_refill,
    period_start,
    refill_due,
)


def at(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)  # type: ignore[misc]


def test_parse_refill():
    assert parse_refill("1000/month") == Refill(1000, RefillInterval.MONTH, 1)
    assert parse_refill("1000/month", 15) == Refill(1000, RefillInterval.MONTH, 15)
    assert parse_refill("50/day") == Refill(50, RefillInterval.DAY, None)
    assert parse_refill("5/hour") == Refill(5, RefillInterval.HOUR, None)


@pytest.mark.parametrize(
    ("text", "day"),
    [
        ("0/day", None),
        ("1000/week", None),
        ("1000", None),
        ("-1/day", None),
        ("99999999999/day", None),
        ("10/day", 3),
        ("10/month", 0),
        ("10/month", 32),
    ],
    ids=[
        "zero",
        "week",
        "no-interval",
        "negative",
        "too-many",
        "day-not-monthly",
        "day-0",
        "day-32",
    ],
)
def test_bad_refills_are_refused(text, day):
    with pytest.raises(CreditsError):
        parse_refill(text, day)


def test_periods_start_on_the_boundary():
    hourly, daily = parse_refill("1/hour"), parse_refill("1/day")
    assert period_start(hourly, at(2026, 3, 4, 10, 59, 59)) == at(2026, 3, 4, 10)
    assert period_start(hourly, at(2026, 3, 4, 11)) == at(2026, 3, 4, 11)
    assert period_start(daily, at(2026, 3, 4, 23, 59)) == at(2026, 3, 4)
    assert next_refill(daily, at(2026, 12, 31, 5)) == at(2027, 1, 1)


def test_a_monthly_refill_on_day_n():
    on_15th = parse_refill("1/month", 15)
    assert period_start(on_15th, at(2026, 3, 14, 23)) == at(2026, 2, 15)
    assert period_start(on_15th, at(2026, 3, 15)) == at(2026, 3, 15)
    assert period_start(on_15th, at(2026, 1, 3)) == at(2025, 12, 15)
    assert next_refill(on_15th, at(2026, 12, 20)) == at(2027, 1, 15)


def test_day_31_is_the_last_day_of_shorter_months():
    on_31st = parse_refill("1/month", 31)
    assert period_start(on_31st, at(2026, 2, 28, 1)) == at(2026, 2, 28)
    assert period_start(on_31st, at(2026, 2, 27)) == at(2026, 1, 31)
    assert period_start(on_31st, at(2028, 2, 29, 12)) == at(2028, 2, 29)  # leap year
    assert next_refill(on_31st, at(2026, 3, 31, 1)) == at(2026, 4, 30)


def test_available_counts_a_refill_that_is_due():
    daily = parse_refill("10/day")
    last = at(2026, 3, 4, 8)
    assert available(2, daily, last, at(2026, 3, 4, 23)) == 2
    assert available(2, daily, last, at(2026, 3, 5)) == 10
    assert refill_due(daily, None, at(2026, 3, 5))
    assert not refill_due(None, last, at(2027, 1, 1))
    assert available(None, None, None, at(2026, 3, 5)) is None


@pytest.mark.parametrize("cost", [-1, 1_000_001, True, 1.5, "3"], ids=str)
def test_bad_costs_are_refused(cost):
    with pytest.raises(CreditsError):
        check_cost(cost)


def test_costs():
    assert check_cost(0) == 0 and check_cost(5) == 5 and check_cost(1_000_000) == 1_000_000
