"""Errors an operator can meet end in one ``error: …`` line and an exit code, never in a
traceback, and ``serve`` checks everything it can before it prints its banner."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

from tests.conftest import closed_port, tokenward_cmd

pytestmark = pytest.mark.slow

BAD_POLICY = """
[[upstreams]]
name = "records"
url = "http://127.0.0.1:9"

[[routes]]
upstream = "nope"
path = "/x"
methods = ["GET"]
scope = "records:read"
"""


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENWARD_")}
    env.update(NO_COLOR="1", COLUMNS="200", **extra)
    return env


def run_all(*calls: tuple[dict[str, str], list[str]]) -> list[subprocess.CompletedProcess[str]]:
    """Run CLI calls in parallel (each is a fresh process, as a user runs it)."""
    procs = [
        subprocess.Popen(
            tokenward_cmd(*args), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for env, args in calls
    ]
    results = []
    for proc, (_env, args) in zip(procs, calls, strict=True):
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        results.append(subprocess.CompletedProcess(args, proc.returncode, out, err))
    return results


def one_line_error(result: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    assert result.returncode == code, (result.args, result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), (result.args, result.stderr)
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("errors") / "data"
    init = subprocess.run(
        tokenward_cmd("init", "--data-dir", str(path), "--json"),
        env=clean_env(),
        capture_output=True,
        timeout=60,
    )
    assert init.returncode == 0, init.stderr
    return path


async def test_file_settings_and_credential_errors(tmp_path, live):
    client = clean_env(TOKENWARD_URL=live.url, TOKENWARD_ADMIN_TOKEN=live.admin_token)
    missing = str(tmp_path / "nonexistent")
    export, verify, users, exchange, accent, debug = run_all(
        (client, ["audit", "export", "-o", f"{missing}/dir/x.jsonl"]),
        (clean_env(), ["audit", "verify", "--data-dir", missing]),
        (clean_env(), ["user", "list", "--data-dir", missing]),
        (client, ["token", "exchange", "--identity-file", missing]),
        ({**client, "TOKENWARD_ADMIN_TOKEN": "tw_live_é"}, ["project", "list"]),
        ({**clean_env(TOKENWARD_DEBUG="1")}, ["audit", "verify", "--data-dir", missing]),
    )
    one_line_error(export, 1, "cannot write", "x.jsonl")
    one_line_error(verify, 1, "no server key", "tokenward init")
    one_line_error(users, 1, "no server key", "tokenward init")
    one_line_error(exchange, 2, "cannot read --identity-file", "nonexistent")
    one_line_error(accent, 2, "TOKENWARD_ADMIN_TOKEN")
    assert "é" not in accent.stderr
    assert debug.returncode != 0 and "Traceback" in debug.stderr  # TOKENWARD_DEBUG=1


def test_serve_checks_before_the_banner(data_dir, tmp_path):
    serve = ["serve", "--data-dir", str(data_dir)]
    port = "0"  # each of these stops before it binds; were one to bind, 0 clashes with nothing
    bad_policy = tmp_path / "bad.toml"
    bad_policy.write_text(BAD_POLICY)
    good_policy = tmp_path / "good.toml"
    good_policy.write_text(BAD_POLICY.replace('"nope"', '"records"'))
    with closed_port() as nothing_there, socket.socket() as busy:
        unreachable = f"postgresql+asyncpg://tw:sekrit-pw@127.0.0.1:{nothing_there}/test"
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = str(busy.getsockname()[1])
        results = run_all(
            (clean_env(), [*serve, "--port", "99999"]),
            (clean_env(TOKENWARD_CACHE_TTL="abc"), [*serve, "--port", port]),
            (clean_env(TOKENWARD_TRUSTED_PROXIES="notacidr"), [*serve, "--port", port]),
            (
                clean_env(),
                [*serve, "--port", port, "--tls-cert", "/nonexistent", "--tls-key", "/x"],
            ),
            (clean_env(TOKENWARD_DATABASE_URL=unreachable), [*serve, "--port", port]),
            (clean_env(TOKENWARD_SECRET_KEY="notahexkeyQQ"), [*serve, "--port", port]),
            (clean_env(), [*serve, "--port", taken]),
            (clean_env(), [*serve, "--port", port, "--config", str(bad_policy)]),
            (
                clean_env(),
                [*serve, "--port", port, "--config", str(good_policy), "--gateway-port", taken],
            ),
        )
    range_, ttl, proxies, tls, database, key, busy_port, policy, busy_gateway = results
    for result in results:
        assert "listening on" not in result.stdout, (result.args, result.stdout)
        assert "Traceback" not in result.stderr, (result.args, result.stderr)
    one_line_error(range_, 2, "TOKENWARD_PORT", "65535")
    one_line_error(ttl, 2, "TOKENWARD_CACHE_TTL")
    one_line_error(proxies, 2, "TOKENWARD_TRUSTED_PROXIES", "'notacidr' is not an IPv4")
    one_line_error(tls, 2, "cannot read --tls-cert /nonexistent")
    one_line_error(database, 3, "cannot use the database", "Connect call failed")
    assert "sekrit-pw" not in database.stderr + database.stdout
    one_line_error(key, 2, "hex")
    assert "notahexkeyQQ" not in key.stderr
    one_line_error(busy_port, 3, f"cannot listen on 127.0.0.1 port {taken}")
    one_line_error(policy, 2, "no [[upstreams]] is named 'nope'")
    one_line_error(busy_gateway, 3, f"cannot listen on 127.0.0.1 port {taken}")
