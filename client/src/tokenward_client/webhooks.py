"""Receiving tokenward's webhooks: check the ``Tokenward-Signature`` header.

``Tokenward-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>``.
Check it over the raw body, before parsing it; an old timestamp is refused (replay).
"""

from __future__ import annotations

import hashlib
import hmac
import time

#: How old a delivery may be, in seconds.
MAX_AGE_SECONDS = 300


def verify_webhook_signature(
    secret: str,
    body: bytes,
    header: str,
    *,
    now: float | None = None,
    max_age: int = MAX_AGE_SECONDS,
) -> bool:
    """Whether ``header`` signs ``body`` with ``secret`` and is at most ``max_age`` seconds old."""
    try:
        parts = dict(part.split("=", 1) for part in header.split(","))
        timestamp = int(parts["t"])
    except (ValueError, KeyError):
        return False
    if abs((time.time() if now is None else now) - timestamp) > max_age:
        return False
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return hmac.compare_digest(mac.hexdigest(), parts.get("v1", ""))
