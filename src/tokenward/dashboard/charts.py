"""Charts as server-rendered SVG: no script, no library, styled by classes in app.css."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Protocol

from markupsafe import Markup, escape


class Bucket(Protocol):
    """What a bar shows: the dashboard's hourly counts and the usage report's buckets."""

    @property
    def start(self) -> datetime: ...

    @property
    def allowed(self) -> int: ...

    @property
    def denied(self) -> Mapping[str, int]: ...

    @property
    def denied_total(self) -> int: ...


#: Colour classes (app.css) for token states, in display order.
STATE_ORDER = ["active", "not_yet_valid", "rotated_in_grace", "expired", "rotated", "revoked"]


def _svg(width: int, height: int, label: str, body: str) -> Markup:
    # Every value interpolated into ``body`` is a number or passed through escape().
    return Markup(  # noqa: S704
        f'<svg class="chart" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{escape(label)}" preserveAspectRatio="none">'
        f"<title>{escape(label)}</title>{body}</svg>"
    )


def activity_bars(
    buckets: Sequence[Bucket], label: str, *, hours: bool = True, when_format: str | None = None
) -> Markup:
    """Stacked bars per bucket: allowed (bottom) and denied (top)."""
    width, height, top = 480, 120, 6
    n = max(len(buckets), 1)
    peak = max((b.allowed + b.denied_total for b in buckets), default=0) or 1
    slot = width / n
    bar = max(slot * 0.8, 1.0)
    parts: list[str] = [
        f'<line class="axis" x1="0" y1="{height - 0.5}" x2="{width}" y2="{height - 0.5}"/>'
    ]
    for i, b in enumerate(buckets):
        x = i * slot + (slot - bar) / 2
        allowed_h = (height - top) * b.allowed / peak
        denied_h = (height - top) * b.denied_total / peak
        when = b.start.strftime(when_format or ("%H:%M" if hours else "%d %b"))
        ordered = sorted(b.denied.items(), key=lambda rc: (-rc[1], rc[0]))
        reasons = ", ".join(f"{r} {c}" for r, c in ordered)
        tip = f"{when}: {b.allowed} allowed, {b.denied_total} denied" + (
            f" ({reasons})" if reasons else ""
        )
        parts.append(f"<g><title>{escape(tip)}</title>")
        if b.allowed:
            parts.append(
                f'<rect class="ok" x="{x:.1f}" y="{height - allowed_h:.1f}" '
                f'width="{bar:.1f}" height="{allowed_h:.1f}"/>'
            )
        if b.denied_total:
            parts.append(
                f'<rect class="bad" x="{x:.1f}" y="{height - allowed_h - denied_h:.1f}" '
                f'width="{bar:.1f}" height="{denied_h:.1f}"/>'
            )
        # an invisible full-height target so every bucket has a tooltip
        parts.append(
            f'<rect class="hit" x="{i * slot:.1f}" y="0" width="{slot:.1f}" height="{height}"/>'
        )
        parts.append("</g>")
    return _svg(width, height, label, "".join(parts))


def state_strip(counts: Mapping[str, int], label: str) -> Markup:
    """One horizontal bar split by token state."""
    width, height = 480, 16
    total = sum(counts.values())
    if total == 0:
        return _svg(
            width, height, label, f'<rect class="empty" width="{width}" height="{height}"/>'
        )
    parts, x = [], 0.0
    for state in STATE_ORDER:
        n = counts.get(state, 0)
        if not n:
            continue
        w = width * n / total
        parts.append(
            f'<rect class="st-{state}" x="{x:.1f}" y="0" width="{w:.1f}" height="{height}">'
            f"<title>{escape(state.replace('_', ' '))}: {n}</title></rect>"
        )
        x += w
    return _svg(width, height, label, "".join(parts))


def reason_bars(reasons: Counter[str], label: str) -> Markup:
    """Denials by reason, one labelled horizontal bar each."""
    rows = reasons.most_common(8)
    width, row_h = 480, 22
    height = max(row_h * len(rows), row_h)
    if not rows:
        return _svg(
            width,
            height,
            label,
            '<text class="muted" x="0" y="15">no denials in this period</text>',
        )
    peak = rows[0][1]
    parts = []
    for i, (reason, n) in enumerate(rows):
        y = i * row_h
        w = (width - 200) * n / peak
        parts.append(
            f'<text x="0" y="{y + 15}">{escape(reason)}</text>'
            f'<rect class="bad" x="150" y="{y + 4}" width="{max(w, 2):.1f}" height="14"/>'
            f'<text x="{156 + w:.1f}" y="{y + 15}">{n}</text>'
        )
    return _svg(width, height, label, "".join(parts))
