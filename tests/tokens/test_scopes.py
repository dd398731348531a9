"""Scopes: wildcard coverage is set inclusion of the concrete scopes each pattern matches."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tokenward.tokens.scopes import (
    MAX_SEGMENTS,
    ScopeError,
    ScopeSet,
    is_narrower,
    parse_scope,
    scope_covers,
    scopes_allow,
    validate_scopes,
)

# A small alphabet of segments, so that patterns and instances often overlap.
NAMES = ["records", "functions", "read", "write", "own", "a"]
segment = st.sampled_from([*NAMES, "*"])
concrete_segment = st.sampled_from(NAMES)


@st.composite
def patterns(draw: st.DrawFn) -> str:
    return ":".join(draw(st.lists(segment, min_size=1, max_size=MAX_SEGMENTS)))


@st.composite
def concretes(draw: st.DrawFn) -> str:
    return ":".join(draw(st.lists(concrete_segment, min_size=1, max_size=MAX_SEGMENTS)))


def matches(pattern: str, concrete: str) -> bool:
    """Reference semantics: ``*`` is one segment, or one or more as the last segment."""
    p, c = pattern.split(":"), concrete.split(":")
    if p[-1] == "*":
        if len(c) < len(p):
            return False
        head, c = p[:-1], c[: len(p) - 1]
    else:
        if len(c) != len(p):
            return False
        head = p
    return all(x in ("*", y) for x, y in zip(head, c, strict=True))


def instances(pattern: str, extra_tail: int = 2) -> list[str]:
    """Every concrete scope of ``pattern`` over NAMES (tails up to MAX_SEGMENTS + extra)."""
    parts = pattern.split(":")
    filled: list[list[str]] = [[]]
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        choices = NAMES if part == "*" else [part]
        filled = [f + [c] for f in filled for c in choices]
        if last and part == "*":
            tails = list(filled)
            for _ in range(extra_tail):
                tails = [t + [c] for t in tails for c in NAMES[:2]]
                filled += tails
    return [":".join(f) for f in filled]


@given(patterns())
def test_covers_is_reflexive(p):
    assert scope_covers(p, p)


@given(patterns(), patterns(), patterns())
def test_covers_is_transitive(a, b, c):
    if scope_covers(a, b) and scope_covers(b, c):
        assert scope_covers(a, c)


@settings(max_examples=300)
@given(patterns(), patterns())
def test_covers_matches_the_reference_semantics(granted, required):
    # granted covers required exactly when it covers every concrete instance of it.
    expected = all(matches(granted, i) for i in instances(required))
    assert scope_covers(granted, required) is expected


@given(patterns(), concretes())
def test_covers_concrete_scope_is_matching(pattern, concrete):
    assert scope_covers(pattern, concrete) is matches(pattern, concrete)


@given(patterns())
def test_star_covers_everything(p):
    assert scope_covers("*", p)
    assert p in ScopeSet(["*"])


@given(patterns(), patterns())
def test_transitive_chains_through_star(a, b):
    assume(a != "*")
    # Nothing but * itself covers *.
    assert not scope_covers(a, "*")
    assert scope_covers("*", a) and scope_covers("*", b)


@pytest.mark.parametrize(
    ("granted", "required", "covered"),
    [
        ("records:*", "records:read", True),
        ("records:*", "records:read:own", True),
        ("records:*", "records", False),
        ("records:*", "records:*", True),
        ("records:read", "records:*", False),
        ("*:read", "functions:read", True),
        ("*:read", "functions:write", False),
        ("*:read", "functions:read:own", False),
        ("*:read", "*", False),
        ("*", "functions:invoke:send-email", True),
        ("functions:invoke:*", "functions:invoke:send-email", True),
        ("functions:invoke:*", "functions:invoke", False),
        ("records:*:own", "records:read:own", True),
        ("records:*:own", "records:*", False),
        ("records:*:own", "records:*:own", True),
        ("records:read:own", "records:*:own", False),
        ("a:*:*", "a:b:*", True),
        ("a:b:*", "a:*:*", False),
    ],
)
def test_examples(granted, required, covered):
    assert scope_covers(granted, required) is covered


@given(st.lists(patterns(), max_size=4), st.lists(patterns(), max_size=4))
def test_is_narrower_iff_each_requested_scope_is_covered(requested, granted):
    expected = all(any(scope_covers(g, r) for g in granted) for r in requested)
    assert is_narrower(requested, granted) is expected
    for r in requested:
        assert scopes_allow(granted, r) is any(scope_covers(g, r) for g in granted)


@given(st.lists(patterns(), min_size=1, max_size=4))
def test_a_scope_set_is_narrower_than_itself_and_than_star(scopes):
    assert is_narrower(scopes, scopes)
    assert is_narrower(scopes, ["*"])


def test_narrowing_examples():
    held = ["admin:*", "records:*"]
    assert is_narrower(["records:read", "admin:read"], held)
    assert not is_narrower(["functions:*"], held)
    assert not is_narrower(["*"], held)
    assert not is_narrower(["records:read", "functions:invoke"], held)
    assert is_narrower([], held)


@given(patterns(), concretes())
def test_scope_set_contains_honours_wildcards(pattern, concrete):
    assert (concrete in ScopeSet([pattern])) is matches(pattern, concrete)


def test_scope_set_container_protocol():
    s = ScopeSet(["records:*", "verify"])
    assert "records:read" in s and "records:write:own" in s and "verify" in s
    assert "functions:invoke" not in s and "records" not in s
    assert 42 not in s and None not in s
    assert list(s) == ["records:*", "verify"] and len(s) == 2
    assert "records:*" in repr(s)


@pytest.mark.parametrize(
    "scope",
    [
        "records",
        "records:read",
        "functions:invoke:send-email",
        "a:b:c:d",
        "*",
        "*:read",
        "records:*",
        "v1.2_x-y:read",
        "a" * 64 + ":" + "b" * 63,
        "mcp:files:tools/call:search",  # MCP method names hold a '/'
        "mcp:files:resources/read:*",
    ],
)
def test_parse_scope_accepts(scope):
    assert parse_scope(scope) == tuple(scope.split(":"))


@pytest.mark.parametrize(
    "scope",
    [
        "",
        "a:b:c:d:e",
        ":",
        "records:",
        ":read",
        "records::read",
        "records:re ad",
        "records:read\n",
        "records:read\r",
        "\nrecords:read",
        "records:r*",
        "records:**",
        "/records:read",
        "records:/read",
        "récords:read",
        "records:-read",
        "records:.read",
        "a" * 65,
        "a:" * 10 + "b",
        ("a" * 60 + ":") * 2 + "b" * 20,  # 142 characters
        "records:read\x00",
    ],
)
def test_parse_scope_rejects(scope):
    with pytest.raises(ScopeError):
        parse_scope(scope)
    with pytest.raises(ScopeError):
        validate_scopes(["records:read", scope])


@settings(max_examples=300)
@given(st.text(max_size=140))
def test_parse_scope_accepts_only_well_formed_text(text):
    try:
        segments = parse_scope(text)
    except ScopeError:
        return
    assert 1 <= len(segments) <= MAX_SEGMENTS and len(text) <= 128
    for s in segments:
        assert s == "*" or (
            s.isascii()
            and not s.startswith("/")
            and s.replace("_", "a").replace(".", "a").replace("-", "a").replace("/", "a").isalnum()
        )


def test_parse_scope_rejects_non_strings():
    with pytest.raises(ScopeError):
        parse_scope(None)  # type: ignore[arg-type]


def test_validate_scopes_deduplicates_in_order():
    assert validate_scopes(["b:x", "a:y", "b:x"]) == ["b:x", "a:y"]
