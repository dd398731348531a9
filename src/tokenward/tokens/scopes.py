"""Scopes: ``resource:action[:qualifier]`` strings with ``*`` wildcards.

A ``*`` stands for exactly one segment, except as the *last* segment, where it stands for
one or more segments: ``records:*`` covers ``records:read`` and ``records:read:own``, and
``*`` alone covers everything. Coverage is defined between patterns, so it answers both
"may this token do X" (X concrete) and "may this token mint a token with scope P" (P a pattern):
a pattern is covered only when every concrete scope it matches is covered.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from functools import lru_cache

MAX_SCOPE_LENGTH = 128
MAX_SEGMENTS = 4
#: A segment may hold ``/`` after its first character, for names like MCP's ``tools/call``.
_SEGMENT = re.compile(r"\*|[A-Za-z0-9_][A-Za-z0-9_./\-]{0,63}")

WILDCARD = "*"


class ScopeError(ValueError):
    """A scope string is not well formed."""


def parse_scope(scope: str) -> tuple[str, ...]:
    if not isinstance(scope, str) or not scope or len(scope) > MAX_SCOPE_LENGTH:
        raise ScopeError("scope must be a non-empty string of at most 128 characters")
    segments = tuple(scope.split(":"))
    if len(segments) > MAX_SEGMENTS:
        raise ScopeError(f"scope has more than {MAX_SEGMENTS} segments")
    for segment in segments:
        if not _SEGMENT.fullmatch(segment):  # fullmatch: "$" would allow a final newline
            raise ScopeError(
                "scope segments are letters, digits, '_', '.', '-', '/' (not first) or a lone '*', "
                "separated by ':'"
            )
    return segments


def validate_scopes(scopes: Iterable[str]) -> list[str]:
    """Parse each scope (raising :class:`ScopeError`) and return them deduplicated, in order."""
    seen: dict[str, None] = {}
    for scope in scopes:
        parse_scope(scope)
        seen.setdefault(scope, None)
    return list(seen)


def _covers(granted: Sequence[str], required: Sequence[str]) -> bool:
    last_g = len(granted) - 1
    last_r = len(required) - 1
    for i, g in enumerate(granted):
        if g == WILDCARD and i == last_g:
            return last_r >= i
        if i > last_r:
            return False
        r = required[i]
        if r == WILDCARD and i == last_r:
            return False  # required has an open tail here that granted does not
        if g != WILDCARD and g != r:
            return False
    return last_r == last_g


@lru_cache(maxsize=65536)
def scope_covers(granted: str, required: str) -> bool:
    """Whether the single scope ``granted`` covers ``required`` (a scope or pattern)."""
    return _covers(granted.split(":"), required.split(":"))


@lru_cache(maxsize=65536)
def _any_covers(granted: tuple[str, ...], required: str) -> bool:
    return any(scope_covers(g, required) for g in granted)


def scopes_allow(granted: Iterable[str], required: str) -> bool:
    """Whether any of ``granted`` covers ``required``."""
    return _any_covers(tuple(granted), required)


def is_narrower(requested: Iterable[str], granted: Iterable[str]) -> bool:
    """Whether every requested scope is covered by the granted ones (scopes only narrow)."""
    held = tuple(granted)
    return all(_any_covers(held, r) for r in requested)


def unknown_scopes(
    requested: Iterable[str], known: Iterable[str], builtin: Iterable[str] = ()
) -> list[tuple[str, str | None]]:
    """The requested scopes that look like typos: ``(scope, closest known scope or None)``.

    A scope is known when it and a known (or ``builtin``) scope cover one another in either
    direction (a route's ``records:read`` makes ``records:*`` known, a token's
    ``functions:invoke:*`` makes ``functions:invoke:resize`` known). One
    without a ``:`` is never known (scopes are ``resource:action``) unless it is ``*`` or a
    known name. With nothing ``known`` (a new project, no route policy) only that rule and
    the built-in scopes apply: any ``resource:action`` may be the first of its kind.
    """
    import difflib

    learned = list(dict.fromkeys(known))
    held = list(dict.fromkeys([*learned, *builtin]))
    found: list[tuple[str, str | None]] = []
    for scope in requested:
        if scope in held or scope == WILDCARD:
            continue
        if any(scope_covers(scope, k) or scope_covers(k, scope) for k in held):
            continue
        if ":" in scope and not learned:
            continue
        close = difflib.get_close_matches(scope, held, n=1, cutoff=0.75)
        if not close and ":" not in scope:
            close = difflib.get_close_matches(scope.replace("-", ":"), held, n=1, cutoff=0.75)
        found.append((scope, close[0] if close else None))
    return found


class ScopeSet:
    """A container whose ``in`` honours wildcards, so Starlette's ``@requires`` works."""

    __slots__ = ("_scopes",)

    def __init__(self, scopes: Iterable[str]) -> None:
        self._scopes = tuple(scopes)

    def __contains__(self, required: object) -> bool:
        return isinstance(required, str) and _any_covers(self._scopes, required)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._scopes)

    def __len__(self) -> int:
        return len(self._scopes)

    def __repr__(self) -> str:
        return f"ScopeSet({list(self._scopes)!r})"
