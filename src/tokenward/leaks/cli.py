"""``tokenward scan PATH… | -``: find tokenward tokens in files, trees, stdin, git history.

Exit codes: 0 nothing found, 1 found, 2 usage error (3: the server, needed by ``--revoke``,
cannot be reached). With ``TOKENWARD_ADMIN_TOKEN`` set, each token found is looked up on
the server (``POST /v1/tokens/lookup``: the secret travels in a request body only) and its
id, project and state are shown; the secret itself is never printed, only its hint.

The command lives here, outside :mod:`tokenward.cli`, and imports the admin client only
when it talks to a server: a pre-commit hook runs it on every commit, and ``tokenward
scan`` starts without the rest of the CLI (:func:`main`, dispatched by ``tokenward``'s
entry point). :mod:`tokenward.cli.scan` registers the same function in the full CLI.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.text import Text

from tokenward.leaks.scanner import (
    Finding,
    GitError,
    ScanStats,
    files_under,
    scan_git_history,
    scan_paths,
    scan_stream,
)

#: a progress bar only for work this large (and only on a terminal)
PROGRESS_FILES = 2_000
PROGRESS_BYTES = 50_000_000
#: states in which a found token still works, so ``--revoke`` acts on it
LIVE_STATES = frozenset({"active", "not_yet_valid", "rotated_in_grace"})


out = Console(emoji=False)
err = Console(stderr=True, emoji=False)
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable JSON output.")]


def fail(message: str, code: int = 1, *, as_json: bool = False, error: str = "error") -> NoReturn:
    """The CLI's error line (as :func:`tokenward.cli.common.fail`), without its imports."""
    if as_json:
        print(json.dumps({"error": error, "message": message}), file=sys.stderr)
    else:
        err.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def emit_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


class Format(StrEnum):
    TEXT = "text"
    JSON = "json"
    SARIF = "sarif"


