"""``tokenward audit …``: read the audit log, follow it, export it, check its chain.

``audit verify`` and ``audit prune`` run next to the database (like ``init``): checking the
chain must not depend on the server being checked. Everything else talks to the server.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from tokenward.cli.common import (
    DataDir,
    JsonOpt,
    add_row,
    call,
    client,
    emit_json,
    fail,
    id_column,
    out,
)

audit_app = typer.Typer(help="The audit log.", no_args_is_help=True)

#: Seconds the live tail stays behind the present, so that an event another writer commits a
#: moment later than a newer one is not skipped (the log merges the writers' chains by time).
TAIL_SETTLE = 1.0

Project = Annotated[str | None, typer.Option(help="Only this project.")]
TokenId = Annotated[str | None, typer.Option("--token", help="Only this token id.")]
Principal = Annotated[str | None, typer.Option(help="Only this principal.")]
Decision = Annotated[Literal["allow", "deny"] | None, typer.Option(help="Only this decision.")]
ReasonOpt = Annotated[str | None, typer.Option(help="Only this reason (e.g. revoked).")]
IP = Annotated[str | None, typer.Option("--ip", help="Only this client IP.")]
Since = Annotated[str | None, typer.Option(help="ISO 8601 time, or an age such as 1h, 7d.")]
Until = Annotated[str | None, typer.Option(help="ISO 8601 time, or an age such as 1h.")]


def _when(value: str | None) -> str | None:
    """An ISO time, or an age (``15m``, ``2h``, ``7d``) meaning that long ago."""
    if value is None:
        return None
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if value[:-1].isdigit() and value[-1:] in units:
        at = datetime.now(UTC) - timedelta(seconds=int(value[:-1]) * units[value[-1]])
        return at.isoformat()
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        fail(f"not a time or an age: {value!r}", 2)
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).isoformat()


def _filters(**kw: Any) -> dict[str, Any]:
    kw["since"], kw["until"] = _when(kw.get("since")), _when(kw.get("until"))
    return {k: v for k, v in kw.items() if v is not None}


def _event_table(events: list[dict[str, Any]]) -> Table:
    table = Table("seq")
    for header in ("at", "action", "decision", "reason"):
        table.add_column(header, overflow="fold")
    id_column(table, "token")  # an id is never cut: it is copied into the next command
    for header in ("principal", "ip", "req"):
        table.add_column(header, overflow="fold")
    for e in events:
        add_row(
            table,
            e["seq"],
            e["at"][:23],
            e["action"],
            e["decision"] or "",
            e["reason"] or "",
            e["token_id"] or e["fingerprint"] or "",
            e["principal"] or e["actor_id"] or "",
            e["client_ip"] or "",
            e["request_id"] or "",
        )
    return table


@audit_app.command("list")
def audit_list(
    project: Project = None,
    token: TokenId = None,
    principal: Principal = None,
    decision: Decision = None,
    reason: ReasonOpt = None,
    ip: IP = None,
    since: Since = None,
    until: Until = None,
    limit: Annotated[int, typer.Option(min=1, max=1000)] = 50,
    cursor: Annotated[str | None, typer.Option(help="next_cursor of a previous page.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Audit events, newest first (one page; the next page's cursor is printed)."""
    params = _filters(
        project=project,
        token=token,
        principal=principal,
        decision=decision,
        reason=reason,
        ip=ip,
        since=since,
        until=until,
        limit=limit,
        cursor=cursor,
    )
    with client(as_json) as c:
        page = call(as_json, c.audit_page, **params)
    if as_json:
        emit_json(page)
        return
    out.print(_event_table(page["events"]))
    if page["next_cursor"]:
        out.print(Text(f"more: --cursor {page['next_cursor']}"), soft_wrap=True)


@audit_app.command("tail")
def audit_tail(
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new events.")
    ] = False,
    project: Project = None,
    token: TokenId = None,
    decision: Decision = None,
    reason: ReasonOpt = None,
    ip: IP = None,
    lines: Annotated[int, typer.Option("-n", min=1, max=1000, help="Events to show first.")] = 20,
    interval: Annotated[float, typer.Option(help="Seconds between polls.")] = 1.0,
    as_json: JsonOpt = False,
) -> None:
    """The newest events; with -f, follow new ones as they are written (Ctrl-C stops)."""
    params = _filters(project=project, token=token, decision=decision, reason=reason, ip=ip)

    def show(events: list[dict[str, Any]]) -> None:
        for e in events:
            if as_json:
                print(json.dumps(e, separators=(",", ":")), flush=True)
            else:
                line = (
                    f"{e['at'][:23]} {e['chain'][:8]}#{e['seq']} {e['action']} "
                    f"{e['decision'] or ''} {e['reason'] or ''} "
                    f"{e['token_id'] or e['fingerprint'] or '-'} "
                    f"{e['client_ip'] or '-'} {e['request_id'] or ''}"
                )
                out.print(Text(line), soft_wrap=True)

    def settled() -> str:
        # Writers commit their chains independently: an event is shown once the events of
        # every writer up to its time are written (well within the settling time).
        return (datetime.now(UTC) - timedelta(seconds=TAIL_SETTLE)).isoformat()

    with client(as_json) as c:
        page = call(as_json, c.audit_page, limit=lines, **params)
        events = list(reversed(page["events"]))
        show(events)
        last = events[-1]["cursor"] if events else None
        try:
            while follow:
                time.sleep(interval)
                while True:
                    extra = {"cursor": last} if last else {}
                    page = call(
                        as_json,
                        c.audit_page,
                        order="asc",
                        limit=500,
                        until=settled(),
                        **extra,
                        **params,
                    )
                    show(page["events"])
                    if page["events"]:
                        last = page["events"][-1]["cursor"]
                    if not page["next_cursor"]:
                        break
        except KeyboardInterrupt:
            return


