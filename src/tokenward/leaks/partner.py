"""Reports from a secret-scanning partner, in the format GitHub's partner program uses.

A report is a JSON array of ``{"token", "type", "url", "source"}`` objects, POSTed with an
ECDSA P-256 / SHA-256 signature of the raw body (base64 DER) in
``Github-Public-Key-Signature`` and the id of the signing key in
``Github-Public-Key-Identifier``. The public keys are a JSON document
``{"public_keys": [{"key_identifier", "key" (PEM), "is_current"}]}`` fetched from a
configured URL (cached for a TTL, and fetched again for a key id it does not know, at most
once per :data:`MIN_REFETCH` seconds: keys rotate, and an unknown id must not make every
forged report a fetch), or configured inline (that document, or PEM blocks: then any of them may
sign). The answer, per reported token, is ``{"token_hash", "token_type", "label"}`` with
``label`` ``true_positive`` or ``false_positive``, and never the token itself.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import ipaddress
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
import structlog
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

log = structlog.get_logger("tokenward.leaks")

KEY_ID_HEADER = "Github-Public-Key-Identifier"
SIGNATURE_HEADER = "Github-Public-Key-Signature"
#: a key id or signature longer than this is not one (P-256 DER signatures are ≤ 72 bytes)
MAX_KEY_ID = 128
MAX_SIGNATURE = 256
#: the least time between two fetches of the keys document for unknown key ids (seconds)
MIN_REFETCH = 60.0
#: the largest keys document read (bytes)
MAX_KEYS_DOCUMENT = 1 << 20
MAX_TOKEN = 1000
MAX_TYPE = 128
MAX_URL = 2048
MAX_SOURCE = 64


class ReportError(Exception):
    """A report refused: ``status`` (400, 401, 422, 503), stable ``code``, ``message``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class ReportedToken:
    token: str
    type: str
    url: str
    source: str | None

    @property
    def token_hash(self) -> str:
        """What the answer names the token by: the hex SHA-256 of it (never the token)."""
        return hashlib.sha256(self.token.encode("utf-8", "replace")).hexdigest()


def key_identifier(key: ec.EllipticCurvePublicKey) -> str:
    """An inline PEM key's id: the hex SHA-256 of its DER SubjectPublicKeyInfo."""
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


def _p256(pem: str | bytes) -> ec.EllipticCurvePublicKey:
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ValueError("not a PEM public key") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("not an ECDSA P-256 public key")
    return key


