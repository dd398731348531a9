"""CLI: token exchange / rotate for machines (json, env, dotenv, github), trust policies."""

from __future__ import annotations

import json
import shlex

import pytest
from typer.testing import CliRunner

from tokenward.cli import app

runner = CliRunner()


def run(live, *args, **env):
    environ = {"TOKENWARD_URL": live.url, "TOKENWARD_ADMIN_TOKEN": live.admin_token, **env}
    return runner.invoke(app, list(args), env=environ, catch_exceptions=False)


def api_key(live):
    return live.admin.create_token(project="shop", scopes=["records:*", "admin:read"], ttl="1d")


def works(live, token, scope="records:read"):
    return live.admin.verify(token, scope=scope)["valid"]


async def test_exchange_to_github_env_masks_the_token(live, tmp_path):
    key = api_key(live)
    github_env = tmp_path / "github_env"
    github_env.write_text("EARLIER=1\n")
    result = run(
        live,
        "token",
        "exchange",
        "--scope",
        "records:read",
        "--ttl",
        "5m",
        "--output",
        "github",
        TOKENWARD_API_KEY=key["token"],
        GITHUB_ENV=str(github_env),
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].startswith("::add-mask::tw_live_")
    token = lines[0].removeprefix("::add-mask::")
    assert all(token not in line for line in lines[1:])
    written = github_env.read_text().splitlines()
    assert written[0] == "EARLIER=1"
    assert written[1] == f"TOKENWARD_TOKEN={token}"
    assert written[2].startswith("TOKENWARD_TOKEN_EXPIRES_AT=")
    assert works(live, token) and not works(live, token, "records:write")


@pytest.mark.parametrize("fmt", ["json", "env", "dotenv"])
async def test_exchange_output_formats(live, fmt):
    key = api_key(live)
    result = run(
        live,
        "token",
        "exchange",
        "--output",
        fmt,
        "--env-name",
        "SHOP_TOKEN",
        TOKENWARD_API_KEY=key["token"],
    )
    assert result.exit_code == 0, result.output
    if fmt == "json":
        body = json.loads(result.stdout)
        token = body["access_token"]
        assert body["token_type"] == "Bearer" and body["expires_in"] <= 900
    else:
        values = {}
        for line in result.stdout.splitlines():
            if fmt == "env":
                assert line.startswith("export ")
                line = line.removeprefix("export ")
            name, _, value = line.partition("=")
            values[name] = shlex.split(value)[0] if fmt == "env" else value
        token = values["SHOP_TOKEN"]
        assert "SHOP_TOKEN_EXPIRES_AT" in values
    assert works(live, token)


async def test_exchange_ci_identity(live, issuer, monkeypatch):
    added = run(
        live,
        "trust",
        "add",
        "--project",
        "shop",
        "--name",
        "deploy",
        "--issuer",
        issuer.url,
        "--audience",
        "tokenward",
        "--claim",
        "repository=acme/*",
        "--scope",
        "records:read",
        "--refresh-ttl",
        "1h",
        "--json",
    )
    assert added.exit_code == 0, added.output
    assert json.loads(added.stdout)["claims"] == {"repository": "acme/*"}
    listed = run(live, "trust", "list", "--json")
    assert [p["name"] for p in json.loads(listed.stdout)] == ["deploy"]
    unnamed = run(live, "token", "exchange", "--identity-env", "CI_OIDC", CI_OIDC=issuer.token())
    assert unnamed.exit_code == 2 and "give --project" in unnamed.output
    result = run(
        live,
        "token",
        "exchange",
        "--identity-env",
        "CI_OIDC",
        "--project",
        "shop",
        "--output",
        "json",
        CI_OIDC=issuer.token(),
    )
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    assert body["scope"] == "records:read" and works(live, body["access_token"])
    ci = ["token", "exchange", "--identity-env", "CI_OIDC"]
    replay = run(
        live, *ci, "--project", "shop", "--audience", "deploy", CI_OIDC=issuer.token(jti="x1")
    )
    assert replay.exit_code == 0, replay.output
    both = run(live, *ci, "--project", "shop", "--audience", "shop/deploy", CI_OIDC="x")
    assert both.exit_code == 2 and "give its name only" in both.output
    again = run(live, *ci, "--audience", "shop/deploy", CI_OIDC=issuer.token(jti="x1"))
    assert again.exit_code == 1 and "already used" in again.output
    removed = run(live, "trust", "remove", "deploy", "--project", "shop")
    assert removed.exit_code == 0
    assert json.loads(run(live, "trust", "list", "--json").stdout) == []


async def test_rotate_for_machines(live, tmp_path):
    key = api_key(live)
    result = run(live, "token", "rotate", key["id"], "--grace", "0", "--output", "dotenv")
    assert result.exit_code == 0, result.output
    name, _, token = result.stdout.splitlines()[0].partition("=")
    assert name == "TOKENWARD_TOKEN" and works(live, token)
    assert not works(live, key["token"])


async def test_exchange_errors(live, tmp_path):
    key = api_key(live)
    missing = run(live, "token", "exchange")
    assert missing.exit_code == 2 and "TOKENWARD_API_KEY" in missing.output
    no_env = run(live, "token", "exchange", "--output", "github", TOKENWARD_API_KEY=key["token"])
    assert no_env.exit_code == 2 and "GITHUB_ENV" in no_env.output
    bad = run(live, "token", "exchange", "--output", "yaml", TOKENWARD_API_KEY=key["token"])
    assert bad.exit_code == 2
    wider = run(live, "token", "exchange", "--scope", "admin:write", TOKENWARD_API_KEY=key["token"])
    assert wider.exit_code == 1 and "invalid_scope" not in wider.stdout
    assert key["token"] not in wider.output


async def test_policy_and_auto_rotate_commands(live):
    shown = run(live, "project", "policy", "shop", "--max-lifetime", "30d", "--json")
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["max_token_lifetime"] == 30 * 86400
    again = run(live, "project", "policy", "shop", "--warn-days", "3", "--json")
    policy = json.loads(again.stdout)
    assert policy["max_token_lifetime"] == 30 * 86400 and policy["expiry_warning_days"] == 3
    key = api_key(live)
    rotate = run(
        live,
        "token",
        "auto-rotate",
        key["id"],
        "--period",
        "7d",
        "--webhook",
        "http://127.0.0.1:9/hook",
        "--json",
    )
    assert rotate.exit_code == 0, rotate.output
    assert json.loads(rotate.stdout)["webhook_secret"].startswith("whsec_")