@audit_app.command("export")
def audit_export(
    project: Project = None,
    token: TokenId = None,
    decision: Decision = None,
    reason: ReasonOpt = None,
    ip: IP = None,
    since: Since = None,
    until: Until = None,
    output: Annotated[
        Path | None, typer.Option("-o", help="File to write (default stdout).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Every matching event, oldest first, as JSON lines.

    The events are JSON lines in any case; --json makes errors and the summary of -o JSON.
    """
    params = _filters(
        project=project,
        token=token,
        decision=decision,
        reason=reason,
        ip=ip,
        since=since,
        until=until,
    )
    with client(as_json) as c:
        stream = call(as_json, lambda: list(c.audit_export(**params)))
    text = "".join(line + "\n" for line in stream if line)
    if output is None:
        print(text, end="")
        return
    try:
        output.write_text(text, encoding="utf-8")
    except OSError as exc:
        fail(f"cannot write {output}: {exc.strerror or exc}", 1, as_json=as_json, error="os_error")
    if as_json:
        emit_json({"events": text.count("\n"), "file": str(output)})
    else:
        out.print(Text(f"wrote {text.count(chr(10))} events to {output}"))


@audit_app.command("verify")
def audit_verify(
    data_dir: DataDir = Path(".tokenward"),
    anchor: Annotated[
        list[str] | None,
        typer.Option(
            help="A head printed by an earlier verify (chain:seq:hash; repeat for several)."
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Walk every writer's hash chain and cross-check their checkpoints; exit 1 when an
    event was edited, deleted or reordered, a chain truncated or removed."""
    from tokenward.audit.chain import parse_anchor, verify_chain
    from tokenward.audit.records import ChainKeys
    from tokenward.settings import Settings, load_hasher
    from tokenward.store.engine import create_engine

    anchors = []
    for text in anchor or []:
        parsed = parse_anchor(text)
        if parsed is None:
            fail(
                "--anchor wants chain:seq:hash as printed by a previous verify", 2, as_json=as_json
            )
        anchors.append(parsed)
    settings = Settings.load(data_dir=data_dir)

    async def run() -> dict[str, Any]:
        engine = create_engine(settings.resolved_database_url, bounded=False)
        try:
            report = await verify_chain(
                engine, ChainKeys.from_hasher(load_hasher(settings)), anchors=anchors
            )
        finally:
            await engine.dispose()
        return report.public()

    report = asyncio.run(run())
    if as_json:
        emit_json(report)
    else:
        _print_verify(report)
    if not report["ok"]:
        raise typer.Exit(1)


def _print_verify(report: dict[str, Any]) -> None:
    for chain in report["chains"]:
        name = escape(str(chain["chain"]))
        if not chain["ok"]:
            problem, message = escape(str(chain["problem"])), escape(str(chain["message"]))
            out.print(f"[red]{problem}[/red]: chain {name}: {message}", highlight=False)
            continue
        state = "closed" if chain["status"] == "closed" else "open"
        tail = f", {chain['unverified']} after its last checkpoint" if chain["unverified"] else ""
        base = f", from prune base {chain['base_seq']}" if chain["base_seq"] else ""
        out.print(
            f"[green]ok[/green] chain {name} ({state}): {chain['checked']} events{base}{tail}",
            highlight=False,
        )
    if report["ok"]:
        chains = len(report["chains"])
        out.print(
            f"[green]ok[/green]: {report['checked']} events in {chains} chain(s) chained intact",
            highlight=False,
        )
        for head in report["heads"]:  # one line each, never wrapped: it is copied back
            out.print(Text(f"head: {head}"), soft_wrap=True)


@audit_app.command("prune")
def audit_prune(
    older_than: Annotated[str, typer.Option(help="Age of events to delete, e.g. 90d.")],
    data_dir: DataDir = Path(".tokenward"),
    as_json: JsonOpt = False,
) -> None:
    """Delete old events; a checkpoint keeps the rest verifiable."""
    from tokenward.audit.chain import prune
    from tokenward.settings import Settings
    from tokenward.store.engine import create_engine

    before = _when(older_than)
    assert before is not None
    settings = Settings.load(data_dir=data_dir)

    async def run() -> dict[str, Any]:
        engine = create_engine(settings.resolved_database_url, bounded=False)
        try:
            result = await prune(engine, datetime.fromisoformat(before), datetime.now(UTC))
        finally:
            await engine.dispose()
        return {"pruned": result.pruned, "cuts": result.cuts}

    result = asyncio.run(run())
    if as_json:
        emit_json(result)
    else:
        cuts = ", ".join(f"{chain} at {seq}" for chain, seq in sorted(result["cuts"].items()))
        out.print(
            Text(f"pruned {result['pruned']} events" + (f" (chains cut: {cuts})" if cuts else ""))
        )
