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


class Hmac256:
    """HMAC-SHA256 under one fixed key, its key schedule prepared once.

    The standard library's ``hmac`` object, made once per key and copied per call: the same
    bytes as ``hmac.digest(key, data, "sha256")`` (RFC 2104), at less than half the cost
    for short inputs (measured: 2.4 µs against 6.0), since a copy does not derive the two
    padded key blocks again. Used on the hot paths (a token's hash, the audit chain).
    """

    __slots__ = ("_prepared",)

    def __init__(self, key: bytes) -> None:
        self._prepared = hmac.new(key, digestmod=hashlib.sha256)

    def digest(self, data: bytes) -> bytes:
        mac = self._prepared.copy()
        mac.update(data)
        return mac.digest()

    def hexdigest(self, data: bytes) -> str:
        mac = self._prepared.copy()
        mac.update(data)
        return mac.hexdigest()


class TokenHasher:
    """Hashes tokens with the current key; knows previous keys for lookups."""

    def __init__(self, current: ServerKey, previous: Sequence[ServerKey] = ()) -> None:
        self.current = current
        self.keys = [current, *previous]
        self._macs = [Hmac256(k.secret) for k in self.keys]

    def hash(self, token: str) -> str:
        return self._macs[0].hexdigest(token.encode())

    def candidates(self, token: str) -> list[str]:
        """The token's hash under every known key, current first."""
        data = token.encode()
        return [mac.hexdigest(data) for mac in self._macs]

    def fingerprint(self, text: str) -> str:
        """A keyed fingerprint of arbitrary presented text (for correlating bad tokens)."""
        return self._macs[0].hexdigest(b"fp\x00" + text.encode())[:24]
