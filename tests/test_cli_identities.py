"""CLI: ``tokenward identity …`` and the token flags for identities and credits, against a
real server (the SDK's AdminClient underneath)."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from tokenward.cli import app

runner = CliRunner()


def run(live, *args, input=None):
    environ = {"TOKENWARD_URL": live.url, "TOKENWARD_ADMIN_TOKEN": live.admin_token}
    return runner.invoke(app, list(args), env=environ, input=input, catch_exceptions=False)


def as_json(result):
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


async def test_identity_commands_end_to_end(live):
    created = as_json(
        run(
            live,
            *("identity", "create", "user_123", "--project", "shop"),
            *("--meta", "plan=pro", "--rate", "2/minute", "--json"),
        )
    )
    assert created["external_id"] == "user_123" and created["rate_limit"] == "2/minute"
    keys = [
        as_json(
            run(
                live,
                *("token", "create", "--project", "shop", "--scope", "records:read"),
                *("--identity", "user_123", "--json"),
            )
        )
        for _ in range(3)
    ]
    assert {k["identity"]["external_id"] for k in keys} == {"user_123"}
    # The identity's limit holds across its three keys.
    answers = [live.admin.verify(keys[i % 3]["token"]) for i in range(6)]
    assert sum(a["valid"] for a in answers) == 2
    assert answers[0]["identity"]["metadata"] == {"plan": "pro"}

    listed = as_json(run(live, "identity", "list", "--project", "shop", "--json"))
    assert [i["external_id"] for i in listed] == ["user_123"]
    table = run(live, "identity", "list", "--project", "shop")
    assert table.exit_code == 0 and "user_123" in table.output and "2/minute" in table.output
    shown = as_json(run(live, "identity", "show", "user_123", "--project", "shop", "--json"))
    assert shown["tokens"] == 3 and sorted(shown["token_ids"]) == sorted(k["id"] for k in keys)
    by_identity = as_json(
        run(live, "token", "list", "--project", "shop", "--identity", "user_123", "--json")
    )
    assert len(by_identity) == 3

    updated = as_json(
        run(live, "identity", "update", "user_123", "--project", "shop", "--no-rate", "--json")
    )
    assert updated["rate_limit"] is None
    assert live.admin.verify(keys[0]["token"])["valid"]  # no limit any more

    # Deleting asks; no answer (or --json without --yes) deletes nothing.
    refused = run(live, "identity", "delete", "user_123", "--project", "shop", "--json")
    assert refused.exit_code == 2 and "--yes" in refused.output
    assert live.admin.verify(keys[0]["token"])["valid"]
    deleted = run(live, "identity", "delete", "user_123", "--project", "shop", "--yes")
    assert deleted.exit_code == 0, deleted.output
    assert "revoked 3 token(s)" in deleted.output
    assert {live.admin.verify(k["token"])["reason"] for k in keys} == {"revoked"}


async def test_token_create_with_refill_and_a_cost(live):
    key = as_json(
        run(
            live,
            *("token", "create", "--project", "shop", "--scope", "records:read"),
            *("--refill", "10/month", "--refill-day", "1", "--json"),
        )
    )
    assert key["remaining_uses"] == 10
    assert key["refill"]["amount"] == 10 and key["refill"]["day"] == 1
    assert live.admin.verify(key["token"], cost=4)["remaining_uses"] == 6
    denied = live.admin.verify(key["token"], cost=7)
    assert denied["valid"] is False and denied["reason"] == "uses_exhausted"
    assert denied["remaining_uses"] == 6
    bad = run(
        live,
        *("token", "create", "--project", "shop", "--scope", "records:read"),
        *("--refill", "10/week", "--json"),
    )
    assert bad.exit_code == 1 and "refill" in bad.output


async def test_an_unknown_identity_is_a_clear_error(live):
    result = run(live, "identity", "show", "nobody", "--project", "shop")
    assert result.exit_code == 1 and "no identity" in result.output
