"""Human durations and rate limit strings."""

from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st
from limits import parse_many

from tokenward.tokens.durations import (
    MAX_DURATION,
    DurationError,
    format_duration,
    parse_duration,
    parse_rates,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30s", timedelta(seconds=30)),
        ("15m", timedelta(minutes=15)),
        ("12h", timedelta(hours=12)),
        ("90d", timedelta(days=90)),
        ("2w", timedelta(weeks=2)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        (" 1d12h ", timedelta(days=1, hours=12)),
        ("3660d", MAX_DURATION),
        ("0h1s", timedelta(seconds=1)),
    ],
)
def test_parse_duration_good(text, expected):
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "90",
        "d",
        "1.5h",
        "-1h",
        "1 h",
        "1H",
        "1y",
        "1h 30m",
        "abc",
        "1h\n2m",
        "1d\x00",
        "١٢d",  # non-ASCII digits
        "1s1s1s1s1s1s",  # more than five parts
        "9999999999s",
    ],
)
def test_parse_duration_bad(text):
    with pytest.raises(DurationError):
        parse_duration(text)


@pytest.mark.parametrize("text", ["0s", "0d", "0h0m", "0w0d0h0m0s"])
def test_parse_duration_zero(text):
    with pytest.raises(DurationError, match="longer than zero"):
        parse_duration(text)


@pytest.mark.parametrize("text", ["3661d", "523w", "3660d1s", "999999999w"])
def test_parse_duration_too_long(text):
    with pytest.raises(DurationError, match="at most"):
        parse_duration(text)


def test_parse_duration_rejects_non_strings():
    with pytest.raises(DurationError):
        parse_duration(90)  # type: ignore[arg-type]


@given(st.integers(1, int(MAX_DURATION.total_seconds())))
def test_format_duration_round_trips(seconds):
    delta = timedelta(seconds=seconds)
    assert parse_duration(format_duration(delta)) == delta


@given(st.text(max_size=20))
def test_parse_duration_never_raises_anything_else(text):
    try:
        result = parse_duration(text)
    except DurationError:
        return
    assert timedelta(0) < result <= MAX_DURATION


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("100/minute", ["100/minute"]),
        ("10/second;1000/hour", ["10/second", "1000/hour"]),
        ("10/second, 1000/hour", ["10/second", "1000/hour"]),
        ("5 per 2 minutes", ["5 per 2 minutes"]),
        ("1/day", ["1/day"]),
        ("3/years", ["3/years"]),
    ],
)
def test_parse_rates_good(text, expected):
    rates = parse_rates(text)
    assert rates == expected
    # What we accept, the rate limiter accepts too.
    assert all(parse_many(r) for r in rates)


@pytest.mark.parametrize(
    "text",
    [
        "",
        ";",
        "0/minute",
        "abc",
        "10/fortnight",
        "10",
        "/minute",
        "-1/minute",
        "1.5/minute",
        "10/minute;abc",
        "10/0 minute",  # a zero-length window
        "١٠/minute",  # non-ASCII digits the rate limiter cannot read
        "10\u00a0/minute",  # non-ASCII space
        "1/minute;" * 30,  # over 200 characters
    ],
)
def test_parse_rates_bad(text):
    with pytest.raises(DurationError):
        parse_rates(text)


def test_parse_rates_error_does_not_echo_the_value():
    secret = "tw_live_not-a-rate"
    with pytest.raises(DurationError) as info:
        parse_rates(secret)
    assert secret not in str(info.value)


@given(st.text(max_size=40))
def test_parse_rates_accepts_only_what_the_rate_limiter_understands(text):
    try:
        rates = parse_rates(text)
    except DurationError:
        return
    for rate in rates:
        items = parse_many(rate)
        assert items and all(item.amount > 0 and item.multiples > 0 for item in items)
