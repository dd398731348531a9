"""``tokenward token …``: create, list, show, revoke, rotate, quarantine and release tokens."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from tokenward.cli.common import (
    Environment,
    JsonOpt,
    OutputFormat,
    TokenKindChoice,
    add_row,
    call,
    client,
    emit_json,
    emit_record,
    emit_token,
    err,
    fail,
    id_column,
    out,
    parse_meta,
    show_secret,
)
from tokenward.cli.common import duration as parse_ttl
from tokenward.cli.common import grace as parse_grace
from tokenward.tokens.model import CANARY_SCOPE

token_app = typer.Typer(help="API tokens.", no_args_is_help=True)


@token_app.command("create")
def token_create(
    project: Annotated[str, typer.Option(help="Project name.")],
    scope: Annotated[
        list[str] | None,
        typer.Option("--scope", help="resource:action (repeatable; a canary needs none)."),
    ] = None,
    env: Annotated[Environment, typer.Option("--env", help="Environment.")] = "live",
    ttl: Annotated[
        str | None,
        typer.Option(
            help="Lifetime: 90d, 12h, 15m (none: it never expires).",
            parser=parse_ttl,
            metavar="DURATION",
        ),
    ] = None,
    not_before: Annotated[str | None, typer.Option(help="ISO 8601 time it starts to work.")] = None,
    ip: Annotated[list[str] | None, typer.Option("--ip", help="Allowed CIDR (repeatable).")] = None,
    rate: Annotated[
        list[str] | None, typer.Option("--rate", help="100/minute (repeatable).")
    ] = None,
    uses: Annotated[
        int | None, typer.Option(help="Number of uses before it stops working.")
    ] = None,
    principal: Annotated[str | None, typer.Option(help="Who the token acts as.")] = None,
    name: Annotated[str, typer.Option(help="A label.")] = "",
    meta: Annotated[
        list[str] | None, typer.Option("--meta", help="key=value (repeatable).")
    ] = None,
    identity: Annotated[
        str | None, typer.Option(help="External id of its identity (owner): user_123.")
    ] = None,
    refill: Annotated[
        str | None,
        typer.Option(help="Credits that refill: 1000/month, 100/day, 10/hour (--uses: N)."),
    ] = None,
    refill_day: Annotated[
        int | None, typer.Option(help="Day of the month of a monthly refill (1-31).")
    ] = None,
    kind: Annotated[
        TokenKindChoice,
        typer.Option("--kind", help="api_key, or canary (a decoy: any use alerts)."),
    ] = "api_key",
    strict: Annotated[
        bool,
        typer.Option(
            "--strict", help="Refuse a scope no route policy and no token of the project uses."
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Create a token; its secret is printed once.

    A scope that no route policy, no built-in scope and no other token of the project uses
    (a typo such as records-read or records:reed?) is warned about; --strict refuses it.
    A token without --ttl never expires: that is warned about too.
    """
    if not scope and kind != "canary":
        fail("give at least one --scope (only a canary needs none)", 2, as_json=as_json)
    with client(as_json) as c:
        body = call(
            as_json,
            c.create_token,
            project=project,
            scopes=scope or [CANARY_SCOPE],
            kind=kind,
            environment=env,
            ttl=ttl,
            not_before=not_before,
            ip_allowlist=ip or None,
            rate_limit=";".join(rate) if rate else None,
            uses=uses,
            principal=principal,
            name=name,
            metadata=parse_meta(meta or []) or None,
            identity=identity,
            refill=refill,
            refill_day=refill_day,
            strict=strict or None,
        )
    if as_json:
        emit_json(body)
        return
    show_secret(body, "new token")
    for notice in body.get("warnings", []):
        err.print(Text(f"warning: {notice['message']}"), highlight=False, soft_wrap=True)


def _token_table(items: list[dict[str, Any]]) -> Table:
    table = Table()
    id_column(table)
    for header in ("project", "env", "name", "state", "scopes", "expires", "hint"):
        table.add_column(header, overflow="fold")
    for t in items:
        add_row(
            table,
            t["id"],
            t["project"] or "-",
            t["environment"],
            t["name"],
            t.get("state", ""),
            " ".join(t["scopes"]),
            t["expires_at"] or "never",
            t["hint"],
        )
    return table


@token_app.command("list")
def token_list(
    project: Annotated[str | None, typer.Option(help="Only this project.")] = None,
    state: Annotated[str | None, typer.Option(help="active, expired, revoked or rotated.")] = None,
    identity: Annotated[
        str | None, typer.Option(help="Only this identity's (its external id).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """List tokens (never their secrets)."""
    with client(as_json) as c:
        items = call(as_json, c.list_tokens, project=project, state=state, identity=identity)
    if as_json:
        emit_json(items)
    else:
        out.print(_token_table(items))


@token_app.command("show")
def token_show(token_id: str, as_json: JsonOpt = False) -> None:
    """Show one token's settings and state."""
    with client(as_json) as c:
        body = call(as_json, c.get_token, token_id)
    emit_record(body, as_json)


@token_app.command("revoke")
def token_revoke(
    token_id: str,
    reason: Annotated[str, typer.Option(help="Why (kept with the token).")] = "",
    as_json: JsonOpt = False,
) -> None:
    """Revoke a token now, on every replica."""
    with client(as_json) as c:
        body = call(as_json, c.revoke_token, token_id, reason)
    if as_json:
        emit_json(body)
    else:
        out.print(Text(f"revoked {body['id']} at {body['revoked_at']}"))


@token_app.command("rotate")
def token_rotate(
    token_id: str,
    grace: Annotated[
        str,
        typer.Option(
            help="How long the old token keeps working (0: none).",
            parser=parse_grace,
            metavar="DURATION",
        ),
    ] = "1h",
    as_json: JsonOpt = False,
    output: Annotated[
        OutputFormat | None,
        typer.Option("--output", help="For machines (github: to GITHUB_ENV, masked)."),
    ] = None,
    env_name: Annotated[str, typer.Option("--env-name", help="Variable name.")] = "TOKENWARD_TOKEN",
) -> None:
    """Issue a successor; the old token works until the grace period ends."""
    with client(as_json or output == "json") as c:
        body = call(as_json or output == "json", c.rotate_token, token_id, grace)
    if output is not None:
        emit_token(output, body, env_name, body.get("expires_at"))
    elif as_json:
        emit_json(body)
    else:
        show_secret(body, "rotated: new token")
        previous = body["previous"]
        out.print(Text(f"the old token {previous['id']} works until {previous['grace_until']}"))


@token_app.command("quarantine")
def quarantine(
    token_id: str,
    reason: Annotated[
        str, typer.Option(help="Why (kept with the token).")
    ] = "quarantined by an admin",
    as_json: JsonOpt = False,
) -> None:
    """Suspend a token now (reversible with 'token release')."""
    with client(as_json) as c:
        body = call(as_json, c.quarantine_token, token_id, reason)
    if as_json:
        emit_json(body)
    else:
        out.print(Text(f"quarantined {body['id']} at {body['quarantined_at']}"))


@token_app.command("release")
def release(
    token_id: str,
    note: Annotated[str, typer.Option(help="Why it is safe again.")] = "",
    as_json: JsonOpt = False,
) -> None:
    """Lift a token's quarantine."""
    with client(as_json) as c:
        body = call(as_json, c.release_token, token_id, note)
    if as_json:
        emit_json(body)
    else:
        out.print(Text(f"released {body['id']}: it works again"))
