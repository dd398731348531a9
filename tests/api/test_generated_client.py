"""The OpenAPI document is complete enough to generate a client from: openapi-python-client
generates one from the live server's ``/openapi.json``, without a warning, and that client
creates a project, issues a token and verifies it against the same server."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import textwrap
from pathlib import Path

import httpx
import pytest

#: The generator lives in a virtualenv of its own (scripts/install makes it): its pins (older
#: typer and httpx) must not decide the versions the rest of the suite runs with.
TOOL_VENV = Path(__file__).resolve().parents[2] / ".venv-tools" / "openapi"
TOOL_BIN = TOOL_VENV / "bin"
if not (TOOL_BIN / "openapi-python-client").exists():
    pytest.skip(
        f"openapi-python-client is not installed in {TOOL_VENV.name}: run scripts/install",
        allow_module_level=True,
    )

CONFIG = {
    # A JSON-lines stream (the audit export) is bytes to a generated client.
    "content_type_overrides": {"application/x-ndjson": "application/octet-stream"},
    "post_hooks": [],  # no formatter run on the generated code
}

USE = textwrap.dedent(
    """
    import json, os, sys
    from generated import AuthenticatedClient
    from generated.api.projects import create_project
    from generated.api.tokens import create_token, get_token
    from generated.api.verify import verify
    from generated.models import (
        IssuedToken, Project, ProjectCreate, TokenCreate, TokenView, VerifyBody, VerifyResult,
    )

    client = AuthenticatedClient(base_url=os.environ["URL"], token=os.environ["ADMIN_TOKEN"])
    with client:
        project = create_project.sync(client=client, body=ProjectCreate(name="generated"))
        assert isinstance(project, Project), project
        issued = create_token.sync(
            client=client,
            body=TokenCreate(scopes=["records:read"], project="generated", ttl="1h"),
        )
        assert isinstance(issued, IssuedToken), issued
        shown = get_token.sync(issued.id, client=client)
        assert isinstance(shown, TokenView), shown
        good = verify.sync(client=client, body=VerifyBody(token=issued.token, scope="records:read"))
        bad = verify.sync(client=client, body=VerifyBody(token=issued.token, scope="records:write"))
        again = create_project.sync_detailed(client=client, body=ProjectCreate(name="generated"))
    assert isinstance(good, VerifyResult) and isinstance(bad, VerifyResult)
    print(json.dumps({
        "project": project.name,
        "scopes": issued.scopes,
        "state": shown.state,
        "good": [good.valid, good.reason, good.token_id == issued.id],
        "bad": [bad.valid, bad.reason],
        "conflict": [int(again.status_code), again.parsed.error],
    }))
    """
)


def _generator() -> list[str]:
    return [str(TOOL_BIN / "openapi-python-client")]


@pytest.mark.slow
async def test_a_generated_client_works_against_the_live_server(live, tmp_path: Path):
    document = tmp_path / "openapi.json"
    document.write_bytes(httpx.get(f"{live.url}/openapi.json").content)
    config = tmp_path / "config.json"
    config.write_text(json.dumps(CONFIG))
    out = tmp_path / "generated"
    generate = await asyncio.to_thread(
        subprocess.run,
        [*_generator(), "generate", "--path", str(document), "--output-path", str(out)]
        + ["--meta", "none", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    said = generate.stdout + generate.stderr
    assert generate.returncode == 0, said
    assert "Warning" not in said and "WARNING" not in said, said

    env = {
        "URL": live.url,
        "ADMIN_TOKEN": live.admin_token,
        "PATH": os.environ["PATH"],
        "PYTHONPATH": str(tmp_path),
    }
    used = await asyncio.to_thread(
        subprocess.run,
        [str(TOOL_BIN / "python"), "-c", USE],  # the generated code's own needs (attrs, dateutil)
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert used.returncode == 0, used.stdout + used.stderr
    assert json.loads(used.stdout) == {
        "project": "generated",
        "scopes": ["records:read"],
        "state": "active",
        "good": [True, "ok", True],
        "bad": [False, "insufficient_scope"],
        "conflict": [409, "project_exists"],
    }
