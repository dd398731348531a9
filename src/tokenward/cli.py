"""``tokenward …``: set up and run the server, and do every admin action.

Admin commands talk to a running server: ``TOKENWARD_URL`` (default http://127.0.0.1:8080) and
``TOKENWARD_ADMIN_TOKEN``. The secret is read from the environment only, never from a flag,
so it does not land in shell history or in the process list.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import socket
import ssl
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import httpx
import typer
from rich.console import Console
from rich.markup import escape
from rich.panel import Panel
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup

from tokenward.client.admin import AdminAPIError, AdminClient, TokenSecretAsId
from tokenward.dashboard.cli import user_app

#: Set to 1 to see the traceback behind an ``error: …`` line.
DEBUG_ENV = "TOKENWARD_DEBUG"


class _Commands(TyperGroup):
    """The command tree, with one handler for the errors an operator can meet and fix.

    A missing file, a bad setting, a database or a port that cannot be reached end in one
    ``error: …`` line (JSON with ``--json``) and an exit code, not in a traceback: the
    traceback is printed only with ``TOKENWARD_DEBUG=1``. Anything else is a bug and keeps
    its traceback.
    """

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
        return 3, "database_error", f"database: {_one_line(exc.orig)}"
    if isinstance(exc, SQLAlchemyError):
        return 3, "database_error", f"database: {type(exc).__name__}"
    if isinstance(exc, ssl.SSLError):
        return 2, "tls_error", f"TLS: {exc.reason or _one_line(exc)}"
    if isinstance(exc, socket.gaierror | ConnectionError | TimeoutError):
        return 3, "connection_failed", f"cannot connect: {exc.strerror or _one_line(exc)}"
    if isinstance(exc, OSError):
        where = f": {exc.filename}" if exc.filename else ""
        return 1, "os_error", f"{exc.strerror}{where}" if exc.strerror else _one_line(exc)
    if isinstance(exc, UnicodeError):
        return 2, "invalid_text", "text that is not valid here (check for non-ASCII characters)"
    return None


def _one_line(value: object) -> str:
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


app = typer.Typer(
    cls=_Commands,
    help="tokenward: API tokens for Backend-as-a-Service apps.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
project_app = typer.Typer(help="Projects (one per app).", no_args_is_help=True)
token_app = typer.Typer(help="Tokens: create, list, show, revoke, rotate.", no_args_is_help=True)
app.add_typer(project_app, name="project")
app.add_typer(token_app, name="token")
app.add_typer(user_app, name="user")

out = Console(emoji=False)  # a fingerprint's ":CD:" is not an emoji code
err = Console(stderr=True, emoji=False)

JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.")]
DataDir = Annotated[
    Path,
    typer.Option(
        "--data-dir", envvar="TOKENWARD_DATA_DIR", help="Data folder (SQLite database, server key)."
    ),
]


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


# -- server side --------------------------------------------------------------------------
@app.command()
def init(
    data_dir: DataDir = Path(".tokenward"),
    reset: Annotated[
        bool, typer.Option(help="Revoke the bootstrap admin token, issue a new one.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Create the data dir, server key and database; print the first admin token once."""
    from tokenward.bootstrap import initialize
    from tokenward.settings import Settings

    settings = Settings.load(data_dir=data_dir)
    result = asyncio.run(initialize(settings, reset=reset))
    info = {
        "data_dir": str(settings.data_dir),
        "database": _safe_db(settings),
        "key_file": None if settings.secret_key else str(settings.key_file),
    }
    if not result.created:
        message = (
            "already initialized; the admin token was shown when it was created. "
            "Use --reset to revoke it and issue a new one."
        )
        if as_json:
            emit_json(
                {
                    "initialized": False,
                    "admin_token_id": result.token_id,
                    **_owner(result),
                    **info,
                    "message": message,
                }
            )
        else:
            out.print(message, highlight=False)
            _show_owner(result)
        return
    if as_json:
        emit_json(
            {
                "initialized": True,
                "admin_token": result.admin_token,
                "admin_token_id": result.token_id,
                **_owner(result),
                **info,
            }
        )
    else:
        _show_admin_token(result.admin_token or "", result.token_id or "", reset=reset)
        _show_owner(result)


def _owner(result: Any) -> dict[str, str]:
    if not result.owner_login:
        return {}
    return {"owner_login": result.owner_login, "owner_password": result.owner_password}


