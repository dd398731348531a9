"""``tokenward token exchange`` and ``token auto-rotate``: short-lived tokens for machines."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from tokenward.cli.common import (
    JsonOpt,
    OutputFormat,
    call,
    client,
    emit_json,
    emit_token,
    fail,
    out,
)
from tokenward.cli.tokens import token_app
from tokenward.tokens.durations import DurationError, parse_duration
from tokenward_client.oauth import exchange_token, github_actions_identity

OutputOpt = Annotated[
    OutputFormat | None,
    typer.Option("--output", help="Write the token for machines (github: to GITHUB_ENV, masked)."),
]
EnvNameOpt = Annotated[
    str, typer.Option("--env-name", help="Variable name for env, dotenv and github output.")
]


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
    json_flag: JsonOpt = False,
) -> None:
    """Exchange an API key (TOKENWARD_API_KEY) or a CI identity for a short-lived token.

    --json is --output json: the token endpoint's answer as it is.
    """
    if json_flag and output not in (None, "json"):
        fail("--json is --output json: give one of them", 2, as_json=True)
    output = "json" if json_flag else output
    as_json = output == "json"
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
