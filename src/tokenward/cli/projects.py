"""``tokenward project …``: projects (one per app)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from tokenward.cli.common import (
    JsonOpt,
    add_row,
    call,
    client,
    duration,
    emit_json,
    fail,
    id_column,
    out,
    project_name,
)

project_app = typer.Typer(help="Projects (one per app).", no_args_is_help=True)


@project_app.command("create")
def project_create(
    name: Annotated[str, typer.Argument(parser=project_name, metavar="NAME")],
    as_json: JsonOpt = False,
) -> None:
    """Create a project."""
    with client(as_json) as c:
        project = call(as_json, c.create_project, name)
    if as_json:
        emit_json(project)
    else:
        name, project_id = escape(project["name"]), escape(project["id"])
        out.print(f"created project [bold]{name}[/bold] ({project_id})")


@project_app.command("list")
def project_list(as_json: JsonOpt = False) -> None:
    """List projects."""
    with client(as_json) as c:
        projects = call(as_json, c.list_projects)
    if as_json:
        emit_json(projects)
        return
    table = Table("name")
    table.columns[0].overflow = "fold"
    id_column(table)
    table.add_column("created", overflow="fold")
    for p in projects:
        add_row(table, p["name"], p["id"], p["created_at"])
    out.print(table)


@project_app.command("allow-ip")
def project_allow_ip(
    name: str,
    cidrs: Annotated[
        list[str] | None, typer.Argument(help="IPv4/IPv6 addresses or CIDRs; none to clear.")
    ] = None,
    clear: Annotated[bool, typer.Option("--clear", help="Allow any address again.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Set the networks every token of a project may be used from (replaces the list)."""
    if not cidrs and not clear:
        fail("give one or more CIDRs, or --clear to allow any address", 2, as_json=as_json)
    with client(as_json) as c:
        project = call(as_json, c.update_project, name, [] if clear else list(cidrs or []))
    if as_json:
        emit_json(project)
    elif project["ip_allowlist"]:
        networks = ", ".join(project["ip_allowlist"])
        out.print(Text(f"{project['name']}: tokens work only from {networks}"))
    else:
        out.print(Text(f"{project['name']}: tokens work from any address"))


@project_app.command("policy")
def project_policy(
    name: str,
    max_lifetime: Annotated[
        str | None,
        typer.Option(help="No token may live longer: 90d.", parser=duration, metavar="DURATION"),
    ] = None,
    access_ttl: Annotated[
        str | None,
        typer.Option(
            help="Longest access token from /v1/token: 15m.", parser=duration, metavar="DURATION"
        ),
    ] = None,
    require_dpop: Annotated[
        bool | None, typer.Option("--require-dpop/--no-require-dpop", help="DPoP-bound only.")
    ] = None,
    warn_days: Annotated[
        int | None, typer.Option(help="Warn this many days before a token expires.")
    ] = None,
    leak_action: Annotated[
        str | None, typer.Option(help="revoke or quarantine a leaked token (docs/leaks.md).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Show a project's token policy, or change the options given."""
    with client(as_json) as c:
        policy = call(as_json, c.get_policy, name)
        changes = {
            "max_token_lifetime": max_lifetime,
            "access_token_ttl": access_ttl,
            "require_dpop": require_dpop,
            "expiry_warning_days": warn_days,
            "leak_action": leak_action,
        }
        changes = {k: v for k, v in changes.items() if v is not None}
        if changes:
            body = {k: v for k, v in policy.items() if v is not None}
            for key in ("max_token_lifetime", "access_token_ttl"):
                if isinstance(body.get(key), int):
                    body[key] = f"{body[key]}s"
            policy = call(as_json, c.set_policy, name, **{**body, **changes})
    if as_json:
        emit_json(policy)
        return
    table = Table("policy", "value", show_header=False)
    for key, value in policy.items():
        add_row(table, key, "-" if value is None else value)
    out.print(table)