def _show_owner(result: Any, dashboard_url: str | None = None) -> None:
    if not result.owner_login:
        return
    where = f"\nSign in at {dashboard_url}" if dashboard_url else ""
    out.print(
        Panel.fit(
            f"login:    [bold]{escape(result.owner_login)}[/bold]\n"
            f"password: [bold]{escape(result.owner_password)}[/bold]\n\n"
            "The first dashboard owner. The password is shown once: store it now.\n"
            "Two-factor sign-in (an authenticator app) is set up at the first login."
            + escape(where),
            title="dashboard owner",
            border_style="yellow",
        ),
        highlight=False,
    )


def _safe_db(settings: Any) -> str:
    from sqlalchemy.engine import make_url

    return make_url(settings.resolved_database_url).render_as_string(hide_password=True)


def _show_admin_token(secret: str, token_id: str, *, reset: bool = False) -> None:
    what = (
        "A new admin credential: the previous bootstrap admin token is revoked."
        if reset
        else "This is the first admin credential."
    )
    out.print(
        Panel.fit(
            f"[bold]{escape(secret)}[/bold]\n\nid: {escape(token_id)}\n"
            f"{what} It is shown once: store it now.\n"
            "Use it with:  export TOKENWARD_ADMIN_TOKEN=<the token above>",
            title="admin token",
            border_style="yellow",
        ),
        highlight=False,
    )


Port = Annotated[int, typer.Option(envvar="TOKENWARD_PORT")]
GatewayPort = Annotated[
    int,
    typer.Option(envvar="TOKENWARD_GATEWAY_PORT", help="Port of the gateway."),
]


