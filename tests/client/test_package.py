"""``tokenward-client`` on its own: installed alone in a fresh virtualenv, it has no server
code (``import tokenward`` fails there) and works against a live server, sync and async."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

CLIENT = Path(__file__).resolve().parents[2] / "client"

# Runs inside the fresh virtualenv: everything it imports must come from tokenward-client.
SCRIPT = textwrap.dedent(
    """
    import asyncio, importlib.metadata, json, os, sys

    try:
        import tokenward
    except ModuleNotFoundError:
        pass
    else:
        sys.exit(f"the server package is importable: {tokenward.__file__}")

    from tokenward_client import (
        AdminAPIError, AdminClient, AsyncAdminClient, AsyncVerifyClient, TokenwardAuth,
        VerifyClient,
    )
    import httpx

    url, admin_token = os.environ["URL"], os.environ["ADMIN_TOKEN"]
    report = {"requires": importlib.metadata.requires("tokenward-client")}
    with AdminClient(url, admin_token) as admin:
        report["project"] = admin.create_project("alone")["name"]
        issued = admin.create_token(project="alone", scopes=["records:read"], ttl="1h")
        try:
            admin.create_project("alone")
        except AdminAPIError as exc:
            report["conflict"] = [exc.status, exc.code]
    with VerifyClient(url, admin_token) as checker:
        report["verify"] = checker.verify(issued["token"], scope="records:read")["reason"]
        report["denied"] = checker.verify(issued["token"], scope="records:write")["reason"]

    async def main():
        async with AsyncAdminClient(url, admin_token) as admin:
            tokens = await admin.list_tokens(project="alone")
            report["listed"] = [t["id"] for t in tokens] == [issued["id"]]
            revoked = await admin.revoke_token(issued["id"], "done")
            report["revoked"] = revoked["revoked_at"] is not None
        async with AsyncVerifyClient(url, admin_token) as checker:
            report["after"] = (await checker.verify(issued["token"]))["reason"]

    asyncio.run(main())
    with AdminClient(url, admin_token) as admin:
        key = admin.create_token(project="alone", scopes=["admin:read"], ttl="1h")["token"]
    auth = TokenwardAuth(url, api_key=key, scope=["admin:read"])
    with httpx.Client(auth=auth) as http:
        report["sdk"] = [http.get(url + "/v1/projects").status_code for _ in range(2)]
    report["token_requests"] = auth.token_requests
    print(json.dumps(report))
    """
)


def _run(*command: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, **kwargs)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture(scope="module")
def lone_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtualenv with ``./client`` installed and nothing else of this repository.

    The wheel is built from a copy (no build files left in the checkout) with this
    environment's setuptools; the venv's pip installs it and fetches httpx.
    """
    root = tmp_path_factory.mktemp("lone")
    source = root / "client"
    shutil.copytree(CLIENT, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    wheels = root / "wheels"
    _run(*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(source))
    venv = root / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", str(venv))
    wheel = next(wheels.glob("tokenward_client-*.whl"))
    _run(*pip, "--python", str(venv / "bin" / "python"), "install", str(wheel))
    return venv


@pytest.mark.slow
async def test_the_client_alone_against_a_live_server(lone_venv, live):
    env = {"URL": live.url, "ADMIN_TOKEN": live.admin_token, "PATH": os.environ["PATH"]}
    result = await asyncio.to_thread(
        _run, str(lone_venv / "bin" / "python"), "-c", SCRIPT, env=env, cwd=lone_venv
    )
    report = json.loads(result.stdout)
    assert report == {
        "requires": ["httpx>=0.27", 'joserfc>=1.0; extra == "dpop"'],
        "project": "alone",
        "conflict": [409, "project_exists"],
        "verify": "ok",
        "denied": "insufficient_scope",
        "listed": True,
        "revoked": True,
        "after": "revoked",
        "sdk": [200, 200],
        "token_requests": 1,
    }
