"""The keyed hash's prepared HMAC (made once, copied per call) is byte for byte the standard
HMAC-SHA256."""

from __future__ import annotations

import hashlib
import hmac

from hypothesis import given
from hypothesis import strategies as st

from tokenward.tokens.hashing import Hmac256, ServerKey, TokenHasher


@given(key=st.binary(min_size=0, max_size=200), data=st.binary(max_size=300))
def test_prepared_hmac_is_rfc_2104_hmac_sha256(key: bytes, data: bytes) -> None:
    # Keys shorter than, equal to and longer than SHA-256's 64-byte block all occur.
    mac = Hmac256(key)
    assert mac.digest(data) == hmac.digest(key, data, "sha256")
    assert mac.hexdigest(data) == hmac.new(key, data, hashlib.sha256).hexdigest()
    assert mac.hexdigest(data) == mac.hexdigest(data)  # the prepared states are not consumed


def test_token_hasher_keeps_its_stored_form() -> None:
    current, previous = ServerKey.from_bytes(b"k" * 32), ServerKey.from_bytes(b"p" * 40)
    hasher = TokenHasher(current, [previous])
    token = "tw_live_example"
    assert hasher.hash(token) == hmac.digest(b"k" * 32, token.encode(), "sha256").hex()
    assert hasher.candidates(token) == [
        hmac.digest(b"k" * 32, token.encode(), "sha256").hex(),
        hmac.digest(b"p" * 40, token.encode(), "sha256").hex(),
    ]
    expected = hmac.new(b"k" * 32, b"fp\x00" + token.encode(), hashlib.sha256).hexdigest()
    assert hasher.fingerprint(token) == expected[:24]
