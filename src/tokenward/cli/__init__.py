"""``tokenward …``: set up and run the server, and do every admin action.

One module per command group; :mod:`tokenward.cli.common` holds what they share (the error
handler, the help layout, output helpers, the admin client), :mod:`tokenward.cli.docs`
writes docs/cli.md from this tree (run ``scripts/cli-docs`` after adding a command):

========================  ===============================================================
``server``                ``init``, ``migrate``, ``serve``
``projects``              ``project create|list|allow-ip|policy``
``tokens``                ``token create|list|show|update|disable|enable|revoke|rotate``,
                          ``token quarantine|release``
``identities``            ``identity create|list|show|update|delete`` (owners of tokens)
``exchange``              ``token exchange|auto-rotate`` (short-lived tokens for machines)
``trust``                 ``trust add|list|remove`` (OIDC workload identity)
``audit``                 ``audit list|tail|export|verify|prune``
``alerts``                ``alerts list|show|ack``
``users``                 ``user …`` (dashboard users, on the database directly)
``usage``                 ``usage`` (requests, allowed and denied by reason, over a range)
``webhooks``              ``webhook add|list|remove|test|deliveries`` (lifecycle webhooks)
``scan``                  ``scan PATH… | -`` (find leaked tokens; docs/leaks.md)
========================  ===============================================================

Admin commands talk to a running server: ``TOKENWARD_URL`` and ``TOKENWARD_ADMIN_TOKEN``.
"""

from __future__ import annotations

from typing import Annotated

import typer

from tokenward.cli import exchange as _exchange  # noqa: F401  (registers its token commands)
from tokenward.cli.alerts import alerts_app
from tokenward.cli.audit import audit_app
from tokenward.cli.common import Commands, Group, err, out
from tokenward.cli.identities import identity_app
from tokenward.cli.projects import project_app
from tokenward.cli.scan import scan
from tokenward.cli.server import init, migrate, serve
from tokenward.cli.tokens import token_app
from tokenward.cli.trust import trust_app
from tokenward.cli.usage import usage
from tokenward.cli.users import user_app
from tokenward.cli.webhooks import webhook_app

app = typer.Typer(
    cls=Commands,
    help="tokenward: API tokens for Backend-as-a-Service apps.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # click's plain help: it fits 80 columns, no <bool> on flags
)


def _version(value: bool) -> None:
    if value:
        from tokenward import __version__

        print(f"tokenward {__version__}")
        raise typer.Exit


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """tokenward: API tokens for Backend-as-a-Service apps."""


app.command()(init)
app.command()(migrate)
app.command()(serve)
app.command()(scan)
app.add_typer(project_app, name="project")
app.add_typer(token_app, name="token")
app.add_typer(identity_app, name="identity")
app.add_typer(trust_app, name="trust")
app.add_typer(audit_app, name="audit")
app.add_typer(alerts_app, name="alerts")
app.add_typer(user_app, name="user")
app.command()(usage)
app.add_typer(webhook_app, name="webhook")
# (register command groups above: each gets the help layout of the root)
for _group in app.registered_groups:
    _group.cls = Group


def main() -> None:
    app()


__all__ = ["app", "err", "main", "out"]
