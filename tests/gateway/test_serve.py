"""``tokenward serve --config``: the API and the gateway from one command, and the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import httpx

from tests.conftest import closed_port, serve_tokenward, tokenward_cmd


def run(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(tokenward_cmd(*args), env=env, capture_output=True, text=True, timeout=60)


def test_invalid_config_stops_the_start_with_file_line_and_key(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text('[[routes]]\npath = "/x"\nmethods = ["GET"]\nscope = "no way"\n')
    env = {**os.environ, "TOKENWARD_SECRET_KEY": "ab" * 32, "COLUMNS": "500"}
    result = run(env, "serve", "--data-dir", str(tmp_path), "--config", str(config))
    assert result.returncode == 2
    assert f"{config}:4: routes[0].scope:" in result.stderr.replace("\n", "")


def test_serve_with_config_runs_api_authz_and_gateway(tmp_path):
    with closed_port() as backend:
        _serve_with_config(tmp_path, backend)


def _serve_with_config(tmp_path, backend: int) -> None:
    config = tmp_path / "tokenward.toml"
    config.write_text(
        f'[[upstreams]]\nname = "b"\nurl = "http://127.0.0.1:{backend}"\n\n'
        '[[routes]]\nupstream = "b"\npath = "/records/{rest:path}"\nmethods = ["GET"]\n'
        'scope = "records:read"\n'
    )
    env = {
        **os.environ,
        "TOKENWARD_DATA_DIR": str(tmp_path / "data"),
        "TOKENWARD_GATEWAY_CONFIG": str(config),
    }
    init = run(env, "init", "--json")
    admin = json.loads(init.stdout)["admin_token"]
    err_file = tmp_path / "serve.err"
    with err_file.open("w") as stderr:
        served = serve_tokenward(env=env, stderr=stderr, gateway=True)
    proc, api_port, gateway_port = served.proc, served.port, served.gateway_port
    try:
        cli_env = {
            **env,
            "TOKENWARD_URL": f"http://127.0.0.1:{api_port}",
            "TOKENWARD_ADMIN_TOKEN": admin,
        }
        assert run(cli_env, "project", "create", "shop").returncode == 0
        result = run(cli_env, "project", "allow-ip", "shop", "127.0.0.0/8", "::1", "--json")
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["ip_allowlist"] == ["127.0.0.0/8", "::1/128"]
        bad = run(cli_env, "project", "allow-ip", "shop", "300.1.1.1", "--json")
        assert bad.returncode == 1 and json.loads(bad.stderr)["error"] == "invalid_cidr"
        created = run(
            cli_env, "token", "create", "--project", "shop", "--scope", "records:read", "--json"
        )
        token = json.loads(created.stdout)["token"]
        auth = {"Authorization": f"Bearer {token}"}
        r = httpx.get(
            f"http://127.0.0.1:{api_port}/authz",
            headers={**auth, "X-Original-URI": "/records/1", "X-Original-Method": "GET"},
        )
        assert r.status_code == 200 and r.headers["x-tokenward-project"] == "shop"
        r = httpx.get(f"http://127.0.0.1:{gateway_port}/records/1", headers=auth)
        assert r.status_code == 502  # nothing listens on the backend port: JSON 502
        assert r.json()["error"] == "upstream_unavailable"
        r = httpx.get(f"http://127.0.0.1:{gateway_port}/other", headers=auth)
        assert r.status_code == 404 and r.json()["error"] == "no_route"
    finally:
        proc.send_signal(signal.SIGTERM)
        out = served.stdout()
    err = err_file.read_text()
    assert proc.returncode == 0, err
    assert f"gateway:   http://127.0.0.1:{gateway_port}" in out
    assert token not in out + err
