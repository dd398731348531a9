"""``tokenward identity …``: create, list, show, update and delete identities (owners of
tokens); deleting one revokes all its tokens, after a confirmation."""

from __future__ import annotations

import sys
from typing import Annotated, Any

import typer
from rich.table import Table

from tokenward.cli.common import (
    JsonOpt,
    add_row,
    call,
    client,
    emit_json,
    emit_record,
    fail,
    id_column,
    out,
    parse_meta,
)

identity_app = typer.Typer(help="Identities (owners of tokens).", no_args_is_help=True)

ProjectOpt = Annotated[str, typer.Option(help="Project name.")]
ExternalIdArg = Annotated[str, typer.Argument(help="The project's own id for it: user_123.")]


@identity_app.command("create")
def identity_create(
    external_id: ExternalIdArg,
    project: ProjectOpt,
    meta: Annotated[
        list[str] | None, typer.Option("--meta", help="key=value (repeatable).")
    ] = None,
    rate: Annotated[
        list[str] | None,
        typer.Option("--rate", help="100/minute (repeatable), shared by all its tokens."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Create an identity; give its tokens ``--identity EXTERNAL_ID`` when creating them."""
    with client(as_json) as c:
        body = call(
            as_json,
            c.create_identity,
            project,
            external_id,
            metadata=parse_meta(meta or []) or None,
            rate_limit=";".join(rate) if rate else None,
        )
    emit_record(body, as_json)


def _identity_table(items: list[dict[str, Any]]) -> Table:
    table = Table()
    table.add_column("external id", no_wrap=True)
    id_column(table)
    for header in ("rate limit", "metadata", "created"):
        table.add_column(header, overflow="fold")
    for i in items:
        meta = " ".join(f"{k}={v}" for k, v in i["metadata"].items())
        add_row(table, i["external_id"], i["id"], i["rate_limit"] or "-", meta, i["created_at"])
    return table


@identity_app.command("list")
def identity_list(project: ProjectOpt, as_json: JsonOpt = False) -> None:
    """List a project's identities."""
    with client(as_json) as c:
        items = call(as_json, c.list_identities, project)
    if as_json:
        emit_json(items)
    else:
        out.print(_identity_table(items))


@identity_app.command("show")
def identity_show(
    external_id: ExternalIdArg, project: ProjectOpt, as_json: JsonOpt = False
) -> None:
    """Show an identity and its tokens."""
    with client(as_json) as c:
        body = call(as_json, c.get_identity, project, external_id)
        owned = call(as_json, c.list_tokens, project=project, identity=external_id)
    body["token_ids"] = [t["id"] for t in owned]
    emit_record(body, as_json)


@identity_app.command("update")
def identity_update(
    external_id: ExternalIdArg,
    project: ProjectOpt,
    meta: Annotated[
        list[str] | None,
        typer.Option("--meta", help="key=value (repeatable): replaces the metadata."),
    ] = None,
    rate: Annotated[
        list[str] | None, typer.Option("--rate", help="100/minute (repeatable): new limit.")
    ] = None,
    no_rate: Annotated[bool, typer.Option("--no-rate", help="Remove the rate limit.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Change an identity's metadata or rate limit (effective on every replica at once)."""
    if rate and no_rate:
        fail("give --rate or --no-rate, not both", 2, as_json=as_json, error="usage")
    rate_limit = "" if no_rate else (";".join(rate) if rate else None)
    metadata = parse_meta(meta) if meta is not None else None
    with client(as_json) as c:
        body = call(
            as_json,
            c.update_identity,
            project,
            external_id,
            metadata=metadata,
            rate_limit=rate_limit,
        )
    emit_record(body, as_json)


@identity_app.command("delete")
def identity_delete(
    external_id: ExternalIdArg,
    project: ProjectOpt,
    yes: Annotated[
        bool, typer.Option("--yes", "-y", help="Do not ask: every token of it is revoked.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Delete an identity and revoke all its tokens (asks first, unless --yes)."""
    with client(as_json) as c:
        shown = call(as_json, c.get_identity, project, external_id)
        if not yes:
            if as_json or not sys.stdin.isatty():
                fail(
                    "deleting an identity revokes all its tokens: pass --yes to confirm",
                    2,
                    as_json=as_json,
                    error="confirmation_required",
                )
            question = (
                f"Delete identity {external_id} of {project} and revoke its "
                f"{shown['tokens']} token(s)?"
            )
            if not typer.confirm(question, default=False):
                fail("nothing was deleted", 1, error="aborted")
        body = call(as_json, c.delete_identity, project, external_id)
    if as_json:
        emit_json(body)
    else:
        out.print(
            f"deleted {external_id}; revoked {len(body['revoked'])} token(s)", highlight=False
        )
