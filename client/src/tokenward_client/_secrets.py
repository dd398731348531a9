"""What a token secret looks like, so that the clients never put one into a URL.

The same wire format as the server's ``tokens/format.py`` (``tw_<env>_<body><check>``), kept
here so the SDK needs no server code; a test holds the two to the same answers.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_BASE62_SET = frozenset(BASE62)
_LENGTH = len("tw_live_") + 32 + 6
_EMBEDDED = re.compile(r"tw_(live|test)_[0-9A-Za-z]{38}")


def is_token(value: str) -> bool:
    """Whether ``value`` has a token's shape (its checksum right or wrong: a typo is a secret)."""
    return (
        len(value) == _LENGTH
        and value[:8] in ("tw_live_", "tw_test_")
        and _BASE62_SET.issuperset(value[8:])
    )


def holds_token(text: str) -> bool:
    """Whether ``text`` holds a token's shape anywhere, percent-encoded (up to thrice) or not."""
    for _ in range(3):
        if "%" not in text:
            break
        text = unquote(text, errors="replace")
    return _EMBEDDED.search(text) is not None


def looks_like_secret(value: str) -> bool:
    """Whether ``value`` is, holds or nearly is a token secret (a cut one is still one)."""
    if is_token(value) or holds_token(value):
        return True
    # Project names are lowercase only: an uppercase letter after the prefix is a secret's.
    return value[:8] in ("tw_live_", "tw_test_") and any(c.isupper() for c in value[8:])
