"""``tokenward token …``: create, list, show, update, disable/enable, revoke, rotate,
quarantine and release tokens."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated, Any

import typer
from rich import box
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
from tokenward.tokens.model import CANARY_SCOPE, TokenKind, TokenState

token_app = typer.Typer(
    help="Tokens: create, list, show, update, disable, enable, revoke, rotate.",
    no_args_is_help=True,
)

#: the choices of ``--state``, ``--kind`` and ``--env`` (shown by ``--help``, checked by click)
StateChoice = StrEnum("StateChoice", {s.name: s.value for s in TokenState})  # type: ignore[misc]
KindChoice = StrEnum("KindChoice", {k.name: k.value for k in TokenKind})  # type: ignore[misc]


class EnvChoice(StrEnum):
    LIVE = "live"
    TEST = "test"


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


def _moment(value: str | None, sign: int, flag: str) -> str | None:
    """An ISO time, or a duration from now (``sign`` 1: ahead, -1: ago) such as 7d, 12h."""
    if value is None:
        return None
    units = {"m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
    if value[:-1].isdigit() and value[-1:] in units:
        seconds = int(value[:-1]) * units[value[-1]]
        return (datetime.now(UTC) + sign * timedelta(seconds=seconds)).isoformat()
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        fail(f"{flag}: not a time nor a duration such as 7d: {value!r}", 2)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.isoformat()


def shown_state(t: dict[str, Any]) -> str:
    """The state a person needs first: a hold (disabled, quarantined) over a live state."""
    state = str(t.get("state", ""))
    if state in ("active", "not_yet_valid", "rotated_in_grace"):
        if t.get("disabled_at"):
            return "disabled"
        if t.get("quarantined_at"):
            return "quarantined"
    return state


def short_scopes(scopes: list[str]) -> str:
    """The first scope, and how many more (the whole list: ``--wide`` or ``show``)."""
    if not scopes:
        return "-"
    return scopes[0] + (f" +{len(scopes) - 1}" if len(scopes) > 1 else "")


def _day(value: str | None) -> str:
    return value[:10] if value else "never"


def compact_table(items: list[dict[str, Any]], width: int) -> Table:
    """One line a token, fit for ``width`` columns (80 and up): id (never cut), name, state,
    scopes, expiry.

    The id, state and expiry keep their width; the scopes take at most 24 and the name what
    is left, each cut with an ellipsis when too long (``--wide`` and ``show`` have them whole).
    """
    rows = [
        (
            t["id"],
            t["name"] or "-",
            shown_state(t),
            short_scopes(t["scopes"]),
            _day(t["expires_at"]),
        )
        for t in items
    ]

    def widest(index: int, header: str) -> int:
        return max([len(header), *(len(r[index]) for r in rows)])

    state_width, expires_width = widest(2, "state"), widest(4, "expires")
    scopes_width = min(widest(3, "scopes"), 24)
    # every column costs two characters of padding and edge
    name_width = max(width - 20 - state_width - scopes_width - expires_width - 2 * 5, 8)
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    id_column(table)
    table.add_column("name", no_wrap=True, overflow="ellipsis", max_width=name_width)
    table.add_column("state", no_wrap=True, min_width=state_width)
    table.add_column(
        "scopes", no_wrap=True, overflow="ellipsis", max_width=scopes_width, min_width=6
    )
    table.add_column("expires", no_wrap=True, min_width=expires_width)
    for row in rows:
        add_row(table, *row)
    return table


def wide_table(items: list[dict[str, Any]]) -> Table:
    table = Table()
    id_column(table)
    headers = ("project", "env", "kind", "name", "principal", "state", "scopes", "expires")
    for header in (*headers, "last used", "hint"):
        table.add_column(header, overflow="fold")
    for t in items:
        add_row(
            table,
            t["id"],
            t["project"] or "-",
            t["environment"],
            t["kind"],
            t["name"],
            t["principal"],
            shown_state(t),
            " ".join(t["scopes"]),
            t["expires_at"] or "never",
            t["last_used_at"] or "never",
            t["hint"],
        )
    return table


@token_app.command("list")
def token_list(
    project: Annotated[str | None, typer.Option(help="Only this project.")] = None,
    name: Annotated[str | None, typer.Option("--name", help="Name starts with this.")] = None,
    principal: Annotated[str | None, typer.Option(help="Acts as this principal.")] = None,
    meta: Annotated[
        list[str] | None, typer.Option("--meta", help="Metadata key=value (repeatable).")
    ] = None,
    state: Annotated[StateChoice | None, typer.Option(help="In this state.")] = None,
    kind: Annotated[KindChoice | None, typer.Option(help="Of this kind.")] = None,
    env: Annotated[EnvChoice | None, typer.Option("--env", help="In this environment.")] = None,
    expires_before: Annotated[
        str | None, typer.Option(help="Expires before: ISO time, or from now (7d).")
    ] = None,
    unused_for: Annotated[
        str | None,
        typer.Option(help="Not used (never used: made) for this long (30d), or since an ISO time."),
    ] = None,
    identity: Annotated[
        str | None, typer.Option(help="Only this identity's (its external id).")
    ] = None,
    disabled: Annotated[
        bool | None, typer.Option("--disabled/--enabled", help="Only disabled (enabled) ones.")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="At most this many.", min=1)] = None,
    wide: Annotated[bool, typer.Option("--wide", help="Every column.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """List tokens (never their secrets), newest first; every filter is applied by the server."""
    filters: dict[str, Any] = {
        "name_prefix": name,
        "principal": principal,
        "kind": kind.value if kind else None,
        "environment": env.value if env else None,
        "expires_before": _moment(expires_before, 1, "--expires-before"),
        "last_used_before": _moment(unused_for, -1, "--unused-for"),
        "disabled": disabled,
        "identity": identity,
        "metadata": parse_meta(meta or []) or None,
    }
    with client(as_json) as c:

        def fetch() -> list[dict[str, Any]]:
            tokens = c.iter_tokens(
                project,
                state=state.value if state else None,
                limit=min(limit or 1000, 1000),
                **{k: v for k, v in filters.items() if v is not None},
            )
            items: list[Any] = []
            for item in tokens:
                items.append(item)
                if limit is not None and len(items) >= limit:
                    break
            return items

        items = call(as_json, fetch)
    if as_json:
        emit_json(items)
    else:
        out.print(wide_table(items) if wide else compact_table(items, out.width))


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


@token_app.command("update")
def token_update(
    token_id: str,
    name: Annotated[str | None, typer.Option(help="A new label.")] = None,
    scope: Annotated[
        list[str] | None,
        typer.Option("--scope", help="The new scopes, fewer than now (repeatable)."),
    ] = None,
    expires_at: Annotated[
        str | None, typer.Option(help="An earlier expiry: ISO time, or from now (7d).")
    ] = None,
    ip: Annotated[
        list[str] | None, typer.Option("--ip", help="The new allowed CIDRs (repeatable).")
    ] = None,
    any_ip: Annotated[bool, typer.Option("--any-ip", help="Remove the IP allowlist.")] = False,
    rate: Annotated[
        list[str] | None,
        typer.Option("--rate", help="The new rate limit, 100/minute (repeatable)."),
    ] = None,
    no_rate: Annotated[bool, typer.Option("--no-rate", help="Remove the rate limit.")] = False,
    uses: Annotated[int | None, typer.Option(help="Fewer remaining uses.", min=0)] = None,
    meta: Annotated[
        list[str] | None, typer.Option("--meta", help="Set metadata key=value (repeatable).")
    ] = None,
    drop_meta: Annotated[
        list[str] | None, typer.Option("--drop-meta", help="Remove a metadata key (repeatable).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Change a token: name, metadata, IP allowlist, rate limit; scopes, expiry and uses only
    ever shrink (the server refuses a widening and names the field)."""
    if ip and any_ip:
        fail("give --ip or --any-ip, not both", 2, as_json=as_json)
    if rate and no_rate:
        fail("give --rate or --no-rate, not both", 2, as_json=as_json)
    changes: dict[str, Any] = {
        "name": name,
        "scopes": scope or None,
        "expires_at": _moment(expires_at, 1, "--expires-at"),
        "ip_allowlist": [] if any_ip else (ip or None),
        "rate_limit": "" if no_rate else (";".join(rate) if rate else None),
        "uses": uses,
    }
    with client(as_json) as c:
        if meta or drop_meta:
            current = call(as_json, c.get_token, token_id)["metadata"]
            merged = {**current, **parse_meta(meta or [])}
            for key in drop_meta or []:
                merged.pop(key, None)
            changes["metadata"] = merged
        if all(v is None for v in changes.values()):
            fail("nothing to change: give at least one option (see --help)", 2, as_json=as_json)
        body = call(as_json, c.update_token, token_id, **changes)
    emit_record(body, as_json)


@token_app.command("disable")
def token_disable(
    token_id: str,
    reason: Annotated[str, typer.Option(help="Why (kept with the token).")] = (
        "disabled by an admin"
    ),
    as_json: JsonOpt = False,
) -> None:
    """Switch a token off now, on every replica (reversible with 'token enable')."""
    with client(as_json) as c:
        body = call(as_json, c.disable_token, token_id, reason)
    if as_json:
        emit_json(body)
    else:
        out.print(
            Text(f"disabled {body['id']} at {body['disabled_at']}: {body['disabled_reason']}")
        )


@token_app.command("enable")
def token_enable(
    token_id: str,
    note: Annotated[str, typer.Option(help="Why it may work again.")] = "",
    as_json: JsonOpt = False,
) -> None:
    """Switch a disabled token on again."""
    with client(as_json) as c:
        body = call(as_json, c.enable_token, token_id, note)
    if as_json:
        emit_json(body)
    else:
        out.print(Text(f"enabled {body['id']}: it works again"))
