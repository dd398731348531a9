"""The CLI as a new user meets it: help that reads at 80 columns, bad options that exit 2,
errors that name what to fix, and warnings about scope typos and tokens that never expire."""

from __future__ import annotations

import json
import os
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
import typer
from typer.testing import CliRunner

from tests.conftest import tokenward_cmd
from tokenward import __version__
from tokenward.cli import app
from tokenward.cli.common import subcommands

runner = CliRunner()


def invoke(*args: str, **env: str):
    return runner.invoke(app, list(args), env={"COLUMNS": "80", "NO_COLOR": "1", **env})


def run(*calls: tuple[dict[str, str], list[str]]) -> list[subprocess.CompletedProcess[str]]:
    """Real processes (exit codes as a shell sees them), in parallel, 80 columns wide."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("TOKENWARD_")}

    def one(call: tuple[dict[str, str], list[str]]) -> subprocess.CompletedProcess[str]:
        env, args = call
        return subprocess.run(
            tokenward_cmd(*args),
            env={**base, "COLUMNS": "80", "NO_COLOR": "1", **env},
            capture_output=True,
            text=True,
            timeout=120,
        )

    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(one, calls))


def every_command() -> list[list[str]]:
    root = typer.main.get_command(app)
    found: list[list[str]] = []

    def walk(command, ctx, path):
        found.append(path)
        if hasattr(command, "list_commands"):
            for name, sub in subcommands(ctx, command):
                walk(sub, sub.context_class(sub, info_name=name, parent=ctx), [*path, name])

    walk(root, root.context_class(root, info_name="tokenward"), [])
    return found


def test_every_help_reads_at_80_columns():
    paths = every_command()
    assert ["token", "exchange"] in paths and ["user", "set-password"] in paths
    for path in paths:
        result = invoke(*path, "--help")
        assert result.exit_code == 0, (path, result.output)
        text = result.output
        where = " ".join(path) or "tokenward"
        assert "<bool>" not in text and "<str>" not in text.split("Options:")[-1], where
        assert "<list[" not in text and "<int>" not in text, where
        for line in text.splitlines():
            assert len(line) <= 80, (where, line)
            if not line.startswith("Usage:"):
                assert not line.rstrip().endswith("..."), (where, line)  # nothing cut


def test_group_summaries_name_every_command():
    root = invoke("--help").output
    summary = " ".join(root.split("Commands:")[1].split())
    for group in ("token", "user", "audit", "project", "trust", "alerts"):
        names = [path[-1] for path in every_command() if path[:-1] == [group]]
        part = summary.split(f" {group} ", 1)[1] if f" {group} " in summary else summary
        for name in names:
            assert name in part, (group, name)
    for name in ("quarantine", "release", "exchange", "auto-rotate", "set-password", "prune"):
        assert name in summary


def test_serve_options_have_help_and_version_is_there():
    serve = " ".join(invoke("serve", "--help").output.split())
    assert "--host TEXT Address to listen on" in serve
    assert "--port INTEGER Port of the API" in serve
    version = invoke("--version")
    assert version.exit_code == 0 and version.output.strip() == f"tokenward {__version__}"


@pytest.mark.parametrize(
    "args",
    [
        ["token", "create", "--project", "shop", "--scope", "a:b", "--env", "prod"],
        ["token", "rotate", "tok_x", "--output", "yaml"],
        ["token", "exchange", "--output", "yaml"],
        ["audit", "list", "--decision", "maybe"],
        ["audit", "export", "--decision", "maybe"],
        ["alerts", "list", "--severity", "loud"],
        ["user", "add", "ann", "--role", "god"],
    ],
    ids=[
        "env",
        "rotate-output",
        "exchange-output",
        "decision",
        "export-decision",
        "severity",
        "role",
    ],
)
def test_choices_are_choices(args):
    result = invoke(*args, TOKENWARD_ADMIN_TOKEN="tw_live_x")
    assert result.exit_code == 2, result.output
    assert "Invalid value" in result.output
    option = [a for a in args if a.startswith("--")][-1]
    assert option in invoke(*args[: args.index(option)], "--help").output


def test_json_is_offered_by_every_admin_command():
    for path in every_command():
        if not path or path[0] in ("init", "serve") or len(path) == 1:
            continue
        if path[:2] in (["audit", "tail"],):
            continue
        assert "--json" in invoke(*path, "--help").output, path


def test_bad_options_and_settings_exit_2_with_words():
    ttl, name, url, grace = run(
        (
            {"TOKENWARD_ADMIN_TOKEN": "tw_live_x"},
            ["token", "create", "--project", "shop", "--scope", "a:b", "--ttl", "90days"],
        ),
        ({"TOKENWARD_ADMIN_TOKEN": "tw_live_x"}, ["project", "create", "Shop!"]),
        (
            {"TOKENWARD_ADMIN_TOKEN": "tw_live_x", "TOKENWARD_URL": "127.0.0.1:8080"},
            ["project", "list"],
        ),
        ({"TOKENWARD_ADMIN_TOKEN": "tw_live_x"}, ["token", "rotate", "tok_x", "--grace", "soon"]),
    )
    assert ttl.returncode == 2 and "'90days'" in ttl.stderr and "--ttl" in ttl.stderr
    assert name.returncode == 2 and "lower-case letters, digits" in name.stderr
    assert "^[" not in name.stderr and "pattern" not in name.stderr
    assert url.returncode == 2
    assert "TOKENWARD_URL='127.0.0.1:8080'" in url.stderr
    assert "'http://127.0.0.1:8080'" in url.stderr and "UnsupportedProtocol" not in url.stderr
    assert grace.returncode == 2 and "'soon'" in grace.stderr
    for result in (ttl, name, url, grace):
        assert "Traceback" not in result.stderr and result.stdout == ""


def cli_env(live, **more: str) -> dict[str, str]:
    return {"TOKENWARD_URL": live.url, "TOKENWARD_ADMIN_TOKEN": live.admin_token, **more}


async def test_against_a_server_errors_name_the_credential_and_typos_are_warned(live):
    live.admin.create_token(project="shop", scopes=["records:read"], ttl="1h")
    wrong, never, typo, strict, near = run(
        (
            cli_env(live, TOKENWARD_ADMIN_TOKEN="tw_live_" + "A" * 38),
            ["project", "list"],
        ),
        (cli_env(live), ["token", "create", "--project", "shop", "--scope", "records:read"]),
        (
            cli_env(live),
            ["token", "create", "--project", "shop", "--scope", "records-read", "--ttl", "1h"],
        ),
        (
            cli_env(live),
            ["token", "create", "--project", "shop", "--scope", "records:reed", "--strict"]
            + ["--ttl", "1h", "--json"],
        ),
        (
            cli_env(live),
            ["token", "create", "--project", "shop", "--scope", "records:reed", "--ttl", "1h"]
            + ["--json"],
        ),
    )
    assert wrong.returncode == 1, wrong.stderr
    assert "TOKENWARD_ADMIN_TOKEN" in wrong.stderr and "A" * 38 not in wrong.stderr
    assert never.returncode == 0, never.stderr
    assert "never expires" in never.stderr and "unknown" not in never.stderr
    assert typo.returncode == 0, typo.stderr
    assert "'records-read' matches no route policy" in typo.stderr
    assert "did you mean 'records:read'" in typo.stderr and "never expires" not in typo.stderr
    assert strict.returncode == 1, strict.stderr
    assert json.loads(strict.stderr)["error"] == "unknown_scope" and strict.stdout == ""
    body = json.loads(near.stdout)
    assert [n["code"] for n in body["warnings"]] == ["unknown_scope"]
    scopes = [t["scopes"] for t in live.admin.list_tokens(project="shop")]
    assert ["records:reed"] in scopes and scopes.count(["records:reed"]) == 1  # strict made none


async def test_exchange_and_export_speak_json(live, tmp_path):
    key = live.admin.create_token(project="shop", scopes=["records:read"], ttl="1h")
    target = tmp_path / "audit.jsonl"
    exchanged, exported, both = run(
        (cli_env(live, TOKENWARD_API_KEY=key["token"]), ["token", "exchange", "--json"]),
        (cli_env(live), ["audit", "export", "--json", "-o", str(target)]),
        (cli_env(live), ["token", "exchange", "--json", "--output", "env"]),
    )
    assert exchanged.returncode == 0, exchanged.stderr
    answer = json.loads(exchanged.stdout)
    assert answer["token_type"] in ("Bearer", "bearer") and answer["access_token"]
    assert exported.returncode == 0, exported.stderr
    summary = json.loads(exported.stdout)
    lines = target.read_text().splitlines()
    assert summary == {"events": len(lines), "file": str(target)} and lines
    assert all(json.loads(line)["id"] for line in lines)
    assert both.returncode == 2 and json.loads(both.stderr)["error"] == "error"


def test_the_cli_reference_is_what_the_commands_say():
    from tokenward.cli import docs

    assert docs.main(["--check"]) == 0, "docs/cli.md is out of date: run scripts/cli-docs"
    assert "## tokenward token create" in docs.render()
