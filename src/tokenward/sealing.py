"""Sealing secrets at rest: one helper for every secret the server must read back.

TOTP secrets of the dashboard, webhook signing secrets: tokenward must be able to read these
again, so they cannot be hashed; they are sealed with AES-256-GCM under a key derived (HKDF)
from a server key and a *purpose* (``totp``, ``webhook``), so a copy of the database alone
reveals nothing and a ciphertext sealed for one purpose does not open as another. A sealed
value names the server key that sealed it::

    tw1:<key id>:<base64url(nonce ‖ ciphertext ‖ tag)>

**Key rotation.** The server keys are the token hasher's (``TOKENWARD_SECRET_KEY`` or the
key file, current first). The current key seals; every configured key opens what it sealed,
so adding a new key in front keeps every sealed value readable, and :meth:`Sealer.reseal`
moves a value onto the current key (done when a value is read and written anyway).

**Older formats.** Before this helper there were three: the dashboard's ``v1:<key id>:…``
(AES-GCM, HKDF ``tokenward/dashboard-totp``), the rotation webhooks' ``<key id>:…`` (AES-GCM
under SHA-256 of a label and the key) and the alert webhooks' Fernet tokens. :meth:`open`
still reads all three, so nothing stored needs a migration step; a value is written in the
current format the next time it is sealed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Callable

from cryptography.exceptions import InvalidTag
from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from tokenward.tokens.hashing import ServerKey, TokenHasher

PREFIX = "tw1"
PURPOSES = frozenset({"totp", "webhook"})


class SealError(ValueError):
    """A sealed value that cannot be opened: damaged, or sealed under a key no longer set."""


def _hkdf(key: ServerKey, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(key.secret)


def _b64decode(data: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))
    except (binascii.Error, ValueError):
        raise SealError("the sealed value is damaged") from None


class Sealer:
    """Seals and opens the secrets of one ``purpose`` under the server keys."""

    def __init__(self, hasher: TokenHasher, purpose: str) -> None:
        if purpose not in PURPOSES:
            raise ValueError(f"unknown sealing purpose {purpose!r}")
        self.purpose = purpose
        self._current = hasher.current.id
        self._keys = {k.id: k for k in hasher.keys}
        self._aead = {
            k.id: AESGCM(_hkdf(k, b"tokenward/seal/" + purpose.encode())) for k in hasher.keys
        }

    def _aad(self, key_id: str) -> bytes:
        return f"{PREFIX}:{self.purpose}:{key_id}".encode()

    def seal(self, plaintext: str) -> str:
        nonce = secrets.token_bytes(12)
        sealed = self._aead[self._current].encrypt(
            nonce, plaintext.encode(), self._aad(self._current)
        )
        blob = base64.urlsafe_b64encode(nonce + sealed).decode().rstrip("=")
        return f"{PREFIX}:{self._current}:{blob}"

    def open(self, sealed: str) -> str:
        """The plaintext; :class:`SealError` when the value cannot be opened."""
        head, _, rest = sealed.partition(":")
        if head == PREFIX:
            key_id, _, blob = rest.partition(":")
            aead = self._aead.get(key_id)
            if aead is None:
                raise SealError("sealed with a server key that is no longer configured")
            raw = _b64decode(blob)
            try:
                return aead.decrypt(raw[:12], raw[12:], self._aad(key_id)).decode()
            except (InvalidTag, ValueError):
                raise SealError("the sealed value does not open under its key") from None
        return self._open_legacy(sealed)

    def is_current(self, sealed: str) -> bool:
        """Whether ``sealed`` is in today's format under the current key."""
        return sealed.startswith(f"{PREFIX}:{self._current}:")

    def reseal(self, sealed: str) -> str:
        """``sealed`` moved onto the current key and format (unchanged if it already is)."""
        return sealed if self.is_current(sealed) else self.seal(self.open(sealed))

    # -- formats written before this helper ---------------------------------------------
    def _open_legacy(self, sealed: str) -> str:
        if self.purpose == "totp" and sealed.startswith("v1:"):
            _, key_id, blob = [*sealed.split(":", 2), "", ""][:3]
            return self._legacy_aes(
                key_id, blob, lambda k: _hkdf(k, b"tokenward/dashboard-totp"), key_id.encode()
            )
        if self.purpose == "webhook":
            if sealed.startswith("gAAAAA"):  # the alert webhooks' Fernet tokens
                return self._legacy_fernet(sealed)
            key_id, sep, blob = sealed.partition(":")
            if sep and key_id in self._keys:  # the rotation webhooks' format
                return self._legacy_aes(
                    key_id,
                    blob,
                    lambda k: hashlib.sha256(b"tokenward-webhook-secrets\x00" + k.secret).digest(),
                    b"whsec",
                    standard_b64=True,
                )
        raise SealError("not a sealed value")

    def _legacy_aes(
        self,
        key_id: str,
        blob: str,
        derive: Callable[[ServerKey], bytes],
        aad: bytes,
        *,
        standard_b64: bool = False,
    ) -> str:
        key = self._keys.get(key_id)
        if key is None:
            raise SealError("sealed with a server key that is no longer configured")
        try:
            raw = base64.b64decode(blob) if standard_b64 else base64.urlsafe_b64decode(blob)
            return AESGCM(derive(key)).decrypt(raw[:12], raw[12:], aad).decode()
        except (InvalidTag, ValueError, binascii.Error):
            raise SealError("the sealed value does not open under its key") from None

    def _legacy_fernet(self, sealed: str) -> str:
        for key in self._keys.values():
            derived = hmac.new(key.secret, b"tokenward-webhook-secret-v1", hashlib.sha256).digest()
            try:
                return Fernet(base64.urlsafe_b64encode(derived)).decrypt(sealed.encode()).decode()
            except InvalidToken:
                continue
        raise SealError("the sealed value does not open under any configured key")
