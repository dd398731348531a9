"""Standard Webhooks signatures (https://www.standardwebhooks.com), and webhook URLs.

Every delivery carries three headers::

    webhook-id: msg_…                 the same on every retry (receivers drop duplicates)
    webhook-timestamp: 1714000000     unix seconds of this attempt
    webhook-signature: v1,<base64>    HMAC-SHA256 over "<id>.<timestamp>.<body>"

The signing key is the base64 part of the secret (``whsec_<base64>``), decoded the way the
reference implementations do, so any Standard Webhooks library verifies what tokenward sends
(tested against the specification's test vector and the ``standardwebhooks`` package).
A receiver recomputes the MAC over the raw body, compares in constant time
(:func:`verify_signature`) and rejects timestamps more than five minutes away.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import secrets
import time
from collections.abc import Mapping
from urllib.parse import urlsplit

SECRET_PREFIX = "whsec_"  # noqa: S105  (a prefix, not a secret)
TOLERANCE_SECONDS = 300


def new_webhook_secret() -> str:
    """A signing secret: ``whsec_`` and 24 random bytes in base64 (shown once)."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(24)).decode()


def signing_key(secret: str) -> bytes:
    """The HMAC key of ``secret``: its base64 part decoded as the reference libraries do
    (lenient: characters outside the alphabet are skipped). A secret that is not base64 at
    all signs with its own bytes (tokenward's SDK verifies those too)."""
    raw = secret.removeprefix(SECRET_PREFIX)
    try:
        key = base64.b64decode(raw + "==")
    except (binascii.Error, ValueError):
        key = b""
    return key or secret.encode()


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: ``v1,<base64 HMAC-SHA256(key, id.timestamp.body)>``."""
    mac = hmac.new(
        signing_key(secret), f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256
    ).digest()
    return "v1," + base64.b64encode(mac).decode()


def signed_headers(
    secret: str, msg_id: str, body: bytes, timestamp: int | None = None
) -> dict[str, str]:
    at = int(time.time()) if timestamp is None else timestamp
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(at),
        "webhook-signature": sign(secret, msg_id, at, body),
    }


def verify_signature(
    secret: str,
    body: bytes,
    headers: Mapping[str, str],
    *,
    now: float | None = None,
    tolerance: float = TOLERANCE_SECONDS,
) -> bool:
    """What a receiver does with a delivery: ``True`` when one of the ``v1`` signatures
    matches and the timestamp is recent. ``headers`` may use any case."""
    lower = {k.lower(): v for k, v in headers.items()}
    msg_id = lower.get("webhook-id", "")
    stamp = lower.get("webhook-timestamp", "")
    signatures = lower.get("webhook-signature", "")
    if not (msg_id and stamp.isascii() and stamp.isdigit() and signatures):
        return False
    timestamp = int(stamp)
    if abs((time.time() if now is None else now) - timestamp) > tolerance:
        return False
    expected = sign(secret, msg_id, timestamp, body)
    return any(
        hmac.compare_digest(expected.encode(), candidate.encode())
        for candidate in signatures.split(" ")
        if candidate.startswith("v1,")
    )


def check_webhook_url(url: str) -> str:
    """https, or plain http to loopback only (deliveries carry token ids, and a rotation
    delivers a token)."""
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
