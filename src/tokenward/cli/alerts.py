"""``tokenward alerts …``: anomaly alerts: list, show, acknowledge."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import typer
from rich.table import Table
from rich.text import Text

from tokenward.cli.audit import Project
from tokenward.cli.common import (
    JsonOpt,
    add_row,
    call,
    client,
    emit_json,
    emit_record,
    id_column,
    out,
)

alerts_app = typer.Typer(help="Anomaly alerts.", no_args_is_help=True)


@alerts_app.command("list")
def alerts_list(
    project: Project = None,
    detector: Annotated[str | None, typer.Option(help="e.g. brute_force, canary.")] = None,
    severity: Annotated[
        Literal["info", "warning", "critical"] | None, typer.Option(help="Only this severity.")
    ] = None,
    open_only: Annotated[bool, typer.Option("--open", help="Only unacknowledged.")] = False,
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 50,
    as_json: JsonOpt = False,
) -> None:
    """Alerts, newest first."""
    params: dict[str, Any] = {
        "project": project,
        "detector": detector,
        "severity": severity,
        "limit": limit,
    }
    if open_only:
        params["acknowledged"] = "false"
    with client(as_json) as c:
        page = call(as_json, c.alerts_page, **params)
    if as_json:
        emit_json(page)
        return
    table = Table()
    id_column(table)
    for header in ("at", "severity", "detector", "summary", "actions", "ack"):
        table.add_column(header, overflow="fold")
    for a in page["alerts"]:
        add_row(
            table,
            a["id"],
            a["created_at"][:19],
            a["severity"],
            a["detector"],
            a["summary"],
            " ".join(a["actions"]),
            a["acknowledged_by"] or "",
        )
    out.print(table)


@alerts_app.command("show")
def alerts_show(alert_id: str, as_json: JsonOpt = False) -> None:
    """One alert with its evidence and webhook deliveries."""
    with client(as_json) as c:
        body = call(as_json, c.get_alert, alert_id)
    emit_record(body, as_json)


@alerts_app.command("ack")
def alerts_ack(
    alert_id: str,
    note: Annotated[str, typer.Option(help="Why it is handled.")] = "",
    as_json: JsonOpt = False,
) -> None:
    """Acknowledge an alert."""
    with client(as_json) as c:
        body = call(as_json, c.ack_alert, alert_id, note)
    if as_json:
        emit_json(body)
    else:
        out.print(Text(f"acknowledged {body['id']} by {body['acknowledged_by']}"))
