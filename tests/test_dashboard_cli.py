"""``tokenward init`` makes the first owner; ``tokenward user …`` manages users offline."""

from __future__ import annotations

import json
import os
import subprocess

from tests.conftest import tokenward_cmd


def cli(*args: str, env: dict[str, str], ok: bool = True) -> dict | list:
    result = subprocess.run(tokenward_cmd(*args, "--json"), env=env, capture_output=True, text=True)
    assert (result.returncode == 0) is ok, result.stderr
    return json.loads(result.stdout or result.stderr)


def test_init_creates_the_first_owner_once_and_user_commands_work(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENWARD_")}
    env["TOKENWARD_DATA_DIR"] = str(tmp_path)
    first = cli("init", env=env)
    assert first["owner_login"] == "owner" and len(first["owner_password"]) >= 16
    assert first["admin_token"].startswith("tw_live_")
    again = cli("init", env=env)
    assert "owner_password" not in again  # shown once, never again

    added = cli("user", "add", "Vera", "--role", "viewer", env=env)
    assert added["login"] == "vera" and added["role"] == "viewer" and added["password"]
    users = cli("user", "list", env=env)
    assert [(u["login"], u["role"], u["mfa_enrolled"]) for u in users] == [
        ("owner", "owner", False),
        ("vera", "viewer", False),
    ]
    assert all("password" not in u for u in users)
    assert cli("user", "reset-mfa", "vera", env=env) == {"mfa_reset": "vera"}
    assert cli("user", "remove", "owner", env=env, ok=False)["error"] == "last_owner"
    assert cli("user", "remove", "vera", env=env) == {"removed": "vera"}
    db = (tmp_path / "tokenward.db").read_bytes()
    assert first["owner_password"].encode() not in db
    assert added["password"].encode() not in db
