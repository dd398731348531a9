"""``tokenward usage`` against a real server process: a compact table and ``--json``."""

from __future__ import annotations

import json
import os
import subprocess
import time

import httpx
import pytest
from typer.testing import CliRunner

from tests.conftest import serve_tokenward, tokenward_cmd
from tokenward import cli as cli_module
from tokenward.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("usage")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENWARD_")}
    env.update(
        TOKENWARD_DATA_DIR=str(tmp_path),
        TOKENWARD_ACCESS_LOG="false",
        TOKENWARD_USAGE_ROLLUP_SECONDS="0.2",
    )
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


def test_usage_table_and_json(server):
    url, admin = server
    assert runner.invoke(app, ["project", "create", "shop"]).exit_code == 0
    created = runner.invoke(
        app, ["token", "create", "--project", "shop", "--scope", "a:b", "--json"]
    )
    token = json.loads(created.output)["token"]
    headers = {"Authorization": f"Bearer {admin}"}
    for scope in ("a:b", "a:b", "c:d"):
        r = httpx.post(f"{url}/v1/verify", json={"token": token, "scope": scope}, headers=headers)
        assert r.status_code == 200
    deadline = time.monotonic() + 30
    while True:  # the rollup counts behind the audit log
        result = runner.invoke(app, ["usage", "--project", "shop", "--last", "1h", "--json"])
        assert result.exit_code == 0, result.output
        report = json.loads(result.output)
        if report["totals"]["requests"] == 3 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert report["totals"] == {
        "requests": 3,
        "allowed": 2,
        "denied": 1,
        "denied_by_reason": {"insufficient_scope": 1},
    }
    table = runner.invoke(app, ["usage", "--project", "shop", "--last", "2h"])
    assert table.exit_code == 0
    lines = table.output.splitlines()
    assert all(len(line) <= 80 for line in lines)
    assert any(line.startswith("total") and "insufficient_scope 1" in line for line in lines)


@pytest.mark.parametrize(
    "args",
    [
        ["usage", "--granularity", "week"],
        ["usage", "--last", "soon"],
        ["usage", "--last", "1h", "--from", "2026-01-01T00:00:00Z"],
    ],
    ids=["granularity", "last", "both"],
)
def test_usage_bad_options_exit_2(server, args):
    assert runner.invoke(app, args).exit_code == 2


def test_usage_server_side_error_is_clear(server):
    result = runner.invoke(
        app, ["usage", "--from", "2030-01-02T00:00:00Z", "--to", "2030-01-01T00:00:00Z"]
    )
    assert result.exit_code == 1 and "from must be before to" in result.output
