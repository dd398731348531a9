"""``tokenward token list|update|disable|enable`` against a real server: one line a token at
80 columns, the search filters as flags, and changes that only narrow."""

from __future__ import annotations

import json

from tests.test_cli_output import cli


def test_token_list_is_one_line_a_token_at_80_columns(live):
    made = [
        live.admin.create_token(
            project="shop",
            scopes=["records:read", "records:write", "functions:invoke:send-email"],
            name=f"a rather long name for the storefront worker number {n}",
            ttl="30d",
        )
        for n in range(3)
    ]
    listed = cli(live, "token", "list", "--project", "shop", columns=80)
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), listed.stdout
    for token in made:
        [line] = [line for line in lines if token["id"] in line]  # one line, id whole
        assert "records:read +2" in line and "active" in line
        assert token["expires_at"][:10] in line
    wide = cli(live, "token", "list", "--project", "shop", "--wide", columns=400)
    assert wide.returncode == 0, wide.stderr
    assert made[0]["hint"] in wide.stdout and "functions:invoke:send-email" in wide.stdout


def test_token_list_filters_are_flags_with_choices(live):
    live.admin.create_token(project="shop", scopes=["x:y"], name="billing-api")
    live.admin.create_token(
        project="shop", scopes=["x:y"], name="billing-cron", environment="test", metadata={"t": "1"}
    )
    live.admin.create_token(project="shop", scopes=["x:y"], name="search-api")

    def names(*flags: str) -> list[str]:
        result = cli(live, "token", "list", "--project", "shop", "--json", *flags)
        assert result.returncode == 0, result.stderr
        return sorted(t["name"] for t in json.loads(result.stdout))

    assert names("--name", "billing") == ["billing-api", "billing-cron"]
    assert names("--name", "billing", "--env", "live") == ["billing-api"]
    assert names("--meta", "t=1") == ["billing-cron"]
    assert names("--kind", "canary") == []
    assert names("--state", "active", "--limit", "2") == ["billing-cron", "search-api"]
    assert names("--expires-before", "7d") == []
    assert names("--unused-for", "0d") == ["billing-api", "billing-cron", "search-api"]
    bad = cli(live, "token", "list", "--state", "sleeping")
    assert bad.returncode == 2 and "rotated_in_grace" in bad.stderr  # the choices are named
    bad_env = cli(live, "token", "list", "--env", "prod")
    assert bad_env.returncode == 2


def test_token_update_disable_and_enable(live):
    token = live.admin.create_token(
        project="shop", scopes=["records:read", "records:write"], name="app", metadata={"a": "1"}
    )
    token_id = token["id"]
    changed = cli(
        live,
        "token",
        "update",
        token_id,
        "--name",
        "storefront",
        "--scope",
        "records:read",
        "--meta",
        "team=billing",
        "--drop-meta",
        "a",
        "--rate",
        "5/second",
        "--json",
    )
    assert changed.returncode == 0, changed.stderr
    body = json.loads(changed.stdout)
    assert body["name"] == "storefront" and body["scopes"] == ["records:read"]
    assert body["metadata"] == {"team": "billing"} and body["rate_limit"] == "5/second"
    widened = cli(live, "token", "update", token_id, "--scope", "admin:*")
    assert widened.returncode == 1 and "scopes can only be narrowed" in widened.stderr
    nothing = cli(live, "token", "update", token_id)
    assert nothing.returncode == 2 and "nothing to change" in nothing.stderr

    off = cli(live, "token", "disable", token_id, "--reason", "on hold")
    assert off.returncode == 0 and "on hold" in off.stdout, off.stderr
    assert live.admin.verify(token["token"])["reason"] == "disabled"
    listed = cli(live, "token", "list", "--project", "shop", "--disabled", columns=80)
    assert token_id in listed.stdout and "disabled" in listed.stdout
    on = cli(live, "token", "enable", token_id)
    assert on.returncode == 0 and "works again" in on.stdout, on.stderr
    assert live.admin.verify(token["token"])["valid"]
