"""A real ``tokenward serve``: every line it logs is JSON, in one shape, and holds no token.

Lines of every origin are made to appear: tokenward's access log, uvicorn's error logger
(a request it cannot parse), alembic's (the migrations of a fresh database), the gateway's
and aiohttp's (a request the gateway cannot parse), Python's warnings.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import httpx

from tests.conftest import closed_port, serve_tokenward, tokenward_cmd
from tokenward.tokens.format import generate_token

#: What every line has, whoever wrote it.
KEYS = {"event", "level", "logger", "timestamp"}

POLICY = """
[[upstreams]]
name = "nowhere"
url = "http://127.0.0.1:{port}"

[[routes]]
upstream = "nowhere"
path = "/records/{{rest:path}}"
methods = ["GET"]
scope = "records:read"
"""


def raw_request(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_every_line_is_json_in_one_shape_and_holds_no_token(tmp_path: Path):
    env = {**os.environ, "TOKENWARD_DATA_DIR": str(tmp_path), "TOKENWARD_LOG_LEVEL": "info"}
    init = subprocess.run(
        tokenward_cmd("init", "--json"), env=env, capture_output=True, check=True, timeout=60
    )
    admin = json.loads(init.stdout)["admin_token"]
    # A database of its own, not yet migrated: the server migrates it as it starts.
    env["TOKENWARD_DATABASE_URL"] = f"sqlite+aiosqlite:///{tmp_path / 'fresh.db'}"
    secret = generate_token("live")
    log_path = tmp_path / "server.log"
    with closed_port() as dead, log_path.open("wb") as log_file:
        (tmp_path / "policy.toml").write_text(POLICY.format(port=dead))
        served = serve_tokenward(
            "--config", str(tmp_path / "policy.toml"), env=env, stderr=log_file
        )
        try:
            with httpx.Client(base_url=served.url, timeout=10) as client:
                # the access log (a secret pasted into a path is cut out of it)
                assert client.post("/v1/verify", json={"token": secret}).status_code == 401
                assert client.get(f"/v1/tokens/{secret}").status_code == 401
            # uvicorn's error logger: a request it cannot parse, a token in it
            answer = raw_request(
                served.port,
                f"GET / HTTP/1.1\r\nAuthorization: Bearer {secret}\x01\r\n\r\n".encode(),
            )
            assert b" 400 " in answer.split(b"\r\n", 1)[0]
            # the gateway's and aiohttp's: the same at the gateway's port
            assert served.gateway_port is not None
            bad_head = f"GET /records/1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {secret}\x01"
            answer = raw_request(served.gateway_port, f"{bad_head}\r\n\r\n".encode())
            assert b" 400 " in answer.split(b"\r\n", 1)[0]
            time.sleep(0.5)  # the access log is written in blocks, at most 0.2 s late
        finally:
            served.stop()
    stdout = served.stdout()
    lines = log_path.read_text().splitlines()
    assert lines, "the server logged nothing"
    entries = []
    for line in lines:
        entry = json.loads(line)  # every line: one JSON object
        assert isinstance(entry, dict), line
        assert set(entry) >= KEYS, line
        assert str(entry["timestamp"]).endswith("Z"), line
        entries.append(entry)
    loggers = {entry["logger"] for entry in entries}
    assert "tokenward.access" in loggers
    assert "uvicorn.error" in loggers
    assert "alembic.runtime.migration" in loggers
    assert "tokenward.gateway" in loggers
    migrations = [e for e in entries if e["logger"] == "alembic.runtime.migration"]
    assert all(str(e["event"]).startswith("Running upgrade") for e in migrations)
    requests = [e for e in entries if e["event"] == "request"]
    assert {"request_id", "method", "path", "status", "duration_ms"} <= set(requests[0])
    assert any(e["path"] == "/v1/tokens/tw_live_[redacted]" for e in requests)
    text = "\n".join(lines)
    for token in (secret, admin, secret[8:-6]):
        assert token not in text and token not in stdout
    # stdout carries the banner for a person, and no log line
    after_banner = stdout.split(served.printed, 1)[1]
    assert all(json.loads(line) for line in after_banner.splitlines() if line.strip())
