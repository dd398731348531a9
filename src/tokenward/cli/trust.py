"""``tokenward trust …``: OIDC trust policies for workload identity exchange."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from tokenward.cli.common import (
    Environment,
    JsonOpt,
    add_row,
    call,
    client,
    emit_json,
    fail,
    out,
)

trust_app = typer.Typer(
    help="Trust policies: which CI identities (OIDC) may get tokens.", no_args_is_help=True
)


@trust_app.command("add")
def trust_add(
    project: Annotated[str, typer.Option(help="Project name.")],
    name: Annotated[str, typer.Option(help="Policy name (--audience picks it on exchange).")],
    issuer: Annotated[str, typer.Option(help="OIDC issuer URL (https).")],
    audience: Annotated[str, typer.Option(help="The 'aud' the identity token must carry.")],
    claim: Annotated[
        list[str], typer.Option("--claim", help="Required claim: repository=acme/shop (glob).")
    ],
    scope: Annotated[list[str], typer.Option("--scope", help="Scope granted (repeatable).")],
    env: Annotated[Environment, typer.Option("--env", help="Environment of the tokens.")] = "live",
    max_ttl: Annotated[str, typer.Option(help="Longest access token.")] = "15m",
    refresh_ttl: Annotated[str | None, typer.Option(help="Issue refresh tokens: 1h.")] = None,
    principal_claim: Annotated[str, typer.Option(help="Claim naming the principal.")] = "sub",
    as_json: JsonOpt = False,
) -> None:
    """Trust CI identity tokens of an issuer whose claims match."""
    claims = {}
    for pair in claim:
        key, sep, value = pair.partition("=")
        if not sep or not key or not value:
            fail(f"--claim wants name=value, got {pair!r}", 2, as_json=as_json)
        claims[key] = value
    with client(as_json) as c:
        body = call(
            as_json,
            c.add_trust_policy,
            project,
            name=name,
            issuer=issuer,
            audience=audience,
            claims=claims,
            scopes=scope,
            environment=env,
            max_ttl=max_ttl,
            refresh_ttl=refresh_ttl,
            principal_claim=principal_claim,
        )
    if as_json:
        emit_json(body)
    else:
        out.print(
            f"trust policy [bold]{escape(body['name'])}[/bold] "
            + escape(f"({body['id']}) added to {project}")
        )


@trust_app.command("list")
def trust_list(
    project: Annotated[str | None, typer.Option(help="Only this project.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List trust policies."""
    with client(as_json) as c:
        items = call(as_json, c.list_trust_policies, project)
    if as_json:
        emit_json(items)
        return
    table = Table("project", "name", "issuer", "audience", "claims", "scopes", "max ttl")
    for column in table.columns:
        column.overflow = "fold"
    for p in items:
        add_row(
            table,
            p["project"],
            p["name"],
            p["issuer"],
            p["audience"],
            " ".join(f"{k}={v}" for k, v in p["claims"].items()),
            " ".join(p["scopes"]),
            f"{p['max_ttl']}s",
        )
    out.print(table)


@trust_app.command("remove")
def trust_remove(
    name: str,
    project: Annotated[str, typer.Option(help="Project name.")],
    as_json: JsonOpt = False,
) -> None:
    """Remove a trust policy (tokens already issued live out their short life)."""
    with client(as_json) as c:
        call(as_json, c.remove_trust_policy, project, name)
    if as_json:
        emit_json({"removed": name, "project": project})
    else:
        out.print(Text(f"removed trust policy {name} from {project}"))
