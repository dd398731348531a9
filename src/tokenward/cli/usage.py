"""``tokenward usage``: requests, allowed and denied by reason, per minute, hour or day."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any

import typer
from rich.table import Table

from tokenward.cli.common import JsonOpt, add_row, call, client, emit_json, fail, out
from tokenward.tokens.durations import parse_duration


class Granularity(StrEnum):
    minute = "minute"
    hour = "hour"
    day = "day"


def usage(
    project: Annotated[str | None, typer.Option(help="Only this project.")] = None,
    token: Annotated[str | None, typer.Option(help="Only this token id.")] = None,
    identity: Annotated[str | None, typer.Option(help="Only this identity's tokens.")] = None,
    last: Annotated[
        str | None, typer.Option(help="The range ending now, e.g. 1h, 24h, 7d.")
    ] = None,
    since: Annotated[
        str | None, typer.Option("--from", help="Start, RFC 3339 (e.g. 2026-01-01T00:00:00Z).")
    ] = None,
    until: Annotated[str | None, typer.Option("--to", help="End, RFC 3339 (default: now).")] = None,
    granularity: Annotated[Granularity, typer.Option(help="Bucket size.")] = Granularity.hour,
    empty: Annotated[bool, typer.Option("--empty", help="Show buckets with no requests.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Requests per bucket: allowed, denied, and the top reasons for denial."""
    if last is not None and since is not None:
        fail("give --last or --from, not both", 2, as_json=as_json, error="usage_error")
    if last is not None:
        try:
            span = parse_duration(last)
        except ValueError as exc:
            fail(f"--last: {exc}", 2, as_json=as_json, error="usage_error")
        end = datetime.now(UTC)
        since = (end - span).isoformat()
    params: dict[str, Any] = {
        "project": project,
        "token": token,
        "identity": identity,
        "from_": since,
        "to": until,
        "granularity": granularity.value,
    }
    with client(as_json) as c:
        report = call(as_json, c.usage, **params)
    if as_json:
        emit_json(report)
        return
    clock = {"minute": 16, "hour": 16, "day": 10}[granularity.value]
    table = Table(box=None, pad_edge=False)
    table.add_column(granularity.value, no_wrap=True)
    for header in ("requests", "allowed", "denied"):
        table.add_column(header, justify="right", no_wrap=True)
    table.add_column("denied by reason", overflow="fold")
    for b in report["buckets"]:
        if b["requests"] or empty:
            add_row(
                table,
                b["start"][:clock].replace("T", " "),
                f"{b['requests']:,}",
                f"{b['allowed']:,}",
                f"{b['denied']:,}",
                _reasons(b["denied_by_reason"]),
            )
    t = report["totals"]
    table.add_section()
    add_row(
        table,
        "total",
        f"{t['requests']:,}",
        f"{t['allowed']:,}",
        f"{t['denied']:,}",
        _reasons(t["denied_by_reason"]),
    )
    out.print(table)


def _reasons(counts: dict[str, int], top: int = 3) -> str:
    ordered = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    text = ", ".join(f"{reason} {n:,}" for reason, n in ordered[:top])
    return text + (f", +{len(ordered) - top} more" if len(ordered) > top else "")
