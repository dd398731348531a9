"""One helper seals every secret the server reads back: rotation, purposes, older formats."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets

import pytest
from cryptography.fernet import Fernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from tokenward.sealing import Sealer, SealError
from tokenward.tokens.hashing import ServerKey, TokenHasher


def new_key() -> ServerKey:
    return ServerKey.from_bytes(secrets.token_bytes(32))


def test_seal_opens_and_hides_the_plaintext():
    sealer = Sealer(TokenHasher(new_key()), "webhook")
    sealed = sealer.seal("whsec_abc")
    assert "whsec_abc" not in sealed and sealed.startswith("tw1:")
    assert sealer.open(sealed) == "whsec_abc"
    assert sealer.seal("whsec_abc") != sealed  # a fresh nonce each time


def test_a_new_key_seals_and_old_keys_still_open():
    old, new = new_key(), new_key()
    sealed_old = Sealer(TokenHasher(old), "totp").seal("JBSWY3DP")
    rotated = Sealer(TokenHasher(new, [old]), "totp")
    assert rotated.open(sealed_old) == "JBSWY3DP"
    assert not rotated.is_current(sealed_old)
    resealed = rotated.reseal(sealed_old)
    assert rotated.is_current(resealed) and resealed.split(":")[1] == new.id
    assert rotated.reseal(resealed) == resealed
    # once the old key is dropped, what it sealed no longer opens; what the new one sealed does
    only_new = Sealer(TokenHasher(new), "totp")
    assert only_new.open(resealed) == "JBSWY3DP"
    with pytest.raises(SealError, match="no longer configured"):
        only_new.open(sealed_old)


def test_purposes_do_not_open_each_other():
    hasher = TokenHasher(new_key())
    sealed = Sealer(hasher, "totp").seal("x")
    with pytest.raises(SealError):
        Sealer(hasher, "webhook").open(sealed)
    with pytest.raises(ValueError, match="unknown sealing purpose"):
        Sealer(hasher, "other")


@pytest.mark.parametrize(
    "damage",
    ["flip", "truncate", "garbage", "empty"],
    ids=["flip", "truncate", "garbage", "empty"],
)
def test_damaged_values_raise_seal_error(damage):
    sealer = Sealer(TokenHasher(new_key()), "webhook")
    sealed = sealer.seal("whsec_abc")
    bad = {
        "flip": sealed[:-3] + ("AAA" if not sealed.endswith("AAA") else "BBB"),
        "truncate": sealed[:20],
        "garbage": "tw1:nokey:@@@",
        "empty": "",
    }[damage]
    with pytest.raises(SealError):
        sealer.open(bad)


def test_values_sealed_by_the_three_older_helpers_still_open():
    key = new_key()
    hasher = TokenHasher(new_key(), [key])  # and the key that sealed them is no longer current
    # the dashboard's TOTP format
    nonce = os.urandom(12)
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"tokenward/dashboard-totp")
    blob = AESGCM(hkdf.derive(key.secret)).encrypt(nonce, b"TOTPSECRET", key.id.encode())
    totp = f"v1:{key.id}:" + base64.urlsafe_b64encode(nonce + blob).decode()
    assert Sealer(hasher, "totp").open(totp) == "TOTPSECRET"
    # the rotation webhooks' format
    aes_key = hashlib.sha256(b"tokenward-webhook-secrets\x00" + key.secret).digest()
    blob = AESGCM(aes_key).encrypt(nonce, b"whsec_rot", b"whsec")
    rotation = f"{key.id}:" + base64.b64encode(nonce + blob).decode()
    assert Sealer(hasher, "webhook").open(rotation) == "whsec_rot"
    # the alert webhooks' Fernet format
    derived = hmac.new(key.secret, b"tokenward-webhook-secret-v1", hashlib.sha256).digest()
    fernet = Fernet(base64.urlsafe_b64encode(derived)).encrypt(b"whsec_alert").decode()
    webhook = Sealer(hasher, "webhook")
    assert webhook.open(fernet) == "whsec_alert"
    assert webhook.is_current(webhook.reseal(fernet))
    with pytest.raises(SealError):
        Sealer(TokenHasher(new_key()), "webhook").open(fernet)