@app.command()
def serve(
    data_dir: DataDir = Path(".tokenward"),
    host: Annotated[str, typer.Option(envvar="TOKENWARD_HOST")] = "127.0.0.1",
    port: Port = 8080,
    tls_cert: Annotated[Path | None, typer.Option(help="PEM certificate for HTTPS.")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="PEM private key for HTTPS.")] = None,
    tls_self_signed: Annotated[bool, typer.Option(help="Make a development certificate.")] = False,
    allow_insecure_http: Annotated[
        bool,
        typer.Option(
            envvar="TOKENWARD_ALLOW_INSECURE_HTTP",
            help="Plain HTTP on a non-loopback address (only behind a TLS proxy).",
        ),
    ] = False,
    init_first: Annotated[bool, typer.Option("--init", help="Initialize first if needed.")] = False,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            envvar="TOKENWARD_GATEWAY_CONFIG",
            help="Route policy file (TOML): serves the gateway and /authz decisions.",
        ),
    ] = None,
    gateway_port: GatewayPort = 8081,
    workers: Annotated[
        str | None,
        typer.Option(
            envvar="TOKENWARD_WORKERS",
            help="Server processes on the same ports: a number or 'auto' (one per core).",
            show_default="1",
        ),
    ] = None,
) -> None:
    """Run the server (admin API, verification API, /authz, /healthz; gateway with --config).

    Everything that can be checked is checked before the banner is printed: settings, the
    route policy, the TLS files, the server key, the database and the port (bound here and
    handed to uvicorn), so a banner means the server is really up.
    """
    import gc

    import uvicorn

    from tokenward.app import create_asgi
    from tokenward.logs import configure_logging
    from tokenward.server import InsecureBind, check_bind, self_signed, uvicorn_options
    from tokenward.settings import Settings

    settings = Settings.load(  # a bad setting ends in one line naming it (see _Commands)
        data_dir=data_dir,
        host=host,
        port=port,
        allow_insecure_http=allow_insecure_http or None,
        gateway_config=config,
        gateway_port=gateway_port,
        workers=workers,
    )
    configure_logging(settings.log_level)
    processes = settings.worker_count
    problem = settings.workers_problem()
    if problem is not None:
        fail(problem, 2)
    routes = 0
    databases: list[Any] = []
    if settings.gateway_config is not None:
        from tokenward.gateway import ConfigError, load_policy

        try:
            policy = load_policy(settings.gateway_config)
            routes = len(policy.routes)
            databases = policy.postgres
            for database in databases:
                database.upstream_password()  # a missing password stops the start here
        except ConfigError as exc:
            fail(str(exc), 2)
    if (tls_cert is None) != (tls_key is None):
        fail("give both --tls-cert and --tls-key", 2)
    if tls_self_signed:
        tls_cert, tls_key, fingerprint = self_signed(settings.data_dir / "tls", host)
        out.print(
            Text(f"self-signed certificate {tls_cert}\nSHA-256 fingerprint: {fingerprint}"),
            soft_wrap=True,  # a fingerprint or path split over lines cannot be copied
        )
    if tls_cert is not None and tls_key is not None:
        _check_tls(tls_cert, tls_key)
    tls = tls_cert is not None
    try:
        check_bind(host, tls, settings.allow_insecure_http)
    except InsecureBind as exc:
        fail(str(exc), 2)
    if not init_first:
        if settings.secret_key is None and not settings.key_file.exists():
            fail(
                f"{settings.data_dir} is not initialized: run 'tokenward init --data-dir "
                f"{settings.data_dir}' first (or pass --init)",
                2,
            )
        _check_ready(settings)
    listener = _listen(host, settings.port)
    port = listener.getsockname()[1]
    gateway = None
    if settings.gateway_config is not None:
        gateway = _listen(host, settings.gateway_port)
        settings = settings.model_copy(
            update={"port": port, "gateway_port": gateway.getsockname()[1]}
        )
    elif port != settings.port:
        settings = settings.model_copy(update={"port": port})
    scheme = "https" if tls else "http"
    shown = f"[{host}]" if ":" in host else host
    base = f"{scheme}://{shown}:{port}"
    if init_first:
        from tokenward.bootstrap import initialize

        result = asyncio.run(initialize(settings))
        if result.created:
            _show_admin_token(result.admin_token or "", result.token_id or "")
        _show_owner(result, f"{base}/dashboard/")
    banner = (
        f"tokenward listening on {base}\n  dashboard: {base}/dashboard/\n"
        f"  API docs:  {base}/docs\n"
        f"  health:    {base}/healthz\n"
        f"  CLI:       export TOKENWARD_URL={base} TOKENWARD_ADMIN_TOKEN=<admin token>"
    )
    if processes > 1:
        banner += f"\n  workers:   {processes} processes"
    if gateway is not None:
        banner += (
            f"\n  gateway:   {scheme}://{shown}:{settings.gateway_port} "
            f"({routes} routes from {settings.gateway_config})\n"
            f"  authz:     {base}/authz"
        )
        for database in databases:
            banner += f"\n  postgres:  {database.name} on {database.host}:{database.port}"
    out.print(Text(banner), soft_wrap=True)
    sys.stdout.flush()  # the banner reaches a pipe or a log file before the first request
    options = uvicorn_options(tls_cert, tls_key)
    # Everything loaded so far lives as long as the process: keep it out of the cyclic
    # garbage collector's way (fewer, cheaper full collections under load). Each request
    # allocates a few hundred short-lived objects; a larger first generation lets most of
    # them die before a collection runs (measured: about 20% less CPU per audited decision).
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)
    if gateway is not None:
        from tokenward.gateway.serve import run, serve_with_gateway

        def serve_one() -> None:
            run(
                serve_with_gateway(settings, api_socket=listener, gateway_socket=gateway, **options)
            )
    else:

        def serve_one() -> None:
            server = uvicorn.Server(
                uvicorn.Config(create_asgi(settings), host=host, port=port, **options)
            )
            with contextlib.suppress(KeyboardInterrupt):
                server.run(sockets=[listener])
            if not server.started:
                raise typer.Exit(3)  # as uvicorn.run does when the application cannot start

    if processes > 1:
        from tokenward.server import run_workers

        raise typer.Exit(run_workers(processes, serve_one))
    serve_one()