def scan(
    paths: Annotated[
        list[str] | None,
        typer.Argument(help="Files or folders to scan; - for standard input.", show_default=False),
    ] = None,
    git: Annotated[
        bool, typer.Option("--git", help="Scan the git history of each folder given (or .).")
    ] = False,
    include_all: Annotated[
        bool, typer.Option("--all", help="Include files .gitignore excludes.")
    ] = False,
    binary: Annotated[bool, typer.Option("--binary", help="Scan binary files too.")] = False,
    output_format: Annotated[
        Format, typer.Option("--format", help="text, json or sarif (SARIF 2.1.0).")
    ] = Format.TEXT,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write the report to this file.")
    ] = None,
    revoke: Annotated[
        bool,
        typer.Option("--revoke", help="Revoke or quarantine what is found (project policy)."),
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask before --revoke acts.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Find tokenward tokens (checksum confirmed: no false positives); never prints one."""
    fmt = Format.JSON if as_json else output_format
    machine = fmt != Format.TEXT
    targets = list(paths or [])
    if not targets:
        if not git:
            fail("give one or more files or folders, or - for standard input", 2, as_json=machine)
        targets = ["."]
    if git and "-" in targets:
        fail("--git reads repositories, not standard input", 2, as_json=machine)
    if revoke and not yes and ("-" in targets or not sys.stdin.isatty()):
        fail("--revoke asks before it acts: add --yes to go ahead", 2, as_json=machine)
    if revoke and not os.environ.get("TOKENWARD_ADMIN_TOKEN"):
        fail("--revoke needs TOKENWARD_URL and TOKENWARD_ADMIN_TOKEN", 2, as_json=machine)
    for target in targets:
        if target != "-" and not Path(target).exists():
            fail(f"no such file or folder: {target}", 2, as_json=machine)
        if git and not Path(target).is_dir():
            fail(f"--git wants a repository folder: {target}", 2, as_json=machine)

    stats = ScanStats()
    try:
        findings = _scan(targets, git=git, include_all=include_all, binary=binary, stats=stats)
    except GitError as exc:
        fail(f"git: {exc}", 2, as_json=machine, error="git_error")
    known = _look_up(findings, machine, required=revoke)
    responses: list[dict[str, Any]] = []
    if revoke:
        responses = _respond(findings, known, yes=yes, machine=machine)
    _report(fmt, output, findings, known, stats, responses)
    raise typer.Exit(1 if findings else 0)


# -- scanning -----------------------------------------------------------------------------
def _scan(
    targets: list[str], *, git: bool, include_all: bool, binary: bool, stats: ScanStats
) -> list[Finding]:
    findings: list[Finding] = []
    if git:
        for target in targets:
            with _progress(None) as advance:
                findings.extend(scan_git_history(Path(target), stats, advance))
        return findings
    files: list[tuple[str, str]] = []
    for target in targets:
        if target == "-":
            findings.extend(scan_stream(sys.stdin.buffer, "-", stats))
            continue
        if os.path.isdir(target):
            listed = files_under(Path(target), include_ignored=include_all)
            files.extend((f, _display(f)) for f in listed)
        else:
            files.append((target, _display(target)))
    total = sum(_size(f) for f, _ in files) if len(files) >= PROGRESS_FILES else 0
    show = len(files) >= PROGRESS_FILES or total >= PROGRESS_BYTES
    with _progress(total if show else 0) as advance:
        findings.extend(scan_paths(files, stats, binary=binary, progress=advance))
    return findings


def _display(path: str) -> str:
    """The path as reports show it: as given (``./`` dropped), with forward slashes."""
    path = path.replace(os.sep, "/") if os.sep != "/" else path
    return path[2:] if path.startswith("./") else path


def _size(path: str) -> int:
    try:
        return os.stat(path).st_size
    except OSError:
        return 0


@contextmanager
def _progress(total: int | None) -> Iterator[Callable[[int], None] | None]:
    """A progress bar on stderr, on a terminal only; ``total`` 0: none, ``None``: unknown."""
    if total == 0 or not err.is_terminal:
        yield None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn

    columns = [BarColumn(), DownloadColumn(), TimeRemainingColumn()]
    with Progress("scanning", *columns, console=err, transient=True) as progress:
        task = progress.add_task("scan", total=total)
        yield lambda n: progress.advance(task, n)


# -- the server ---------------------------------------------------------------------------
def _look_up(findings: list[Finding], machine: bool, *, required: bool) -> dict[str, Any]:
    """secret → what the server says of it ({} without server access)."""
    if not findings or not os.environ.get("TOKENWARD_ADMIN_TOKEN"):
        return {}
    import httpx

    from tokenward.cli.common import call, client
    from tokenward_client import AdminAPIError

    secrets = list(dict.fromkeys(f.token for f in findings))
    with client(machine) as admin:
        try:
            answers = admin.lookup_tokens(secrets)
        except (AdminAPIError, httpx.HTTPError, ValueError) as exc:
            if required:
                call(machine, _raise, exc)  # the usual error line and exit code
            reason = exc.message if isinstance(exc, AdminAPIError) else type(exc).__name__
            err.print(Text(f"warning: no lookup on the server ({reason})", style="yellow"))
            return {}
    return {s: a for s, a in zip(secrets, answers, strict=False) if a.get("found")}


def _raise(exc: Exception) -> None:
    raise exc


def _respond(
    findings: list[Finding], known: dict[str, Any], *, yes: bool, machine: bool
) -> list[dict[str, Any]]:
    first: dict[str, Finding] = {}
    for finding in findings:
        first.setdefault(finding.token, finding)
    targets = [
        (known[s], first[s])
        for s in first
        if s in known and known[s].get("state") in LIVE_STATES and known[s].get("kind") != "canary"
    ]
    if not targets:
        return []
    from tokenward.cli.common import call, client

    if not yes:
        names = ", ".join(info["id"] for info, _ in targets)
        question = f"Revoke or quarantine (per project policy) {len(targets)} token(s): {names}?"
        if not typer.confirm(question, err=True):
            fail("nothing changed", 2, as_json=machine, error="not_confirmed")
    responses = []
    with client(machine) as admin:
        for info, finding in targets:
            body = call(machine, admin.report_leaked, info["id"], finding.location)
            responses.append({"id": info["id"], "action": body.get("action")})
    return responses


# -- output -------------------------------------------------------------------------------
def _entry(finding: Finding, info: dict[str, Any] | None) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "path": finding.path,
        "line": finding.line,
        "column": finding.column,
        "hint": finding.hint,
    }
    if finding.blob:
        entry["git_object"] = finding.blob
    entry["token"] = (
        {k: info.get(k) for k in ("id", "project", "state", "kind", "name")} if info else None
    )
    return entry


def _summary(findings: list[Finding], stats: ScanStats) -> dict[str, Any]:
    return {
        "found": len(findings),
        "distinct_tokens": len({f.token for f in findings}),
        "files": stats.files,
        "git_objects": stats.git_objects,
        "bytes": stats.bytes,
        "binary_skipped": stats.binary_skipped,
        "unreadable": stats.unreadable,
    }


def _report(
    fmt: Format,
    output: Path | None,
    findings: list[Finding],
    known: dict[str, Any],
    stats: ScanStats,
    responses: list[dict[str, Any]],
) -> None:
    if fmt == Format.TEXT:
        lines = []
        for finding in findings:
            info = known.get(finding.token)
            said = ""
            if info:
                said = f"  {info['id']}  {info.get('project') or '-'}  {info.get('state')}"
                if info.get("kind") == "canary":
                    said += "  (canary)"
            lines.append(f"{finding.location}  {finding.hint}{said}")
        for response in responses:
            lines.append(f"{response['id']}: {response['action']}")
        if output is not None:
            _write(output, "".join(line + "\n" for line in lines))
        else:
            for line in lines:
                out.print(Text(line), soft_wrap=True)
        summary = _summary(findings, stats)
        what = (
            f"{summary['files']} files"
            if not stats.git_objects
            else (f"{stats.git_objects} git objects")
        )
        skipped = f"; {stats.binary_skipped} binary skipped" if stats.binary_skipped else ""
        err.print(
            Text(
                f"{summary['distinct_tokens']} token(s) found in {summary['found']} place(s); "
                f"scanned {what}, {stats.bytes / 1e6:.1f} MB{skipped}"
            )
        )
        return
    if fmt == Format.SARIF:
        from tokenward.leaks.sarif import sarif_log

        document: Any = sarif_log(findings, known)
    else:
        document = {
            "findings": [_entry(f, known.get(f.token)) for f in findings],
            "summary": _summary(findings, stats),
        }
        if responses:
            document["responses"] = responses
    if output is not None:
        _write(output, json.dumps(document, indent=2) + "\n")
    else:
        emit_json(document)


def main(args: list[str]) -> None:
    """``tokenward scan ARGS``, on its own (see the module doc)."""
    command = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    command.command()(scan)
    command(args=args, prog_name="tokenward scan")


def _write(output: Path, text: str) -> None:
    try:
        output.write_text(text)
    except OSError as exc:
        fail(f"cannot write {output}: {exc.strerror or exc}", 2, error="os_error")
