"""Webhook signatures, sealed signing secrets, and the GitHub Actions identity helper."""

from __future__ import annotations

import json
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tokenward.oauth.webhooks import SecretBox, check_webhook_url, sign
from tokenward.tokens.hashing import ServerKey, TokenHasher
from tokenward_client import github_actions_identity, verify_webhook_signature


def test_signature_round_trip_and_tampering():
    body = b'{"event":"token.rotated"}'
    now = int(time.time())
    header = sign("whsec_a", body, now)
    assert verify_webhook_signature("whsec_a", body, header)
    assert not verify_webhook_signature("whsec_b", body, header)
    assert not verify_webhook_signature("whsec_a", body + b" ", header)
    assert not verify_webhook_signature("whsec_a", body, sign("whsec_a", body, now - 3600))
    assert not verify_webhook_signature("whsec_a", body, "garbage")
    assert not verify_webhook_signature("whsec_a", body, f"t={now}")


def test_sealed_secrets_survive_server_key_rotation():
    old = ServerKey.from_bytes(secrets.token_bytes(32))
    new = ServerKey.from_bytes(secrets.token_bytes(32))
    sealed = SecretBox(TokenHasher(old)).seal("whsec_x")
    assert "whsec_x" not in sealed
    assert SecretBox(TokenHasher(new, [old])).open(sealed) == "whsec_x"
    with pytest.raises(KeyError):
        SecretBox(TokenHasher(new)).open(sealed)


def test_webhook_urls():
    assert check_webhook_url("https://hooks.example.com/x")
    assert check_webhook_url("http://127.0.0.1:8000/x")
    for bad in ("http://hooks.example.com/x", "ftp://x", "https://"):
        with pytest.raises(ValueError):
            check_webhook_url(bad)


def test_github_actions_identity_helper():
    seen = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            seen["path"] = self.path
            seen["auth"] = self.headers["authorization"]
            data = json.dumps({"value": "id.token.jwt"}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        env = {
            "ACTIONS_ID_TOKEN_REQUEST_URL": f"http://127.0.0.1:{server.server_address[1]}/t?x=1",
            "ACTIONS_ID_TOKEN_REQUEST_TOKEN": "runner-secret",
        }
        assert github_actions_identity("tokenward", env) == "id.token.jwt"
        assert "audience=tokenward" in seen["path"] and seen["auth"] == "Bearer runner-secret"
        with pytest.raises(RuntimeError, match="id-token: write"):
            github_actions_identity("tokenward", {})
    finally:
        server.shutdown()
        server.server_close()
