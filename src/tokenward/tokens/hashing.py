"""Keyed hashing of token secrets.

Only ``HMAC-SHA256(server_key, token)`` is stored. Each server key has a key id derived from
the key itself, so a database row records which key hashed it and the server key can be
rotated: new tokens use the current key, older rows stay findable through the previous keys.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass

MIN_KEY_BYTES = 32


def key_id(key: bytes) -> str:
    """A short public name for a server key (never reveals the key)."""
    return hashlib.sha256(b"tokenward-key-id\x00" + key).hexdigest()[:12]


@dataclass(frozen=True, slots=True)
class ServerKey:
    id: str
    secret: bytes

    @classmethod
    def from_bytes(cls, secret: bytes) -> ServerKey:
        if len(secret) < MIN_KEY_BYTES:
            raise ValueError(f"server key must be at least {MIN_KEY_BYTES} bytes")
        return cls(key_id(secret), secret)


class TokenHasher:
    """Hashes tokens with the current key; knows previous keys for lookups."""

    def __init__(self, current: ServerKey, previous: Sequence[ServerKey] = ()) -> None:
        self.current = current
        self.keys = [current, *previous]

    def hash(self, token: str) -> str:
        return hmac.digest(self.current.secret, token.encode(), "sha256").hex()

    def candidates(self, token: str) -> list[str]:
        """The token's hash under every known key, current first."""
        data = token.encode()
        return [hmac.digest(k.secret, data, "sha256").hex() for k in self.keys]

    def fingerprint(self, text: str) -> str:
        """A keyed fingerprint of arbitrary presented text (for correlating bad tokens)."""
        digest = hmac.new(self.current.secret, b"fp\x00" + text.encode(), hashlib.sha256)
        return digest.hexdigest()[:24]
