"""Writes docs/cli.md from the command tree itself, so the reference never drifts.

``python -m tokenward.cli.docs`` (or ``scripts/cli-docs``) rewrites the file;
``--check`` only compares, and fails when the file is not what the commands say (a test
runs it). Each command's section is its ``--help`` at 80 columns, as a terminal shows it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

WIDTH = 80
TARGET = Path(__file__).resolve().parents[3] / "docs" / "cli.md"

HEADER = """\
# Command-line reference

Generated from the commands themselves by `scripts/cli-docs` (`python -m tokenward.cli.docs`);
do not edit by hand: a test fails when this file and the commands disagree. Admin commands
talk to a running server (`TOKENWARD_URL`, `TOKENWARD_ADMIN_TOKEN`); `init`, `serve`, `user`,
`audit verify` and `audit prune` work on the data dir or database directly. Exit codes: 0 done,
1 refused or failed, 2 a bad option or setting, 3 the server, database or port unreachable.
"""


def _walk(command: Any, ctx: Any, path: list[str]) -> list[tuple[list[str], Any, Any]]:
    """Every command of the tree, depth first, each with its context (for its help)."""
    from tokenward.cli.common import subcommands

    found = [(path, command, ctx)]
    if hasattr(command, "list_commands"):
        for name, sub in subcommands(ctx, command):
            child = sub.context_class(sub, info_name=name, parent=ctx)
            found += _walk(sub, child, [*path, name])
    return found


def render() -> str:
    """docs/cli.md as the commands describe themselves."""
    import typer

    from tokenward.cli import app
    from tokenward.cli.common import tidy_metavars

    root = typer.main.get_command(app)
    tidy_metavars(root)
    ctx = root.context_class(
        root, info_name="tokenward", terminal_width=WIDTH, max_content_width=WIDTH
    )
    sections = _walk(root, ctx, ["tokenward"])
    lines = [HEADER]
    for path, _command, _ in sections[1:]:
        depth = "  " * (len(path) - 2)
        anchor = "-".join(path)
        lines.append(f"{depth}- [`{' '.join(path)}`](#{anchor})")
    lines.append("")
    for path, command, command_ctx in sections:
        title = " ".join(path)
        lines += [f"## {title}", ""]
        lines += ["```", command.get_help(command_ctx).rstrip(), "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    text = render()
    if "--check" in args:
        if not TARGET.exists() or TARGET.read_text(encoding="utf-8") != text:
            print(f"{TARGET.name} is out of date: run scripts/cli-docs", file=sys.stderr)
            return 1
        return 0
    TARGET.write_text(text, encoding="utf-8")
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
