"""The audit and alerts CLI against a real server process, and `audit verify` on its database."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess

import httpx
import pytest
from typer.testing import CliRunner

from tests.conftest import serve_tokenward, tokenward_cmd
from tokenward import cli as cli_module
from tokenward.cli import app
from tokenward.tokens.format import generate_token

runner = CliRunner()


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    """One server for the module (starting one is the slow part)."""
    tmp_path = tmp_path_factory.mktemp("cli")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENWARD_")}
    env.update(TOKENWARD_DATA_DIR=str(tmp_path), TOKENWARD_ACCESS_LOG="false")
    init = subprocess.run(
        tokenward_cmd("init", "--json"), env=env, capture_output=True, check=True, timeout=60
    )
    admin = json.loads(init.stdout)["admin_token"]
    served = serve_tokenward(env=env)
    try:
        yield tmp_path, served.url, admin
    finally:
        served.stop(timeout=20)


@pytest.fixture
def server(running, monkeypatch):
    _, url, admin = running
    monkeypatch.setenv("TOKENWARD_URL", url)
    monkeypatch.setenv("TOKENWARD_ADMIN_TOKEN", admin)
    monkeypatch.setenv("COLUMNS", "300")
    # The CLI's console reads COLUMNS when it is made, if it was set then (another test of
    # this process may have imported the CLI under a narrow one): read it now instead.
    monkeypatch.setattr(cli_module.out, "_width", None)
    return running


def cli(*args):
    result = runner.invoke(app, list(args))
    return result


def test_audit_and_alerts_cli(server):
    data_dir, url, admin = server
    assert cli("project", "create", "shop").exit_code == 0
    token = json.loads(
        cli("token", "create", "--project", "shop", "--scope", "a:b", "--json").output
    )
    headers = {"Authorization": f"Bearer {admin}"}
    with httpx.Client(base_url=url, headers=headers) as http:
        http.put("/v1/anomaly/settings", json={"scope_probing": {"threshold": 2}})
        http.post("/v1/verify", json={"token": token["token"], "ip": "192.0.2.9"})
        for _ in range(2):
            http.post("/v1/verify", json={"token": token["token"], "scope": "x:y"})
        http.post("/v1/verify", json={"token": generate_token("live"), "ip": "192.0.2.9"})

    page = json.loads(cli("audit", "list", "--ip", "192.0.2.9", "--json").output)
    assert [e["reason"] for e in page["events"]] == ["unknown", "ok"]
    table = cli("audit", "list", "--token", token["id"], "--decision", "deny")
    assert table.exit_code == 0 and "insufficient_scope" in table.output
    assert token["token"] not in table.output

    exported = cli("audit", "export", "--token", token["id"])
    lines = [json.loads(line) for line in exported.output.splitlines()]
    assert [e["action"] for e in lines][:1] == ["token.create"] and len(lines) == 4

    tail = cli("audit", "tail", "-n", "2", "--json", "--token", token["id"])
    assert [json.loads(line)["reason"] for line in tail.output.splitlines()] == [
        "insufficient_scope",
        "insufficient_scope",
    ]

    alerts = json.loads(cli("alerts", "list", "--json").output)["alerts"]
    assert [a["detector"] for a in alerts] == ["scope_probing"]
    acked = cli("alerts", "ack", alerts[0]["id"], "--note", "expected")
    assert acked.exit_code == 0 and "acknowledged" in acked.output
    assert json.loads(cli("alerts", "list", "--open", "--json").output)["alerts"] == []

    assert cli("token", "quarantine", token["id"], "--reason", "suspicious").exit_code == 0
    with httpx.Client(base_url=url, headers=headers) as http:
        body = http.post("/v1/verify", json={"token": token["token"]}).json()
        assert body["reason"] == "quarantined"
        assert cli("token", "release", token["id"]).exit_code == 0
        assert http.post("/v1/verify", json={"token": token["token"]}).json()["valid"]

    bad = cli("audit", "list", "--cursor", "nope", "--json")
    assert bad.exit_code == 1 and "invalid_cursor" in bad.output

    # The chain verifies next to the database, and catches an edit.
    ok = cli("audit", "verify", "--data-dir", str(data_dir), "--json")
    report = json.loads(ok.output)
    assert ok.exit_code == 0 and report["ok"]
    [chain] = report["chains"]  # the one server's writer
    assert chain["ok"] and chain["status"] == "open" and chain["checked"] == report["checked"]
    text_report = cli("audit", "verify", "--data-dir", str(data_dir))
    assert f"ok chain {chain['chain']} (open)" in text_report.output
    assert f"head: {chain['head']}" in text_report.output
    anchored = cli("audit", "verify", "--data-dir", str(data_dir), "--anchor", chain["head"])
    assert anchored.exit_code == 0
    assert cli("audit", "verify", "--data-dir", str(data_dir), "--anchor", "x").exit_code == 2
    with sqlite3.connect(data_dir / "tokenward.db") as db:
        db.execute("UPDATE audit_events SET decision = 'allow' WHERE reason = 'unknown'")
    broken = cli("audit", "verify", "--data-dir", str(data_dir))
    assert broken.exit_code == 1 and "edited" in broken.output


def test_tail_follow_prints_new_events(server):
    data_dir, url, admin = server
    env = {**os.environ, "TOKENWARD_URL": url, "TOKENWARD_ADMIN_TOKEN": admin}
    proc = subprocess.Popen(
        tokenward_cmd("audit", "tail", "-f", "--json", "--interval", "0.2", "--ip", "198.51.100.3"),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {admin}"}) as http:
            http.post("/v1/verify", json={"token": generate_token("test"), "ip": "198.51.100.3"})
        line = proc.stdout.readline()
        assert json.loads(line)["client_ip"] == "198.51.100.3"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        proc.stdout.close()
