"""``tokenward webhook …`` against a real server process and a real receiver."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
from typer.testing import CliRunner

from tests.conftest import serve_tokenward, tokenward_cmd
from tests.webhook_receiver import Receiver
from tokenward import cli as cli_module
from tokenward.cli import app
from tokenward.webhooks.signing import verify_signature

runner = CliRunner()


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("webhooks")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENWARD_")}
    env.update(TOKENWARD_DATA_DIR=str(tmp_path), TOKENWARD_ACCESS_LOG="false")
    init = subprocess.run(
        tokenward_cmd("init", "--json"), env=env, capture_output=True, check=True, timeout=60
    )
    admin = json.loads(init.stdout)["admin_token"]
    served = serve_tokenward(env=env)
    try:
        yield served.url, admin
    finally:
        served.stop(timeout=20)


@pytest.fixture
def server(running, monkeypatch):
    url, admin = running
    monkeypatch.setenv("TOKENWARD_URL", url)
    monkeypatch.setenv("TOKENWARD_ADMIN_TOKEN", admin)
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setattr(cli_module.out, "_width", None)
    return running


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def cli(*args):
    return runner.invoke(app, list(args))


def test_webhook_commands(server, receiver):
    assert cli("project", "create", "shop").exit_code == 0
    added = cli(
        "webhook", "add", receiver.url, "--project", "shop", "--event", "token.created", "--json"
    )
    assert added.exit_code == 0, added.output
    hook = json.loads(added.output)
    assert hook["events"] == ["token.created"] and hook["secret"].startswith("whsec_")
    listed = cli("webhook", "list")
    assert listed.exit_code == 0 and hook["id"] in listed.output
    assert all(len(line) <= 80 for line in listed.output.splitlines())
    tested = cli("webhook", "test", hook["id"])
    assert tested.exit_code == 0 and "delivered" in tested.output
    # a lifecycle event, delivered by the server's own dispatcher
    assert cli("token", "create", "--project", "shop", "--scope", "a:b").exit_code == 0
    deadline = time.monotonic() + 30
    while len(receiver.received) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    types = [d["body"]["type"] for d in receiver.received]
    assert types == ["webhook.test", "token.created"]
    assert all(verify_signature(hook["secret"], d["raw"], d["headers"]) for d in receiver.received)
    log = json.loads(cli("webhook", "deliveries", hook["id"], "--json").output)
    assert [d["status"] for d in log] == ["delivered", "delivered"]
    table = cli("webhook", "deliveries", hook["id"])
    assert "token.created" in table.output and "webhook.test" in table.output
    assert cli("webhook", "remove", hook["id"]).exit_code == 0
    gone = cli("webhook", "test", hook["id"])
    assert gone.exit_code == 1 and "no such webhook" in gone.output


def test_bad_webhook_url_is_a_clear_error(server):
    result = cli("webhook", "add", "http://hooks.example.com/x")
    assert result.exit_code == 1 and "https" in result.output
