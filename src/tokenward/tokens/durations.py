"""Human durations (``90d``, ``1h30m``, ``15m``) and rate limit strings (``100/minute``)."""

from __future__ import annotations

import re
from datetime import timedelta

_PART = re.compile(r"(\d{1,9})([wdhms])", re.ASCII)
_WHOLE = re.compile(r"(?:\d{1,9}[wdhms]){1,5}", re.ASCII)
_UNITS = {"w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1}
MAX_DURATION = timedelta(days=3660)

_RATE = re.compile(
    r"^\s*(\d{1,9})\s*(?:/|\s+per\s+)\s*(\d{1,6}\s+)?"
    r"(second|minute|hour|day|month|year)s?\s*$",
    re.ASCII,  # ``\d`` and ``\s`` must not accept digits or spaces the rate limiter rejects
)


class DurationError(ValueError):
    pass


def parse_duration(text: str) -> timedelta:
    """``90d`` → 90 days. Units: w, d, h, m, s; parts may be combined (``1h30m``)."""
    if not isinstance(text, str) or not _WHOLE.fullmatch(text.strip()):
        raise DurationError(
            "duration must look like 30s, 15m, 12h, 90d or 2w (parts may be combined: 1h30m)"
        )
    seconds = sum(int(n) * _UNITS[u] for n, u in _PART.findall(text))
    if seconds <= 0:
        raise DurationError("duration must be longer than zero")
    if seconds > MAX_DURATION.total_seconds():
        raise DurationError("duration must be at most 3660 days")
    return timedelta(seconds=seconds)


def format_duration(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    out = []
    for unit, size in _UNITS.items():
        if unit == "w":
            continue
        n, seconds = divmod(seconds, size)
        if n:
            out.append(f"{n}{unit}")
    return "".join(out) or "0s"


def parse_rates(text: str) -> list[str]:
    """``"10/second;1000/hour"`` → ``["10/second", "1000/hour"]``, each checked."""
    if not isinstance(text, str) or len(text) > 200:
        raise DurationError("rate limit must be a string like 100/minute")
    parts = [p.strip() for p in re.split(r"[;,]", text) if p.strip()]
    if not parts:
        raise DurationError("rate limit must be a string like 100/minute")
    for part in parts:
        match = _RATE.match(part)
        if not match or int(match.group(1)) <= 0 or int(match.group(2) or 1) <= 0:
            raise DurationError(
                # The value is not echoed: error bodies never repeat what was sent.
                "each rate limit must look like 100/minute, 10/second or 1000/hour"
            )
    return parts
