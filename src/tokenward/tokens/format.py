"""Token wire format: ``tw_<env>_<body><check>`` (DESIGN.md §3).

* ``env`` is ``live`` or ``test`` and is visible to anyone who sees the token;
* ``body`` is 32 base62 characters from :mod:`secrets` (about 190 bits);
* ``check`` is the CRC32 of everything before it, as 6 base62 characters.

The checksum lets a scanner confirm a match of :data:`TOKEN_PATTERN` without false
positives and lets the verifier reject typos and garbage before any store lookup.
"""

from __future__ import annotations

import re
import secrets
import zlib
from dataclasses import dataclass
from enum import StrEnum
from typing import Any
from urllib.parse import unquote

BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
BODY_LENGTH = 32
CHECK_LENGTH = 6
PREFIX = "tw_"
TOKEN_LENGTH = len(PREFIX) + 4 + 1 + BODY_LENGTH + CHECK_LENGTH  # "live"/"test" are both 4

#: One regex finds every tokenward token in text (for leak scanners).
TOKEN_PATTERN = re.compile(r"\btw_(?:live|test)_[0-9A-Za-z]{38}\b")

_BASE62_SET = frozenset(BASE62)


#: A token's shape anywhere in text, for what must never be recorded: unlike
#: :data:`TOKEN_PATTERN` (a scanner's, which wants word boundaries against false positives),
#: it also finds a secret glued to other characters (``tok_tw_live_…``) and, no checksum
#: asked, a damaged one (a near-secret is a secret too).
_EMBEDDED = re.compile(r"tw_(live|test)_[0-9A-Za-z]{38}")
#: How many layers of percent-encoding are seen through (``%2574`` is ``t`` encoded twice).
_DECODINGS = 3


def _decoded(text: str) -> str:
    """``text`` with its percent-encoding undone (as a URL path may carry a secret)."""
    for _ in range(_DECODINGS):
        if "%" not in text:
            break
        text = unquote(text, errors="replace")
    return text


def holds_token(text: str) -> bool:
    """Whether ``text`` holds something shaped like a token, anywhere in it, percent-encoded
    or not.

    The one rule for every text tokenward stores or logs: what a caller typed is refused
    when this holds (``token_in_field``), what the server records about a request it did
    not choose (a header, a path) goes through :func:`redact_tokens`.
    """
    if "%" in text:
        text = _decoded(text)
    return "tw_" in text and _EMBEDDED.search(text) is not None


def redact_tokens(text: str) -> str:
    """``text`` with every token-shaped string cut to its public prefix.

    For what a server records about a request it did not choose, a URL path or a header
    above all: a client that pastes a secret where an id belongs (``/v1/tokens/tw_live_…``,
    percent-encoded or not) must not leave it in the access log or the audit chain. A text
    whose secret only shows once decoded is recorded decoded, with the secret cut out.
    """
    if "tw" not in text and "%" not in text:  # the common case costs two substring searches
        return text
    if "tw_" in text:
        text = _EMBEDDED.sub(_redacted, text)
    if "%" in text:
        decoded = _decoded(text)
        if "tw_" in decoded and _EMBEDDED.search(decoded):
            return _EMBEDDED.sub(_redacted, decoded)
    return text


def redact_all(value: Any) -> Any:
    """``value`` (text, or JSON-like data) with :func:`redact_tokens` applied to every
    string in it, keys included."""
    if isinstance(value, str):
        return redact_tokens(value)
    if isinstance(value, dict):
        return {redact_all(k): redact_all(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact_all(v) for v in value]
    return value


def texts_hold_token(value: Any) -> bool:
    """Whether any string in ``value`` (text, or JSON-like data, keys included) holds a
    token (:func:`holds_token`)."""
    if isinstance(value, str):
        return holds_token(value)
    if isinstance(value, dict):
        return any(texts_hold_token(k) or texts_hold_token(v) for k, v in value.items())
    if isinstance(value, list | tuple | set | frozenset):
        return any(texts_hold_token(v) for v in value)
    return False


def _redacted(match: re.Match[str]) -> str:
    return f"tw_{match.group(1)}_[redacted]"


class Environment(StrEnum):
    LIVE = "live"
    TEST = "test"


class TokenFormatError(ValueError):
    """The presented string is not a well-formed token.

    ``reason`` is ``malformed`` (wrong shape) or ``bad_checksum`` (right shape, wrong check).
    The message never contains the token itself.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ParsedToken:
    environment: Environment
    value: str


# Two base62 digits per table entry: the checksum is three lookups on the hot path.
_PAIRS = [a + b for a in BASE62 for b in BASE62]
_ENVIRONMENTS = {"live": Environment.LIVE, "test": Environment.TEST}


def checksum(text: str) -> str:
    """The 6-character base62 CRC32 of ``text`` (most significant digit first)."""
    high, low = divmod(zlib.crc32(text.encode("ascii")), 3844 * 3844)
    mid, low = divmod(low, 3844)
    return _PAIRS[high] + _PAIRS[mid] + _PAIRS[low]


def generate_token(environment: Environment | str) -> str:
    """A new random token for ``environment``. Shown once; only its keyed hash is kept."""
    env = Environment(environment)
    body = "".join(secrets.choice(BASE62) for _ in range(BODY_LENGTH))
    head = f"{PREFIX}{env.value}_{body}"
    return head + checksum(head)


def parse_token(token: str) -> ParsedToken:
    """Check shape and checksum; raise :class:`TokenFormatError` otherwise. No I/O."""
    if len(token) != TOKEN_LENGTH or not token.startswith(PREFIX):
        raise TokenFormatError("malformed")
    environment = _ENVIRONMENTS.get(token[3:7])
    if environment is None or token[7] != "_":
        raise TokenFormatError("malformed")
    tail = token[8:]
    if not _BASE62_SET.issuperset(tail):
        raise TokenFormatError("malformed")
    head = token[:-CHECK_LENGTH]
    if checksum(head) != token[-CHECK_LENGTH:]:
        raise TokenFormatError("bad_checksum")
    return ParsedToken(environment, token)


def token_hint(token: str) -> str:
    """What may be shown after creation: the prefix and the last four characters."""
    return f"{token[:8]}…{token[-4:]}"


def find_tokens(text: str) -> list[str]:
    """Every well-formed token (checksum confirmed) in ``text``."""
    found = []
    for match in TOKEN_PATTERN.finditer(text):
        try:
            parse_token(match.group(0))
        except TokenFormatError:
            continue
        found.append(match.group(0))
    return found


def new_public_id(prefix: str) -> str:
    """A public identifier such as ``tok_3kP9…`` (safe to log and show)."""
    return prefix + "_" + "".join(secrets.choice(BASE62) for _ in range(16))


def bearer_credential(authorization: str | None) -> str | None:
    """The credential in an ``Authorization: Bearer <token>`` header value, else ``None``.

    Credentials are only ever read from this header, never from a URL.
    """
    if not authorization:
        return None
    scheme, _, value = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return value.strip() or None
