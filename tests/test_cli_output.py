"""What the CLI prints: data as it is (never read as Rich markup), ids never cut, secrets
never sent where an id goes, and the words of ``init --reset``."""

from __future__ import annotations

import os
import subprocess

import httpx
import pytest
from typer.testing import CliRunner

from tests.conftest import tokenward_cmd
from tokenward.cli import app
from tokenward.tokens.format import generate_token
from tokenward_client.admin import AdminClient, TokenSecretAsId

NAME = "[/x] :smile: [bold]b[/bold] [link=http://x]y"


def cli(live, *args: str, columns: int = 200, **env: str) -> subprocess.CompletedProcess[str]:
    """The real entry point in a fresh process, on a terminal ``columns`` wide."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("TOKENWARD_")}
    environ.update(
        TOKENWARD_URL=live.url,
        TOKENWARD_ADMIN_TOKEN=live.admin_token,
        COLUMNS=str(columns),
        NO_COLOR="1",
        **env,
    )
    return subprocess.run(
        tokenward_cmd(*args), env=environ, capture_output=True, text=True, timeout=60
    )


async def test_stored_data_and_server_messages_print_literally(live):
    token = live.admin.create_token(project="shop", scopes=["x:y"], name=NAME, principal=NAME)
    listed = cli(live, "token", "list", "--project", "shop")
    shown = cli(live, "token", "show", token["id"])
    bad_name = cli(live, "project", "create", "Bad Name")
    bad_since = cli(live, "audit", "list", "--since", "[/x]")
    for result in (listed, shown):
        assert result.returncode == 0, result.stderr
        assert NAME in result.stdout
        assert "Traceback" not in result.stderr
    assert bad_name.returncode == 2  # a bad option: said in words, before anything is sent
    assert "'Bad Name' is not a project name: use 1 to 63 lower-case" in bad_name.stderr
    assert bad_since.returncode == 2
    assert "not a time or an age: '[/x]'" in bad_since.stderr


async def test_ids_are_never_cut_at_80_columns(live):
    token = live.admin.create_token(project="shop", scopes=["records:read"], name="storefront")
    listed = cli(live, "token", "list", "--project", "shop", columns=80)
    events = cli(live, "audit", "list", "--limit", "5", columns=80)
    assert listed.returncode == 0, listed.stderr
    assert token["id"] in listed.stdout  # whole, on one line: it can be copied
    assert events.returncode == 0, events.stderr
    assert token["created_by"] in events.stdout  # the admin token's id, in the token column


async def test_a_secret_given_as_an_id_is_refused_before_sending(live):
    token = live.admin.create_token(project="shop", scopes=["records:read"])
    for args in (
        ["token", "revoke", token["token"]],
        ["token", "rotate", token["token"], "--json"],
        ["audit", "list", "--token", token["token"]],
    ):
        result = cli(live, *args)
        assert result.returncode == 2, (args, result.stderr)
        assert "that is a token secret, not a token id" in result.stderr
        assert token["token"] not in result.stdout + result.stderr
    assert live.admin.get_token(token["id"])["state"] == "active"


def _recording_client() -> tuple[AdminClient, list[httpx.Request]]:
    sent: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(200, json={"tokens": [], "trust_policies": [], "next": None})

    client = AdminClient("http://tokenward.invalid", "tw_live_x")
    client._http = httpx.Client(
        base_url="http://tokenward.invalid", transport=httpx.MockTransport(answer)
    )
    return client, sent


SECRET = generate_token("live")
LOOKALIKES = [
    SECRET,
    SECRET[:-1] + ("A" if SECRET[-1] != "A" else "B"),  # a typo: still a secret
    "tw_live_3kP9Zq",  # a cut secret: still part of one
    f"Bearer {SECRET}",
    f"tok_{SECRET}",  # glued to an id's prefix
    f"{SECRET}x",  # glued to more characters
]


# Ids that do not change from one collection to the next (the secret is random), so that
# parallel workers collect the same tests.
LOOKALIKE_IDS = ["secret", "typo", "cut", "bearer", "prefixed", "suffixed"]


@pytest.mark.parametrize("value", LOOKALIKES, ids=LOOKALIKE_IDS)
@pytest.mark.parametrize(
    "call",
    [
        lambda c, v: c.update_project(v, []),
        lambda c, v: c.get_token(v),
        lambda c, v: c.revoke_token(v),
        lambda c, v: c.rotate_token(v),
        lambda c, v: c.add_trust_policy(v, name="ci"),
        lambda c, v: c.remove_trust_policy("shop", v),
        lambda c, v: c.get_policy(v),
        lambda c, v: c.set_policy(v, require_dpop=True),
        lambda c, v: c.set_rotation(v, period="30d"),
        lambda c, v: c.get_alert(v),
        lambda c, v: c.ack_alert(v),
        lambda c, v: c.quarantine_token(v, "leak"),
        lambda c, v: c.release_token(v),
        lambda c, v: c.list_tokens(project=v),
        lambda c, v: c.list_trust_policies(v),
        lambda c, v: c.audit_page(token=v),
        lambda c, v: list(c.audit_export(token=v)),
        lambda c, v: c.alerts_page(project=v),
    ],
)
def test_admin_client_never_puts_a_secret_in_a_url(call, value):
    client, sent = _recording_client()
    with pytest.raises(TokenSecretAsId) as raised:
        call(client, value)
    assert sent == []
    assert SECRET[8:20] not in str(raised.value)


def test_admin_client_sends_ids_and_lowercase_names():
    client, sent = _recording_client()
    client.get_token("tok_3kP9aaaaaaaaaaaa")
    client.list_tokens(project="tw_live_shop")  # a project name may start like a secret
    assert [r.url.path for r in sent] == ["/v1/tokens/tok_3kP9aaaaaaaaaaaa", "/v1/tokens"]


def test_init_reset_does_not_call_the_token_the_first_one(tmp_path):
    runner = CliRunner()
    first = runner.invoke(app, ["init", "--data-dir", str(tmp_path)], catch_exceptions=False)
    reset = runner.invoke(
        app, ["init", "--data-dir", str(tmp_path), "--reset"], catch_exceptions=False
    )
    assert first.exit_code == 0 and reset.exit_code == 0
    assert "first admin credential" in " ".join(first.stdout.split())
    said = " ".join(reset.stdout.replace("│", " ").split())
    assert "first admin credential" not in said
    assert "previous bootstrap admin token is revoked" in said
