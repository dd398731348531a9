"""One cursor style for every list of the admin API (tokens, projects, audit, alerts).

A list answers ``{"<items>": [...], "limit": N, "next_cursor": "…" | null}``; the caller
passes ``next_cursor`` back as ``cursor`` for the next page, with the same filters. Pages are
keyset pages (``WHERE sort key < last one seen``): stable while rows are added, and as fast
on page 1,000 as on page 1.

A cursor is opaque to callers: base64url (no padding) of a small JSON array,
``[list name, *sort key]``. Decoding validates it all (alphabet, size, JSON, the list it was
made for, the types of the key): anything else is ``400 invalid_cursor``, never a 500.

It is validated, not signed: every page applies the caller's filters and project boundary
again, so an edited cursor can only move where a page starts among rows the caller may see
anyway. Signing would add a key to rotate and nothing to protect.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from tokenward.errors import BadRequest

#: the longest cursor accepted (the longest key made is well under it)
MAX_CURSOR = 256
#: what a cursor is made of, for the OpenAPI document (base64url without padding)
CURSOR_PATTERN = r"^[A-Za-z0-9_-]{1,256}$"
#: the default and the largest page of every list
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
KeyPart = str | int


def micros(at: datetime) -> int:
    """A time as whole microseconds since 1970 (how times travel in a cursor)."""
    return (at - _EPOCH) // timedelta(microseconds=1)


def from_micros(value: int) -> datetime:
    """The time of :func:`micros` (a value past year 9999 is :func:`bad_cursor`)."""
    try:
        return _EPOCH + timedelta(microseconds=value)
    except OverflowError:
        raise bad_cursor() from None


def bad_cursor() -> BadRequest:
    return BadRequest("invalid_cursor", "cursor must be a value returned as next_cursor")


def encode_cursor(kind: str, key: Sequence[KeyPart]) -> str:
    """The cursor of the page after the row whose sort key is ``key``, in list ``kind``."""
    raw = json.dumps([kind, *key], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def decode_cursor(kind: str, cursor: str | None, shape: Sequence[type]) -> tuple[Any, ...] | None:
    """The sort key in ``cursor`` (``None`` for no cursor: the first page).

    ``shape`` gives the type of each part of the key (``int`` or ``str``); a cursor of
    another list, of another shape, or no cursor at all is :func:`bad_cursor` (400).
    """
    if cursor is None or cursor == "":
        return None
    if len(cursor) > MAX_CURSOR or not cursor.isascii():
        raise bad_cursor()
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        value = json.loads(raw)
    except (binascii.Error, ValueError):
        raise bad_cursor() from None
    if not isinstance(value, list) or len(value) != len(shape) + 1 or value[0] != kind:
        raise bad_cursor()
    key: tuple[Any, ...] = tuple(value[1:])
    for part, want in zip(key, shape, strict=True):
        # bool is an int to Python, never to a cursor
        if type(part) is not want:
            raise bad_cursor()
        if isinstance(part, str) and len(part) > 128:
            raise bad_cursor()
        if isinstance(part, int) and not 0 <= part < 2**63:
            raise bad_cursor()
    return key


def page_body(
    name: str, items: list[Any], limit: int, next_cursor: str | None, **extra: Any
) -> dict[str, Any]:
    """The body of one page, the same for every list."""
    return {name: items, "limit": limit, "next_cursor": next_cursor, **extra}
