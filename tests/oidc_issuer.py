"""A real OIDC issuer on loopback for tests: discovery, JWKS, keys generated at test time."""

from __future__ import annotations

import functools
import json
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from joserfc import jwt
from joserfc.jwk import ECKey, KeySet, RSAKey


@functools.cache
def rsa_key(kid: str = "k1") -> RSAKey:
    """Generated once per test run (RSA key generation is slow), never stored anywhere."""
    return RSAKey.generate_key(2048, parameters={"kid": kid})


class Issuer:
    def __init__(self) -> None:
        self.keys: list[Any] = [rsa_key()]
        self.jwks_requests = 0
        issuer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/.well-known/openid-configuration":
                    body = {"issuer": issuer.url, "jwks_uri": issuer.url + "/jwks"}
                elif self.path == "/jwks":
                    issuer.jwks_requests += 1
                    body = KeySet(issuer.keys).as_dict(private=False)
                else:
                    self.send_error(404)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def rotate_keys(self) -> None:
        """The issuer starts signing with a new key and drops the old one from its JWKS."""
        kid = f"k{len(self.keys) + 1}"
        self.keys = [ECKey.generate_key("P-256", parameters={"kid": kid})]

    def token(self, key: Any = None, header: dict[str, Any] | None = None, **claims: Any) -> str:
        now = int(time.time())
        body: dict[str, Any] = {
            "iss": self.url,
            "aud": "tokenward",
            "sub": "repo:acme/shop:ref:refs/heads/main",
            "repository": "acme/shop",
            "ref": "refs/heads/main",
            "iat": now,
            "nbf": now,
            "exp": now + 300,
            "jti": secrets.token_hex(8),
        }
        body.update(claims)
        body = {k: v for k, v in body.items() if v is not None}
        key = key or self.keys[0]
        alg = {"RSA": "RS256", "EC": "ES256", "oct": "HS256"}[key.key_type]
        return jwt.encode({"alg": alg, "kid": key.kid, **(header or {})}, body, key)