def parse_keys(text: str) -> tuple[dict[str, ec.EllipticCurvePublicKey], bool]:
    """Keys by id from a keys document or PEM blocks; the flag: ids were not given (PEM),
    so a report signed by any of them is taken whatever id it names."""
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            document = json.loads(stripped)
            entries = document["public_keys"]
            if not isinstance(entries, list):
                raise TypeError
            keys = {}
            for entry in entries:
                keys[str(entry["key_identifier"])] = _p256(str(entry["key"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(
                'not a public keys document ({"public_keys": [{"key_identifier", "key"}]})'
            ) from exc
        return keys, False
    marker = "-----END PUBLIC KEY-----"
    blocks = [b + marker for b in stripped.split(marker) if b.strip()]
    if not blocks:
        raise ValueError("no PEM public key")
    parsed = [_p256(block) for block in blocks]
    return {key_identifier(k): k for k in parsed}, True


def check_keys_url(url: str) -> str:
    """https, or plain http to loopback only (for a partner's keys, as for webhooks)."""
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError("the public keys URL must be an https URL")
    if parts.scheme == "http":
        try:
            loopback = ipaddress.ip_address(parts.hostname).is_loopback
        except ValueError:
            loopback = parts.hostname == "localhost"
        if not loopback:
            raise ValueError("the public keys URL must use https (http on loopback only)")
    return url


class PartnerKeys:
    """The partner's public keys: fetched from ``url`` and cached ``ttl`` seconds, and/or
    given ``inline``."""

    def __init__(
        self,
        *,
        url: str | None = None,
        inline: str | None = None,
        ttl: float = 3600.0,
        timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url = url
        self.ttl = ttl
        self.timeout = timeout
        self.clock = clock
        self.inline: dict[str, ec.EllipticCurvePublicKey] = {}
        self.inline_any = False
        if inline:
            self.inline, self.inline_any = parse_keys(inline)
        self.fetched: dict[str, ec.EllipticCurvePublicKey] = {}
        self.fresh_until = float("-inf")
        self.last_fetch = float("-inf")
        self.last_refetch = float("-inf")
        self.fetches = 0
        self._lock = asyncio.Lock()

    @property
    def configured(self) -> bool:
        return bool(self.url or self.inline)

    async def keys_for(self, key_id: str) -> list[ec.EllipticCurvePublicKey]:
        """The keys a report naming ``key_id`` may be signed with (empty: none known)."""
        if key_id in self.inline:
            return [self.inline[key_id]]
        if self.url is not None:
            now = self.clock()
            if now >= self.fresh_until:
                await self._refresh()
            elif key_id not in self.fetched and now - self.last_refetch >= MIN_REFETCH:
                self.last_refetch = now  # an unknown id: fetch again, once a minute at most
                await self._refresh(force=True)
            if key_id in self.fetched:
                return [self.fetched[key_id]]
        return list(self.inline.values()) if self.inline_any else []

    async def _refresh(self, *, force: bool = False) -> None:
        async with self._lock:
            now = self.clock()
            if not force and now < self.fresh_until:  # another request fetched meanwhile
                return
            self.last_fetch = now
            self.fetches += 1
            try:
                self.fetched = await self._fetch()
            except (httpx.HTTPError, ValueError) as exc:
                log.warning("leak_keys_fetch_failed", error=type(exc).__name__)
                if not self.fetched:
                    raise ReportError(
                        503, "leak_keys_unavailable", "the partner's public keys cannot be read"
                    ) from None
                self.fresh_until = now + MIN_REFETCH  # keep the keys we have a while
                return
            self.fresh_until = now + self.ttl

    async def _fetch(self) -> dict[str, ec.EllipticCurvePublicKey]:
        assert self.url is not None
        async with (
            httpx.AsyncClient(timeout=self.timeout, follow_redirects=False) as client,
            client.stream("GET", self.url, headers={"Accept": "application/json"}) as response,
        ):
            response.raise_for_status()
            body = b""
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > MAX_KEYS_DOCUMENT:
                    raise ValueError("keys document too large")
        keys, _ = parse_keys(body.decode("utf-8", "replace"))
        return keys


async def verify_signature(
    keys: PartnerKeys, body: bytes, key_id: str | None, signature: str | None
) -> None:
    """Raise :class:`ReportError` (401) unless ``body`` is signed by the named partner key."""
    if not keys.configured:
        raise ReportError(
            401, "leak_reports_not_configured", "this server takes no leak reports (no keys)"
        )
    if not key_id or not signature:
        raise ReportError(
            401,
            "missing_signature",
            f"a leak report needs the {KEY_ID_HEADER} and {SIGNATURE_HEADER} headers",
        )
    if len(key_id) > MAX_KEY_ID or len(signature) > MAX_SIGNATURE:
        raise ReportError(401, "bad_signature", "the signature does not verify")
    try:
        der = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError):
        raise ReportError(401, "bad_signature", "the signature is not base64") from None
    candidates = await keys.keys_for(key_id)
    if not candidates:
        raise ReportError(401, "unknown_key", "the signing key is not one of the partner's")
    for key in candidates:
        try:
            key.verify(der, body, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            continue
        return
    raise ReportError(401, "bad_signature", "the signature does not verify")


def parse_report(body: bytes, max_tokens: int) -> list[ReportedToken]:
    """The reported matches, or :class:`ReportError` (400 not JSON, 422 not a report)."""
    try:
        document: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ReportError(400, "invalid_json", "the request body is not valid JSON") from None
    if not isinstance(document, list) or not document:
        raise ReportError(422, "invalid_leak_report", "a leak report is a non-empty JSON array")
    if len(document) > max_tokens:
        raise ReportError(
            422, "too_many_tokens", f"a leak report holds at most {max_tokens} tokens"
        )
    reported = []
    for index, item in enumerate(document):
        if not isinstance(item, dict):
            raise ReportError(422, "invalid_leak_report", f"[{index}] is not an object")
        token, kind, url = item.get("token"), item.get("type"), item.get("url")
        source = item.get("source")
        limits = ((token, "token", MAX_TOKEN), (kind, "type", MAX_TYPE), (url, "url", MAX_URL))
        for value, name, limit in limits:
            if not isinstance(value, str) or not value or len(value) > limit:
                raise ReportError(
                    422,
                    "invalid_leak_report",
                    f"[{index}].{name} must be a string of 1 to {limit} characters",
                )
        if source is not None and (not isinstance(source, str) or len(source) > MAX_SOURCE):
            raise ReportError(
                422,
                "invalid_leak_report",
                f"[{index}].source must be a string of at most {MAX_SOURCE} characters",
            )
        assert isinstance(token, str) and isinstance(kind, str) and isinstance(url, str)
        reported.append(ReportedToken(token, kind, url, source))
    return reported
