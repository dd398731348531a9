"""What every command shares: the error handler, output helpers and the admin client.

Admin commands talk to a running server: ``TOKENWARD_URL`` (default http://127.0.0.1:8080) and
``TOKENWARD_ADMIN_TOKEN``. The secret is read from the environment only, never from a flag,
so it does not land in shell history or in the process list.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import socket
import ssl
import sys
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal, NoReturn, get_args
from urllib.parse import urlsplit

import httpx
import typer
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

from tokenward.cli.output import OutputError, write_result
from tokenward_client.admin import AdminAPIError, AdminClient, TokenSecretAsId

#: Set to 1 to see the traceback behind an ``error: …`` line.
DEBUG_ENV = "TOKENWARD_DEBUG"


class Group(TyperGroup):
    """A command group whose help fits 80 columns: summaries wrap instead of being cut, and
    a sub-group's summary lists all of its commands (so it never goes out of date)."""

    def format_commands(self, ctx: Any, formatter: Any) -> None:
        rows = [(name, summary(ctx, command)) for name, command in subcommands(ctx, self)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def subcommands(ctx: Any, group: Any) -> list[tuple[str, Any]]:
    """A group's visible commands, in the order its help lists them."""
    found = []
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        if command is not None and not command.hidden:
            found.append((name, command))
    return found


def summary(ctx: Any, command: Any) -> str:
    """The first sentence of a command's help; a group's names its commands too."""
    text = str(command.get_short_help_str(limit=1000))
    if hasattr(command, "list_commands"):
        names = ", ".join(name for name, _ in subcommands(ctx, command))
        text = f"{text.rstrip('.')}: {names}."
    return text


_TYPE_NAMES = {str: "TEXT", int: "INTEGER", float: "NUMBER", datetime: "DATETIME"}


def _metavar(param: Any) -> str | None:
    """A plain metavar where typer would show a Python type (``<str>``, ``<list[str]>``)."""
    described = getattr(param, "type_descriptor", None)
    if described is None:  # typer on plain click: click's metavars are plain already
        return None
    if described.is_choice:
        return "[" + "|".join(str(getattr(c, "value", c)) for c in described.choices) + "]"
    if described.is_path:
        return "PATH"
    annotation = described.annotation
    if described.is_list:
        annotation = get_args(annotation)[0]
    return _TYPE_NAMES.get(annotation, "VALUE")


def _no_type(ctx: Any) -> None:
    return None


def tidy_metavars(command: Any) -> None:
    """Plain metavars (``TEXT``, ``[live|test]``) for every option and argument of the tree,
    none on flags, a name on arguments. Runs on the root before anything is parsed."""
    for param in command.params:
        if param.metavar is not None:
            continue
        if getattr(param, "is_flag", False) or getattr(param, "count", False):
            param.metavar = ""
        elif param.param_type_name == "argument":
            param.metavar = (param.name or "value").upper().replace("_", "-")
            if hasattr(param, "display_type_rich"):  # typer would add "<str>" to the name
                param.display_type_rich = _no_type
        else:
            param.metavar = _metavar(param)
    for sub in getattr(command, "commands", {}).values():
        tidy_metavars(sub)


class Commands(Group):
    """The command tree, with one handler for the errors an operator can meet and fix.

    A missing file, a bad setting, a database or a port that cannot be reached end in one
    ``error: …`` line (JSON with ``--json``) and an exit code, not in a traceback: the
    traceback is printed only with ``TOKENWARD_DEBUG=1``. Anything else is a bug and keeps
    its traceback.
    """

    def main(self, *args: Any, **kwargs: Any) -> Any:
        tidy_metavars(self)
        return super().main(*args, **kwargs)

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        ctx.meta["tokenward.argv"] = list(args)
        return super().parse_args(ctx, args)

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except Exception as exc:
            found = expected_error(exc)
            if found is None or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
                raise
            argv = ctx.meta.get("tokenward.argv", [])
            as_json = "--json" in argv or "--output=json" in argv or _pair(argv, "--output", "json")
            code, error, message = found
            fail(message, code, as_json=as_json, error=error)


def _pair(argv: list[str], option: str, value: str) -> bool:
    return any(a == option and b == value for a, b in itertools.pairwise(argv))


def expected_error(exc: BaseException) -> tuple[int, str, str] | None:
    """(exit code, error code, one-line message) for an error an operator can fix, else None.

    Messages never quote a setting's value (it may be a secret) nor a database statement.
    """
    from pydantic import ValidationError
    from sqlalchemy.exc import DBAPIError, SQLAlchemyError

    from tokenward.errors import TokenwardError

    if isinstance(exc, ValidationError):
        return 2, "invalid_setting", settings_message(exc)
    if isinstance(exc, TokenwardError):
        return 1, exc.code, exc.message
    if isinstance(exc, DBAPIError):
        return 3, "database_error", f"database: {one_line(exc.orig)}"
    if isinstance(exc, SQLAlchemyError):
        return 3, "database_error", f"database: {type(exc).__name__}"
    if isinstance(exc, ssl.SSLError):
        return 2, "tls_error", f"TLS: {exc.reason or one_line(exc)}"
    if isinstance(exc, socket.gaierror | ConnectionError | TimeoutError):
        return 3, "connection_failed", f"cannot connect: {exc.strerror or one_line(exc)}"
    if isinstance(exc, OSError):
        where = f": {exc.filename}" if exc.filename else ""
        return 1, "os_error", f"{exc.strerror}{where}" if exc.strerror else one_line(exc)
    if isinstance(exc, UnicodeError):
        return 2, "invalid_text", "text that is not valid here (check for non-ASCII characters)"
    return None


def one_line(value: object) -> str:
    text = " ".join(str(value).split())
    return text or type(value).__name__


def settings_message(exc: Any) -> str:
    """A settings validation error, naming each variable and never echoing its value."""
    problems = []
    for item in exc.errors(include_input=False, include_url=False):
        field = ".".join(str(part) for part in item["loc"])
        message = str(item["msg"]).removeprefix("Value error, ")
        problems.append(f"TOKENWARD_{field.upper()}: {message}" if field else message)
    return "invalid setting: " + "; ".join(problems)


out = Console(emoji=False)  # a fingerprint's ":CD:" is not an emoji code
err = Console(stderr=True, emoji=False)

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.")]
#: A token's environment.
Environment = Literal["live", "test"]
TokenKindChoice = Literal["api_key", "canary"]
#: The formats of ``--output`` (cli/output.py).
OutputFormat = Literal["json", "env", "dotenv", "github"]
DataDir = Annotated[
    Path,
    typer.Option(
        "--data-dir", envvar="TOKENWARD_DATA_DIR", help="Data folder (SQLite database, server key)."
    ),
]


def duration(value: str) -> str:
    """A duration such as ``90d``, ``12h``, ``1h30m`` (a bad one is a bad option: exit 2)."""
    from tokenward.tokens.durations import DurationError, parse_duration

    if value is None:
        return value
    try:
        parse_duration(value)
    except DurationError as exc:
        raise typer.BadParameter(f"{value!r}: {exc}") from None
    return value


def grace(value: str) -> str:
    """A duration, or ``0`` for none."""
    return value if value in ("0", "0s") else duration(value)


def project_name(value: str) -> str:
    """A project name as the server takes it, said in words when it is not one (exit 2)."""
    from tokenward.api.schemas import PATTERN_WORDS, PROJECT_NAME

    if not re.fullmatch(PROJECT_NAME, value):
        raise typer.BadParameter(
            f"{value!r} is not a project name: use {PATTERN_WORDS[PROJECT_NAME]}"
        )
    return value


def fail(message: str, code: int = 1, *, as_json: bool = False, error: str = "error") -> NoReturn:
    if as_json:
        print(json.dumps({"error": error, "message": message}), file=sys.stderr)
    else:
        err.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def emit_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


def emit_record(body: dict[str, Any], as_json: bool) -> None:
    """One object: JSON for scripts, a field/value table for people."""
    if as_json:
        emit_json(body)
        return
    table = Table("field", "value", show_header=False)
    table.columns[1].overflow = "fold"
    for key, value in body.items():
        add_row(table, key, json.dumps(value) if isinstance(value, list | dict) else value)
    out.print(table)


def add_row(table: Table, *values: object) -> None:
    """A table row of data, shown as it is: never read as Rich markup or emoji codes."""
    table.add_row(*(value if isinstance(value, Text) else Text(str(value)) for value in values))


def id_column(table: Table, header: str = "id") -> None:
    """An id column that is never cut or wrapped: ids are copied from tables into commands."""
    table.add_column(header, no_wrap=True, min_width=20)


# -- admin client side --------------------------------------------------------------------
def client(as_json: bool = False) -> AdminClient:
    token = os.environ.get("TOKENWARD_ADMIN_TOKEN")
    if not token:
        fail(
            "set TOKENWARD_ADMIN_TOKEN to an admin token (it is never taken from a flag)",
            2,
            as_json=as_json,
            error="missing_credential",
        )
    if not (token.isascii() and token.isprintable()):
        fail(  # it would fail in the Authorization header; never quote it
            "TOKENWARD_ADMIN_TOKEN holds characters no token has (non-ASCII or control "
            "characters): copy the admin token again",
            2,
            as_json=as_json,
            error="bad_credential",
        )
    url = os.environ.get("TOKENWARD_URL", "http://127.0.0.1:8080")
    scheme = urlsplit(url).scheme.lower() if "://" in url else ""
    if scheme not in ("http", "https"):
        rest = url.split("://")[-1]
        loopback = rest.startswith(("127.", "localhost", "[::1]"))
        fail(
            f"TOKENWARD_URL={url!r} has no http:// or https:// scheme: write it as "
            f"{('http://' if loopback else 'https://') + rest!r}",
            2,
            as_json=as_json,
            error="bad_url",
        )
    ca = os.environ.get("TOKENWARD_CA_CERT")
    try:
        return AdminClient(url, token, verify=ca or True, user_agent="tokenward-cli")
    except (OSError, ssl.SSLError):
        fail(
            f"cannot read the CA certificate TOKENWARD_CA_CERT={ca}",
            2,
            as_json=as_json,
            error="bad_ca_cert",
        )
    except httpx.InvalidURL:
        fail(f"TOKENWARD_URL is not a valid URL: {url!r}", 2, as_json=as_json, error="bad_url")


def call(as_json: bool, fn: Any, *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except AdminAPIError as exc:
        message = exc.message
        if exc.status == 401:  # the credential is at fault, and there is only one
            message = (
                f"the server refused TOKENWARD_ADMIN_TOKEN ({exc.message}): set it to an "
                "admin token of this server (tokenward init printed the first one)"
            )
        fail(message, 1, as_json=as_json, error=exc.code)
    except TokenSecretAsId as exc:
        fail(str(exc), 2, as_json=as_json, error=exc.code)
    except (httpx.HTTPError, httpx.InvalidURL) as exc:  # connection refused, TLS, timeout
        url = os.environ.get("TOKENWARD_URL", "http://127.0.0.1:8080")
        fail(
            f"cannot reach the server at TOKENWARD_URL={url}: {type(exc).__name__}"
            + (f" ({one_line(exc)})" if str(exc) else ""),
            3,
            as_json=as_json,
            error="connection_failed",
        )
    except ValueError:  # an answer that is not JSON: not a tokenward server
        fail(
            "the server's answer is not JSON: is TOKENWARD_URL a tokenward server?",
            3,
            as_json=as_json,
            error="bad_response",
        )


def parse_meta(pairs: list[str]) -> dict[str, str]:
    meta = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            fail(f"--meta wants key=value, got {pair!r}", 2)
        meta[key] = value
    return meta


def show_secret(body: dict[str, Any], title: str) -> None:
    out.print(
        Panel.fit(
            f"[bold]{escape(body['token'])}[/bold]\n\nid: {escape(body['id'])}\n"
            f"{escape(body['warning'])}",
            title=title,
            border_style="yellow",
        ),
        highlight=False,
    )


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
