"""Webhooks: HMAC-signed JSON POSTs, retried with backoff; signing secrets sealed at rest.

Each delivery carries::

    Tokenward-Event: token.rotated
    Tokenward-Delivery: dlv_…
    Tokenward-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>

A receiver recomputes the HMAC over the timestamp and the raw body, compares in constant time
(:func:`verify_signature`) and rejects old timestamps. The signing secret is shown once when
the webhook is configured; the server keeps it sealed with AES-GCM under a key derived from
the server key (a database dump alone does not reveal it).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import json
import os
import secrets
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tokenward.tokens.format import new_public_id
from tokenward.tokens.hashing import TokenHasher

SIGNATURE_HEADER = "Tokenward-Signature"
MAX_AGE_SECONDS = 300


def new_webhook_secret() -> str:
    return "whsec_" + secrets.token_urlsafe(32)


def sign(secret: str, body: bytes, timestamp: int) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def verify_signature(
    secret: str,
    body: bytes,
    header: str,
    *,
    now: float | None = None,
    max_age: int = MAX_AGE_SECONDS,
) -> bool:
    """Check a ``Tokenward-Signature`` header (for receivers; the SDK re-exports it)."""
    try:
        parts = dict(p.split("=", 1) for p in header.split(","))
        timestamp = int(parts["t"])
    except (ValueError, KeyError):
        return False
    if abs((time.time() if now is None else now) - timestamp) > max_age:
        return False
    return hmac.compare_digest(
        sign(secret, body, timestamp), f"t={timestamp},v1={parts.get('v1', '')}"
    )


def check_webhook_url(url: str) -> str:
    """https, or plain http to loopback only (a token travels in the body)."""
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError("webhook_url must be an https URL")
    if parts.scheme == "http":
        try:
            loopback = ipaddress.ip_address(parts.hostname).is_loopback
        except ValueError:
            loopback = parts.hostname == "localhost"
        if not loopback:
            raise ValueError("webhook_url must use https (http is allowed on loopback only)")
    return url


class SecretBox:
    """Seals webhook secrets with AES-GCM under keys derived from the server keys."""

    def __init__(self, hasher: TokenHasher) -> None:
        self._keys = {
            k.id: hashlib.sha256(b"tokenward-webhook-secrets\x00" + k.secret).digest()
            for k in hasher.keys
        }
        self._current = hasher.current.id

    def seal(self, secret: str) -> str:
        nonce = os.urandom(12)
        sealed = AESGCM(self._keys[self._current]).encrypt(nonce, secret.encode(), b"whsec")
        return f"{self._current}:{base64.b64encode(nonce + sealed).decode()}"

    def open(self, sealed: str) -> str:
        key_id, _, data = sealed.partition(":")
        raw = base64.b64decode(data)
        return AESGCM(self._keys[key_id]).decrypt(raw[:12], raw[12:], b"whsec").decode()


@dataclass(slots=True)
class DeliveryResult:
    ok: bool
    attempts: int
    status: int | None = None
    error: str | None = None


class WebhookSender:
    def __init__(self, *, attempts: int = 3, backoff: float = 1.0, timeout: float = 5.0) -> None:
        self.attempts = attempts
        self.backoff = backoff
        self.timeout = timeout

    async def deliver(
        self, url: str, secret: str, event: str, payload: dict[str, Any]
    ) -> DeliveryResult:
        """POST ``payload`` until a 2xx answer, at most ``attempts`` times with backoff."""
        delivery = new_public_id("dlv")
        body = json.dumps({"event": event, "delivery": delivery, **payload}).encode()
        error: str | None = None
        status: int | None = None
        async with httpx.AsyncClient(timeout=self.timeout, follow_redirects=False) as http:
            for attempt in range(1, self.attempts + 1):
                headers = {
                    "Content-Type": "application/json",
                    "User-Agent": "tokenward-webhook",
                    "Tokenward-Event": event,
                    "Tokenward-Delivery": delivery,
                    SIGNATURE_HEADER: sign(secret, body, int(time.time())),
                }
                try:
                    response = await http.post(url, content=body, headers=headers)
                    status = response.status_code
                    if 200 <= status < 300:
                        return DeliveryResult(True, attempt, status)
                    error = f"HTTP {status}"
                except httpx.HTTPError as exc:
                    error = type(exc).__name__
                if attempt < self.attempts:
                    await asyncio.sleep(self.backoff * 2 ** (attempt - 1))
        return DeliveryResult(False, self.attempts, status, error)
