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
import ipaddress
import re
import secrets
import time
from urllib.parse import urlsplit

# One implementation, the SDK's (standard library only): the server signs with it too.
from tokenward_client.webhooks import (
    SECRET_PREFIX,
    sign,
    signing_key,
)
from tokenward_client.webhooks import verify_webhook_signature as verify_signature

TOLERANCE_SECONDS = 300
__all__ = [
    "check_webhook_url",
    "new_webhook_secret",
    "sign",
    "signed_headers",
    "signing_key",
    "verify_signature",
]


def new_webhook_secret() -> str:
    """A signing secret: ``whsec_`` and 24 random bytes in base64 (shown once)."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(24)).decode()


def signed_headers(
    secret: str, msg_id: str, body: bytes, timestamp: int | None = None
) -> dict[str, str]:
    at = int(time.time()) if timestamp is None else timestamp
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(at),
        "webhook-signature": sign(secret, msg_id, at, body),
    }


#: what an https webhook URL may be: the pattern the API documents (api/schemas.py)
_HTTPS_URL = re.compile(
    r"https://[a-z0-9](?:[a-z0-9.-]{0,60}[a-z0-9])?(?::[1-9][0-9]{0,3})?(?:/[A-Za-z0-9._~/-]{0,200})?"
)


def check_endpoint_url(url: str) -> str:
    """A lifecycle webhook endpoint's URL: :func:`check_webhook_url`, and an https URL held to
    the pattern the API documents (no query, no user info)."""
    if urlsplit(url).scheme == "https" and not _HTTPS_URL.fullmatch(url):
        raise ValueError(
            "webhook_url: https://host[:port][/path], the path of letters, digits and ._~/- "
            "only (no query, no user info)"
        )
    return check_webhook_url(url)


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
