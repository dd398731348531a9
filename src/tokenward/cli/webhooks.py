"""``tokenward webhook …``: lifecycle webhook endpoints, a test delivery, the delivery log."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

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

webhook_app = typer.Typer(
    help="Lifecycle webhooks: add, list, remove, test, deliveries.", no_args_is_help=True
)

EVENTS_HELP = (
    "An event to send (repeat): token.created, token.updated, token.rotated, token.revoked, "
    "token.expiring, token.leaked, token.quarantined, alert.raised. Default: all."
)


@webhook_app.command("add")
def webhook_add(
    url: Annotated[str, typer.Argument(help="https URL (plain http to loopback only).")],
    project: Annotated[
        str | None, typer.Option(help="Its project (default: every project; global admins).")
    ] = None,
    event: Annotated[list[str] | None, typer.Option("--event", help=EVENTS_HELP)] = None,
    description: Annotated[str, typer.Option(help="What it is for.")] = "",
    as_json: JsonOpt = False,
) -> None:
    """Add an endpoint; prints its signing secret once."""
    with client(as_json) as c:
        body = call(
            as_json,
            c.add_webhook,
            url=url,
            project=project,
            events=event or None,
            description=description or None,
        )
    if as_json:
        emit_json(body)
        return
    out.print(
        f"webhook [bold]{escape(body['id'])}[/bold] → {escape(body['url'])} "
        f"({escape(', '.join(body['events']))})\n"
        f"signing secret (shown once): [bold]{escape(body['secret'])}[/bold]",
        highlight=False,
    )


@webhook_app.command("list")
def webhook_list(
    project: Annotated[str | None, typer.Option(help="Only this project.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Endpoints you may see."""
    with client(as_json) as c:
        hooks = call(as_json, c.list_webhooks, project)
    if as_json:
        emit_json(hooks)
        return
    table = Table(box=None, pad_edge=False)
    id_column(table)
    for header in ("project", "events", "url"):
        table.add_column(header, overflow="fold")
    for h in hooks:
        add_row(table, h["id"], h["project"] or "(all)", " ".join(h["events"]), h["url"])
    out.print(table)


@webhook_app.command("remove")
def webhook_remove(webhook_id: str, as_json: JsonOpt = False) -> None:
    """Remove an endpoint (its pending deliveries are dropped)."""
    with client(as_json) as c:
        call(as_json, c.remove_webhook, webhook_id)
    if as_json:
        emit_json({"removed": webhook_id})
    else:
        out.print(f"removed {escape(webhook_id)}", highlight=False)


@webhook_app.command("test")
def webhook_test(webhook_id: str, as_json: JsonOpt = False) -> None:
    """Send a signed webhook.test event now; exit 1 when it was not delivered."""
    with client(as_json) as c:
        result = call(as_json, c.test_webhook, webhook_id)
    emit_record(result, as_json)
    if result["status"] != "delivered":
        raise typer.Exit(1)


@webhook_app.command("deliveries")
def webhook_deliveries(
    webhook_id: str,
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 20,
    as_json: JsonOpt = False,
) -> None:
    """The endpoint's deliveries, newest first."""
    with client(as_json) as c:
        rows = call(as_json, c.webhook_deliveries, webhook_id, limit)
    if as_json:
        emit_json(rows)
        return
    table = Table(box=None, pad_edge=False)
    for header in ("at", "type", "status", "tries", "last"):
        table.add_column(header, no_wrap=header != "last", overflow="fold")
    for d in rows:
        last = d["last_error"] or (str(d["last_status"]) if d["last_status"] else "")
        add_row(table, d["created_at"][:19], d["type"], d["status"], str(d["attempts"]), last)
    out.print(table)
