"""Secrets of the dashboard: passwords, TOTP, recovery codes, session ids and CSRF tokens.

* Passwords are argon2id hashes (argon2-cffi's RFC 9106 defaults).
* TOTP secrets are sealed at rest by :mod:`tokenward.sealing` (AES-GCM under a key derived
  from the server key, with its key id), so a copy of the database alone does not let anyone
  mint second factors, and the server key can rotate.
* Recovery codes, session ids and CSRF tokens are random; only keyed hashes of recovery codes
  and session ids are stored, and a CSRF token is an HMAC of its session id (nothing to store).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

import pyotp
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from tokenward.sealing import Sealer
from tokenward.tokens.hashing import ServerKey, TokenHasher

RECOVERY_CODE_COUNT = 10
_RECOVERY_ALPHABET = "abcdefghjkmnpqrstuvwxyz23456789"  # no 0/o, 1/l/i
_passwords = PasswordHasher()
# A hash of a random password: checked against when the login is unknown, so an unknown login
# costs the same time as a wrong password and logins cannot be enumerated by timing. Made on
# first use (hashing takes a moment; the CLI should not pay it at import).
_DUMMY_HASH: str | None = None


def _dummy_hash() -> str:
    global _DUMMY_HASH
    if _DUMMY_HASH is None:
        _DUMMY_HASH = _passwords.hash(secrets.token_urlsafe(16))
    return _DUMMY_HASH


def hash_password(password: str) -> str:
    return _passwords.hash(password)


def check_password(stored: str | None, password: str) -> bool:
    try:
        return _passwords.verify(stored or _dummy_hash(), password) and stored is not None
    except (VerificationError, InvalidHashError):
        return False


def password_needs_rehash(stored: str) -> bool:
    return _passwords.check_needs_rehash(stored)


def generate_password() -> str:
    """A password to hand out once (about 120 bits)."""
    return secrets.token_urlsafe(15)


def generate_recovery_code() -> str:
    raw = "".join(secrets.choice(_RECOVERY_ALPHABET) for _ in range(10))
    return f"{raw[:5]}-{raw[5:]}"


def normalize_code(text: str) -> str:
    return "".join(ch for ch in text.lower() if ch.isalnum())


def _derive(key: ServerKey, purpose: bytes) -> bytes:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"tokenward/" + purpose)
    return hkdf.derive(key.secret)


@dataclass(frozen=True, slots=True)
class DashboardKeys:
    """Keys derived from the server key(s) for the dashboard's secrets."""

    hasher: TokenHasher

    def _mac_key(self) -> bytes:
        return _derive(self.hasher.current, b"dashboard-mac")

    def mac(self, purpose: str, value: str) -> str:
        data = purpose.encode() + b"\x00" + value.encode()
        return hmac.new(self._mac_key(), data, hashlib.sha256).hexdigest()

    # -- sessions and CSRF ----------------------------------------------------------------
    def session_hash(self, session_id: str) -> str:
        return self.mac("session", session_id)

    def csrf_token(self, session_id: str) -> str:
        return self.mac("csrf", session_id)

    def csrf_ok(self, session_id: str, presented: str | None) -> bool:
        if not presented:
            return False
        return hmac.compare_digest(self.csrf_token(session_id), presented)

    def recovery_hash(self, user_id: str, code: str) -> str:
        return self.mac("recovery:" + user_id, normalize_code(code))

    # -- TOTP secrets at rest (tokenward.sealing: AES-GCM, key ids, rotation) -----------
    def encrypt(self, plaintext: str) -> str:
        return Sealer(self.hasher, "totp").seal(plaintext)

    def decrypt(self, stored: str) -> str:
        """The TOTP secret; :class:`ValueError` (a ``SealError``) when it does not open."""
        return Sealer(self.hasher, "totp").open(stored)


def new_session_id() -> str:
    return secrets.token_urlsafe(32)


def new_totp_secret() -> str:
    return pyotp.random_base32(32)


def totp_uri(secret: str, login: str, issuer: str = "tokenward") -> str:
    return pyotp.TOTP(secret).provisioning_uri(name=login, issuer_name=issuer)


def totp_step(secret: str, code: str, at: float, *, window: int = 1) -> int | None:
    """The time step a 6-digit ``code`` belongs to (within ±``window`` steps), or ``None``."""
    code = code.strip().replace(" ", "")
    if len(code) != 6 or not (code.isascii() and code.isdigit()):
        return None
    totp = pyotp.TOTP(secret)
    step = int(at // totp.interval)
    for offset in range(-window, window + 1):
        candidate = step + offset
        if hmac.compare_digest(totp.generate_otp(candidate), code):
            return candidate
    return None
