"""``tokenward init``, ``tokenward migrate`` and ``tokenward serve``: set up and run the server."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.panel import Panel
from rich.text import Text

from tokenward.cli.common import DataDir, JsonOpt, emit_json, expected_error, fail, one_line, out


def init(
    data_dir: DataDir = Path(".tokenward"),
    reset: Annotated[
        bool, typer.Option("--reset", help="Revoke the bootstrap admin token, issue a new one.")
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


Port = Annotated[
    int, typer.Option(envvar="TOKENWARD_PORT", help="Port of the API (0: any free port).")
]
GatewayPort = Annotated[
    int,
    typer.Option(envvar="TOKENWARD_GATEWAY_PORT", help="Port of the gateway."),
]


def serve(
    data_dir: DataDir = Path(".tokenward"),
    host: Annotated[
        str,
        typer.Option(
            envvar="TOKENWARD_HOST",
            help="Address to listen on (plain HTTP only on loopback: see --tls-*).",
        ),
    ] = "127.0.0.1",
    port: Port = 8080,
    tls_cert: Annotated[Path | None, typer.Option(help="PEM certificate for HTTPS.")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="PEM private key for HTTPS.")] = None,
    tls_self_signed: Annotated[
        bool, typer.Option("--tls-self-signed", help="Make a development certificate.")
    ] = False,
    allow_insecure_http: Annotated[
        bool,
        typer.Option(
            "--allow-insecure-http",
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
    no_migrate: Annotated[
        bool,
        typer.Option(
            "--no-migrate",
            help="Never migrate: refuse to start on a schema that is behind "
            "(replicas, after 'tokenward migrate').",
        ),
    ] = False,
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
        migrate_on_start=False if no_migrate else None,
    )
    configure_logging(settings.log_level)
    if init_first and not settings.migrate_on_start:
        fail("--init migrates the database: give --init or --no-migrate, not both", 2)
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
    """The server key loads and the database answers (else the server would fail at start);
    for a server that does not migrate (``--no-migrate``), the schema is not behind."""
    from tokenward.settings import load_hasher
    from tokenward.store.engine import SchemaBehind, create_engine, require_current_schema

    try:
        load_hasher(settings)
    except ValueError as exc:
        fail(str(exc), 2)

    async def probe() -> None:
        engine = create_engine(settings.resolved_database_url)
        try:
            async with engine.connect():
                pass
            if not settings.migrate_on_start:
                await require_current_schema(engine)
        finally:
            await engine.dispose()

    try:
        asyncio.run(probe())
    except SchemaBehind as exc:
        fail(str(exc), 2, error="schema_behind")
    except Exception as exc:
        if expected_error(exc) is None:
            raise
        reason = one_line(getattr(exc, "orig", None) or exc)
        fail(f"cannot use the database {_safe_db(settings)}: {reason}", 3, error="database_error")


def migrate(data_dir: DataDir = Path(".tokenward"), as_json: JsonOpt = False) -> None:
    """Apply the pending database migrations, then exit.

    Run it once before starting replicas with 'serve --no-migrate', and again at each upgrade,
    before restarting them. A database a newer version migrated is left as it is.
    """
    from tokenward.settings import Settings
    from tokenward.store.engine import create_engine, schema_status
    from tokenward.store.engine import migrate as apply_migrations

    settings = Settings.load(data_dir=data_dir)
    database = _safe_db(settings)

    async def run() -> tuple[Any, Any]:
        engine = create_engine(settings.resolved_database_url, bounded=False)
        try:
            before = await schema_status(engine)
            if before.pending:
                await apply_migrations(engine)
            return before, await schema_status(engine)
        finally:
            await engine.dispose()

    try:
        before, after = asyncio.run(run())
    except Exception as exc:
        if expected_error(exc) is None:
            raise
        reason = one_line(getattr(exc, "orig", None) or exc)
        fail(
            f"cannot use the database {database}: {reason}",
            3,
            as_json=as_json,
            error="database_error",
        )
    applied = [r for r in before.pending if r not in after.pending]
    if as_json:
        emit_json(
            {
                "database": database,
                "applied": applied,
                "pending": list(after.pending),
                "newer": list(after.unknown),
            }
        )
        return
    if applied:
        out.print(
            Text(
                f"applied {len(applied)} migration{'s' if len(applied) > 1 else ''} to "
                f"{database}: {', '.join(applied)}"
            ),
            soft_wrap=True,
        )
    elif after.unknown:
        out.print(
            Text(
                f"nothing to apply: {database} was migrated by a newer version of tokenward "
                f"({', '.join(after.unknown)})"
            ),
            soft_wrap=True,
        )
    else:
        out.print(Text(f"the database schema is up to date ({database})"), soft_wrap=True)
