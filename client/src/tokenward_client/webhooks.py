"""Receiving tokenward's webhooks: check their Standard Webhooks signature.

Every delivery carries ``webhook-id``, ``webhook-timestamp`` and ``webhook-signature:
v1,<base64 HMAC-SHA256(key, "<id>.<timestamp>.<raw body>")>``, the key being the base64 part
of the ``whsec_…`` secret (https://www.standardwebhooks.com). Check it over the raw body,
before parsing it; a timestamp more than five minutes away is refused (replay).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Mapping

#: How far a delivery's timestamp may be from now, in seconds.
MAX_AGE_SECONDS = 300
SECRET_PREFIX = "whsec_"  # noqa: S105  (a prefix, not a secret)


def signing_key(secret: str) -> bytes:
    """The HMAC key of ``secret``: its base64 part decoded as the reference libraries do
    (lenient: characters outside the alphabet are skipped); a secret that is not base64 at
    all signs with its own bytes."""
    try:
        key = base64.b64decode(secret.removeprefix(SECRET_PREFIX) + "==")
    except (binascii.Error, ValueError):
        key = b""
    return key or secret.encode()


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value for one delivery."""
    data = f"{msg_id}.{timestamp}.".encode() + body
    return (
        "v1,"
        + base64.b64encode(hmac.new(signing_key(secret), data, hashlib.sha256).digest()).decode()
    )


def verify_webhook_signature(
    secret: str,
    body: bytes,
    headers: Mapping[str, str],
    *,
    now: float | None = None,
    max_age: float = MAX_AGE_SECONDS,
) -> bool:
    """Whether ``headers`` (any case) sign ``body`` with ``secret``, at most ``max_age``
    seconds from now. One matching ``v1`` signature of several is enough."""
    lower = {k.lower(): v for k, v in headers.items()}
    msg_id = lower.get("webhook-id", "")
    stamp = lower.get("webhook-timestamp", "")
    signatures = lower.get("webhook-signature", "")
    if not (msg_id and stamp.isascii() and stamp.isdigit() and signatures):
        return False
    timestamp = int(stamp)
    if abs((time.time() if now is None else now) - timestamp) > max_age:
        return False
    expected = sign(secret, msg_id, timestamp, body).encode()
    return any(
        hmac.compare_digest(expected, candidate.encode())
        for candidate in signatures.split(" ")
        if candidate.startswith("v1,")
    )
