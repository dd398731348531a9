"""CLI commands for short-lived tokens: ``token exchange``, ``token auto-rotate``,
``trust add|list|remove`` and ``project policy`` (registered on the apps of :mod:`cli`)."""

from __future__ import annotations

import os
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from tokenward.cli import (
    JsonOpt,
    _show_secret,
    add_row,
    app,
    call,
    client,
    emit_json,
    fail,
    out,
    project_app,
    token_app,
)
from tokenward.client.oauth import exchange_token, github_actions_identity
from tokenward.client.output import FORMATS, OutputError, write_result
from tokenward.tokens.durations import DurationError, parse_duration

trust_app = typer.Typer(
    help="Trust policies: which CI identities (OIDC) may get tokens.", no_args_is_help=True
)
app.add_typer(trust_app, name="trust")

OutputOpt = Annotated[
    str | None,
    typer.Option(
        "--output",
        help=f"Write the token for machines: {', '.join(FORMATS)} (github: to GITHUB_ENV, masked).",
    ),
]
EnvNameOpt = Annotated[
    str, typer.Option("--env-name", help="Variable name for env, dotenv and github output.")
]


def emit_token(output: str, body: dict[str, Any], env_name: str, expires_at: str | None) -> None:
    """Write a freshly issued token in the machine format asked for."""
    secret = str(body.get("access_token") or body.get("token"))
    variables = {env_name: secret}
    if expires_at:
        variables[f"{env_name}_EXPIRES_AT"] = expires_at
    try:
        write_result(output, body, variables, [secret], sys.stdout)
    except OutputError as exc:
        fail(str(exc), 2, as_json=output == "json", error="invalid_output")


def _seconds(text: str | None, what: str) -> int | None:
    if text is None:
        return None
    try:
        return int(parse_duration(text).total_seconds())
    except DurationError as exc:
        fail(f"{what}: {exc}", 2)


@token_app.command("exchange")
def token_exchange(
    scope: Annotated[
        list[str] | None, typer.Option("--scope", help="Narrow to these scopes (repeatable).")
    ] = None,
    ttl: Annotated[str | None, typer.Option(help="Wanted lifetime: 10m (default 15m).")] = None,
    identity_env: Annotated[
        str | None,
        typer.Option(help="Exchange the CI OIDC token held in this environment variable."),
    ] = None,
    identity_file: Annotated[
        Path | None, typer.Option(help="Exchange the CI OIDC token in this file.")
    ] = None,
    github_oidc: Annotated[
        str | None,
        typer.Option(help="Fetch this GitHub Actions job's OIDC token for this audience."),
    ] = None,
    project: Annotated[
        str | None,
        typer.Option(help="With a CI identity: the project the tokens are for (required)."),
    ] = None,
    audience: Annotated[
        str | None,
        typer.Option(
            help="With a CI identity: the trust policy of --project to use when several match "
            "(or, alone, project/policy or a trust policy id)."
        ),
    ] = None,
    output: OutputOpt = None,
    env_name: EnvNameOpt = "TOKENWARD_TOKEN",
) -> None:
    """Exchange an API key (TOKENWARD_API_KEY) or a CI identity for a short-lived token."""
    as_json = output == "json"
    if output is not None and output not in FORMATS:
        fail(f"--output must be one of {', '.join(FORMATS)}", 2)
    identity: str | None = None
    if github_oidc:
        try:
            identity = github_actions_identity(github_oidc)
        except Exception as exc:
            fail(f"cannot get the GitHub Actions identity token: {exc}", 2, as_json=as_json)
    elif identity_env:
        identity = os.environ.get(identity_env)
        if not identity:
            fail(f"{identity_env} is not set", 2, as_json=as_json, error="missing_credential")
    elif identity_file:
        try:
            identity = identity_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            decoding = isinstance(exc, UnicodeDecodeError)
            reason = "not UTF-8 text" if decoding else getattr(exc, "strerror", None) or exc
            fail(f"cannot read --identity-file {identity_file}: {reason}", 2, as_json=as_json)
    subject = identity or os.environ.get("TOKENWARD_API_KEY")
    if not subject:
        fail(
            "set TOKENWARD_API_KEY, or give --identity-env, --identity-file or --github-oidc",
            2,
            as_json=as_json,
            error="missing_credential",
        )
    if project and audience and ("/" in audience or audience.startswith("trp_")):
        fail("--audience names a policy of --project: give its name only", 2, as_json=as_json)
    if project and audience:
        audience = f"{project}/{audience}"
    elif project:
        audience = project
    if identity is not None and not audience:
        fail(
            "a CI identity is exchanged into one project: give --project",
            2,
            as_json=as_json,
            error="missing_project",
        )
    url = os.environ.get("TOKENWARD_URL", "http://127.0.0.1:8080")
    body = call(
        as_json,
        exchange_token,
        url,
        subject,
        identity=identity is not None,
        scope=scope,
        expires_in=_seconds(ttl, "--ttl"),
        audience=audience,
        verify=os.environ.get("TOKENWARD_CA_CERT") or True,
    )
    expires_at = (datetime.now(UTC) + timedelta(seconds=int(body["expires_in"]))).isoformat()
    expires_at = expires_at.split(".")[0] + "Z"
    if output is None:
        out.print(
            f"[bold]{escape(str(body['access_token']))}[/bold]\n"
            + escape(f"{body['token_type']} token, scope {body['scope']!r}, expires {expires_at}"),
            highlight=False,
        )
        return
    emit_token(output, body, env_name, expires_at)


@token_app.command("auto-rotate")
def token_auto_rotate(
    token_id: str,
    period: Annotated[str, typer.Option(help="Rotate this often: 30d.")],
    webhook: Annotated[str, typer.Option(help="https URL that receives the new token.")],
    grace: Annotated[str, typer.Option(help="How long the old token keeps working.")] = "1h",
    quiet: Annotated[
        str | None, typer.Option(help="Retire the old token early after this long unused.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Rotate a token automatically; prints the webhook signing secret once."""
    with client(as_json) as c:
        body = call(
            as_json,
            c.set_rotation,
            token_id,
            period=period,
            grace=grace,
            quiet=quiet,
            webhook_url=webhook,
        )
    if as_json:
        emit_json(body)
        return
    out.print(
        escape(
            f"{token_id} rotates every {period} (next {body['due_at']}); new tokens are POSTed "
            f"to {body['webhook_url']}"
        )
        + f"\nwebhook signing secret (shown once): [bold]{escape(body['webhook_secret'])}[/bold]",
        highlight=False,
    )


@project_app.command("policy")
def project_policy(
    name: str,
    max_lifetime: Annotated[str | None, typer.Option(help="No token may live longer: 90d.")] = None,
    access_ttl: Annotated[
        str | None, typer.Option(help="Longest access token from /v1/token: 15m.")
    ] = None,
    require_dpop: Annotated[
        bool | None, typer.Option("--require-dpop/--no-require-dpop", help="DPoP-bound only.")
    ] = None,
    warn_days: Annotated[
        int | None, typer.Option(help="Warn this many days before a token expires.")
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
    env: Annotated[str, typer.Option("--env", help="live or test.")] = "live",
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


__all__ = ["_show_secret", "emit_token"]
