"""``tokenward user add|list|remove|reset-mfa|set-password``: dashboard users, on the database.

Like ``tokenward init``, these work on the data dir / database directly (``--data-dir`` or
``TOKENWARD_DATABASE_URL``), so an operator can always get back in, even with no owner left
who can sign in.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from tokenward.cli.common import DataDir, JsonOpt, fail, out
from tokenward.errors import TokenwardError

user_app = typer.Typer(help="Dashboard users.", no_args_is_help=True)
T = TypeVar("T")


def _run(data_dir: Path, as_json: bool, action: Callable[[Any], Awaitable[T]]) -> T:
    from tokenward.dashboard.accounts import Accounts
    from tokenward.dashboard.security import DashboardKeys
    from tokenward.settings import Settings, load_hasher
    from tokenward.store.engine import create_engine, migrate

    async def main() -> T:
        settings = Settings.load(data_dir=data_dir)
        hasher = load_hasher(settings)  # first: an uninitialized data dir says so
        engine = create_engine(settings.resolved_database_url)
        try:
            await migrate(engine)
            return await action(Accounts(engine, DashboardKeys(hasher)))
        finally:
            await engine.dispose()

    try:
        return asyncio.run(main())
    except TokenwardError as exc:
        fail(exc.message, 1, as_json=as_json, error=exc.code)
    except FileNotFoundError as exc:
        fail(str(exc), 1, as_json=as_json, error="not_initialized")


def _user_dict(user: Any, names: dict[str, str]) -> dict[str, Any]:
    return {
        "id": user.id,
        "login": user.login,
        "role": user.role.value,
        "mfa_enrolled": user.mfa_enrolled,
        "projects": [names.get(p, p) for p in user.project_ids],
        "created_at": user.created_at.isoformat().replace("+00:00", "Z"),
    }


async def _project_ids(accounts: Any, names: list[str]) -> list[str]:
    from tokenward.errors import NotFound
    from tokenward.store.repository import TokenStore

    store = TokenStore(accounts.engine)
    ids = []
    for name in names:
        project = await store.get_project(name)
        if project is None:
            raise NotFound("project_not_found", f"no project named {name!r}")
        ids.append(project.id)
    return ids


async def _names(accounts: Any) -> dict[str, str]:
    from tokenward.store.repository import TokenStore

    return {p.id: p.name for p in await TokenStore(accounts.engine).list_projects()}


@user_app.command("add")
def add(
    login: str,
    role: Annotated[Literal["owner", "admin", "viewer"], typer.Option(help="Role.")] = "viewer",
    project: Annotated[
        list[str] | None, typer.Option("--project", help="Project it may see (repeatable).")
    ] = None,
    data_dir: DataDir = Path(".tokenward"),
    as_json: JsonOpt = False,
) -> None:
    """Add a user; prints a generated password once (MFA is set up at first sign-in)."""

    async def action(accounts: Any) -> tuple[dict[str, Any], str]:
        ids = await _project_ids(accounts, project or [])
        user, password = await accounts.create_user(login, role, project_ids=ids)
        return _user_dict(user, await _names(accounts)), password

    user, password = _run(data_dir, as_json, action)
    if as_json:
        print(json.dumps({**user, "password": password}, indent=2))
    else:
        out.print(
            f"added [bold]{escape(user['login'])}[/bold] ({escape(user['role'])})\n"
            f"password: [bold]{escape(password)}[/bold]  (shown once; MFA is set up at first "
            "sign-in)",
            highlight=False,
        )


@user_app.command("list")
def list_users(data_dir: DataDir = Path(".tokenward"), as_json: JsonOpt = False) -> None:
    """List users, their roles and projects."""

    async def action(accounts: Any) -> list[dict[str, Any]]:
        names = await _names(accounts)
        return [_user_dict(u, names) for u in await accounts.list_users()]

    users = _run(data_dir, as_json, action)
    if as_json:
        print(json.dumps(users, indent=2))
        return
    table = Table("login", "role", "projects", "mfa")
    for column in table.columns:
        column.overflow = "fold"
    table.add_column("id", no_wrap=True, min_width=20)  # never cut: ids are copied
    for u in users:
        cells = (
            u["login"],
            u["role"],
            ", ".join(u["projects"]) or ("all" if u["role"] == "owner" else "-"),
            "yes" if u["mfa_enrolled"] else "no",
            u["id"],
        )
        table.add_row(*(Text(cell) for cell in cells))  # data, never read as markup
    out.print(table)


@user_app.command("remove")
def remove(login: str, data_dir: DataDir = Path(".tokenward"), as_json: JsonOpt = False) -> None:
    """Remove a user (never the last owner) and end their sessions."""

    async def action(accounts: Any) -> None:
        await accounts.remove_user(login)

    _run(data_dir, as_json, action)
    if as_json:
        print(json.dumps({"removed": login}))
    else:
        out.print(Text(f"removed {login}"))


@user_app.command("reset-mfa")
def reset_mfa(login: str, data_dir: DataDir = Path(".tokenward"), as_json: JsonOpt = False) -> None:
    """Forget a user's authenticator and recovery codes; they enrol again at next sign-in."""

    async def action(accounts: Any) -> None:
        await accounts.reset_mfa(login)

    _run(data_dir, as_json, action)
    if as_json:
        print(json.dumps({"mfa_reset": login}))
    else:
        out.print(Text(f"two-factor sign-in of {login} reset; they enrol again at next sign-in"))


@user_app.command("set-password")
def set_password(
    login: str, data_dir: DataDir = Path(".tokenward"), as_json: JsonOpt = False
) -> None:
    """Give a user a new generated password (printed once) and end their sessions."""

    async def action(accounts: Any) -> str:
        result: str = await accounts.set_password(login)
        return result

    password = _run(data_dir, as_json, action)
    if as_json:
        print(json.dumps({"login": login, "password": password}))
    else:
        out.print(
            f"new password of {escape(login)}: [bold]{escape(password)}[/bold] (shown once)",
            highlight=False,
        )
