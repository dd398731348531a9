"""Webhook signatures (Standard Webhooks), sealed signing secrets, webhook URLs, and the
GitHub Actions identity helper."""

from __future__ import annotations

import json
import secrets
import threading
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import standardwebhooks

from tokenward.sealing import Sealer, SealError
from tokenward.tokens.hashing import ServerKey, TokenHasher
from tokenward.webhooks.signing import (
    check_webhook_url,
    new_webhook_secret,
    sign,
    signed_headers,
)
from tokenward_client import github_actions_identity, verify_webhook_signature

#: the specification's published test vector
VECTOR = {
    "secret": "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
    "id": "msg_p5jXN8AQM9LWM0D4loKWxJek",
    "timestamp": 1614265330,
    "body": b'{"test": 2432232314}',
    "signature": "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=",
}


def test_signature_matches_the_specification_test_vector():
    v = VECTOR
    assert sign(v["secret"], v["id"], v["timestamp"], v["body"]) == v["signature"]
    headers = {
        "webhook-id": v["id"],
        "webhook-timestamp": str(v["timestamp"]),
        "webhook-signature": "v1,bm9wZQ== " + v["signature"],  # any one of several matches
    }
    assert verify_webhook_signature(v["secret"], v["body"], headers, now=v["timestamp"])
    assert not verify_webhook_signature(v["secret"], v["body"], headers, now=v["timestamp"] + 301)


def test_the_reference_library_verifies_what_tokenward_signs():
    for secret in (new_webhook_secret(), "whsec_" + secrets.token_hex(24)):  # new; old alerts
        body = json.dumps({"type": "token.revoked", "data": {"token_id": "tok_x"}}).encode()
        headers = signed_headers(secret, "msg_1", body)
        assert standardwebhooks.Webhook(secret).verify(body, headers) is not None
        signed = standardwebhooks.Webhook(secret).sign("msg_2", datetime.now(UTC), body.decode())
        theirs = {"webhook-id": "msg_2", "webhook-timestamp": str(int(time.time()))}
        assert verify_webhook_signature(secret, body, {**theirs, "webhook-signature": signed})


def test_signature_round_trip_and_tampering():
    secret = new_webhook_secret()
    assert secret.startswith("whsec_")
    body = b'{"type":"token.rotated"}'
    headers = signed_headers(secret, "msg_a", body)
    assert verify_webhook_signature(secret, body, headers)
    assert verify_webhook_signature(secret, body, {k.upper(): v for k, v in headers.items()})
    assert not verify_webhook_signature(new_webhook_secret(), body, headers)
    assert not verify_webhook_signature(secret, body + b" ", headers)
    assert not verify_webhook_signature(secret, body, {**headers, "webhook-id": "msg_b"})
    old = signed_headers(secret, "msg_a", body, int(time.time()) - 3600)
    assert not verify_webhook_signature(secret, body, old)
    for broken in (
        {},
        {**headers, "webhook-timestamp": "soon"},
        {**headers, "webhook-signature": "x"},
    ):
        assert not verify_webhook_signature(secret, body, broken)


def test_sealed_secrets_survive_server_key_rotation():
    old = ServerKey.from_bytes(secrets.token_bytes(32))
    new = ServerKey.from_bytes(secrets.token_bytes(32))
    sealed = Sealer(TokenHasher(old), "webhook").seal("whsec_x")
    assert "whsec_x" not in sealed
    assert Sealer(TokenHasher(new, [old]), "webhook").open(sealed) == "whsec_x"
    with pytest.raises(SealError):
        Sealer(TokenHasher(new), "webhook").open(sealed)


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