def _listen(host: str, port: int) -> socket.socket:
    """The server's listening socket, bound as uvicorn binds it; fail now if it cannot be."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)  # uvicorn's backlog: connections made once the banner is out wait
    except OSError as exc:
        sock.close()
        fail(f"cannot listen on {host} port {port}: {exc.strerror or exc}", 3)
    sock.set_inheritable(True)
    return sock


def _check_tls(cert: Path, key: Path) -> None:
    """Both files readable, and a certificate with its private key."""
    for option, path in (("--tls-cert", cert), ("--tls-key", key)):
        try:
            path.open("rb").close()
        except OSError as exc:
            fail(f"cannot read {option} {path}: {exc.strerror or exc}", 2)
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        fail(f"--tls-cert {cert} and --tls-key {key} do not load: {exc.reason or exc}", 2)


def _check_ready(settings: Any) -> None:
    """The server key loads and the database answers (else the server would fail at start)."""
    from tokenward.settings import load_hasher
    from tokenward.store.engine import create_engine

    try:
        load_hasher(settings)
    except ValueError as exc:
        fail(str(exc), 2)

    async def probe() -> None:
        engine = create_engine(settings.resolved_database_url)
        try:
            async with engine.connect():
                pass
        finally:
            await engine.dispose()

    try:
        asyncio.run(probe())
    except Exception as exc:
        if expected_error(exc) is None:
            raise
        reason = _one_line(getattr(exc, "orig", None) or exc)
        fail(f"cannot use the database {_safe_db(settings)}: {reason}", 3, error="database_error")


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
    ca = os.environ.get("TOKENWARD_CA_CERT")
    try:
        return AdminClient(url, token, verify=ca or True)
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
        fail(exc.message, 1, as_json=as_json, error=exc.code)
    except TokenSecretAsId as exc:
        fail(str(exc), 2, as_json=as_json, error=exc.code)
    except (httpx.HTTPError, httpx.InvalidURL) as exc:  # connection refused, TLS, timeout
        fail(
            f"cannot reach the server: {type(exc).__name__}",
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


@project_app.command("create")
def project_create(name: str, as_json: JsonOpt = False) -> None:
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


def _meta(pairs: list[str]) -> dict[str, str]:
    meta = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            fail(f"--meta wants key=value, got {pair!r}", 2)
        meta[key] = value
    return meta


def _show_secret(body: dict[str, Any], title: str) -> None:
    out.print(
        Panel.fit(
            f"[bold]{escape(body['token'])}[/bold]\n\nid: {escape(body['id'])}\n"
            f"{escape(body['warning'])}",
            title=title,
            border_style="yellow",
        ),
        highlight=False,
    )


@token_app.command("create")
def token_create(
    project: Annotated[str, typer.Option(help="Project name.")],
    scope: Annotated[list[str], typer.Option("--scope", help="resource:action (repeatable).")],
    env: Annotated[str, typer.Option("--env", help="live or test.")] = "live",
    ttl: Annotated[str | None, typer.Option(help="Lifetime: 90d, 12h, 15m.")] = None,
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
    as_json: JsonOpt = False,
) -> None:
    """Create a token; its secret is printed once."""
    with client(as_json) as c:
        body = call(
            as_json,
            c.create_token,
            project=project,
            scopes=scope,
            environment=env,
            ttl=ttl,
            not_before=not_before,
            ip_allowlist=ip or None,
            rate_limit=";".join(rate) if rate else None,
            uses=uses,
            principal=principal,
            name=name,
            metadata=_meta(meta or []) or None,
        )
    if as_json:
        emit_json(body)
    else:
        _show_secret(body, "new token")


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
    as_json: JsonOpt = False,
) -> None:
    """List tokens (never their secrets)."""
    with client(as_json) as c:
        items = call(as_json, c.list_tokens, project=project, state=state)
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
    grace: Annotated[str, typer.Option(help="How long the old token keeps working.")] = "1h",
    as_json: JsonOpt = False,
    output: Annotated[
        str | None,
        typer.Option("--output", help="json, env, dotenv or github (to GITHUB_ENV, masked)."),
    ] = None,
    env_name: Annotated[str, typer.Option("--env-name", help="Variable name.")] = "TOKENWARD_TOKEN",
) -> None:
    """Issue a successor; the old token works until the grace period ends."""
    with client(as_json or output == "json") as c:
        body = call(as_json or output == "json", c.rotate_token, token_id, grace)
    if output is not None:
        from tokenward.cli_oauth import emit_token

        emit_token(output, body, env_name, body.get("expires_at"))
    elif as_json:
        emit_json(body)
    else:
        _show_secret(body, "rotated: new token")
        previous = body["previous"]
        out.print(Text(f"the old token {previous['id']} works until {previous['grace_until']}"))


# Commands that live in their own modules (they import the helpers above).
from tokenward.cli_audit import alerts_app, audit_app, quarantine, release  # noqa: E402

app.add_typer(audit_app, name="audit")
app.add_typer(alerts_app, name="alerts")
token_app.command("quarantine")(quarantine)
token_app.command("release")(release)


def main() -> None:
    app()


# Registers ``token exchange``, ``token auto-rotate``, ``trust …`` and ``project policy``.
import tokenward.cli_oauth  # noqa: E402, F401
