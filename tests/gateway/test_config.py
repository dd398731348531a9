"""Route policy files: parsing, matching, and errors that name file, line and key."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tokenward.gateway.config import ConfigError, load_policy, parse_policy
from tokenward.gateway.enforce import canonical_path

GOOD = """
[[upstreams]]
name = "records"
url = "http://127.0.0.1:9001/api"

[[routes]]
upstream = "records"
path = "/records/{rest:path}"
methods = ["GET"]
scope = "records:read"

[[routes]]
upstream = "records"
path = "/functions/{name}"
methods = ["post"]
scope = "functions:invoke:{name}"
rate_limit = "10/second;1000/hour"
project = "shop"
environment = "live"
"""


def test_good_policy_matches_in_order_with_scope_from_path():
    policy = parse_policy(GOOD, "t.toml")
    m = policy.match("GET", "/records/a/b")
    assert m is not None and m.scope == "records:read" and m.route.upstream.name == "records"
    assert policy.match("HEAD", "/records/a") is not None  # GET allows HEAD
    assert policy.match("POST", "/records/a") is None
    assert policy.match("GET", "/records") is None
    m = policy.match("POST", "/functions/send-email")
    assert m.scope == "functions:invoke:send-email"
    assert m.route.rate_limit == ("10/second", "1000/hour")
    assert (m.route.project, m.route.environment) == ("shop", "live")
    assert policy.match("POST", "/functions/a:b") is None  # not a scope segment
    assert policy.match("POST", "/functions/a/b") is None
    assert policy.routes[0].upstream.prefix == "http://127.0.0.1:9001/api"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[[routes]]\npath = "/x"\nmethods = ["GET"]\n', "t.toml:1: routes[0]: the key 'scope'"),
        (
            GOOD + '\n[[routes]]\npath = "/y"\nmethods = ["GET"]\nscope = "bad scope"\n',
            "t.toml:24: routes[2].scope:",
        ),
        (
            GOOD.replace(
                'upstream = "records"\npath = "/functions', 'upstream = "nope"\npath = "/functions'
            ),
            "t.toml:13: routes[1].upstream: no [[upstreams]] is named 'nope'",
        ),
        (
            GOOD.replace('methods = ["post"]', 'methods = ["GET", 7]'),
            "t.toml:15: routes[1].methods: 7 is not an HTTP method",
        ),
        (
            GOOD.replace('scope = "functions:invoke:{name}"', 'scope = "functions:{other}"'),
            "t.toml:16: routes[1].scope: {other} is not a one-segment name of the path",
        ),
        (GOOD.replace('"10/second;1000/hour"', '"often"'), "t.toml:17: routes[1].rate_limit:"),
        (GOOD.replace('"http://127.0.0.1:9001/api"', '"ftp://x"'), "t.toml:4: upstreams[0].url:"),
        (
            GOOD.replace('environment = "live"', 'environment = "prod"'),
            "t.toml:19: routes[1].environment: must be 'live' or 'test'",
        ),
        (GOOD + "\n[gateway]\ntimeout = -1\n", "t.toml:22: gateway.timeout: must be a positive"),
        (GOOD + "\n[gateway]\nspeed = 1\n", "t.toml:22: gateway.speed: unknown key"),
        ("[[routes]\n", "t.toml: invalid TOML: "),
        (
            GOOD.replace('path = "/records/{rest:path}"', 'path = "records"'),
            "t.toml:8: routes[0].path: must start with '/'",
        ),
        (
            GOOD.replace('path = "/records/{rest:path}"', 'path = "/r/{a}/{a}"'),
            "t.toml:8: routes[0].path: the name {a} appears twice",
        ),
    ],
)
def test_errors_name_file_line_key_and_problem(text, expected):
    with pytest.raises(ConfigError) as info:
        parse_policy(text, "t.toml")
    assert str(info.value).startswith(expected), str(info.value)


def test_load_policy_reports_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the file"):
        load_policy(tmp_path / "absent.toml")


def test_the_documented_example_is_valid():
    from pathlib import Path

    text = (Path(__file__).parents[2] / "docs" / "tokenward.example.toml").read_text()
    policy = parse_policy(text, "tokenward.example.toml")
    assert policy.routes and policy.upstreams


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/records/a", "/records/a"),
        ("/records/a%20b", "/records/a b"),
        ("/records/", "/records/"),
        ("/records/../admin", None),
        ("/records/%2e%2e/admin", None),
        ("/records/./a", None),
        ("/records//a", None),
        ("/records/a%2Fb", None),
        ("/records/a%5cb", None),
        ("/records/a\\b", None),
        ("/records/%00", None),
        ("/records/%ff", None),
        ("/records/%C3%A9", "/records/\u00e9"),
        ("/records/\u00e9", None),  # raw non-ASCII: HTTP wants it percent-encoded
        ("/records/users/\xff\xfe", None),  # raw bytes, as a header carries them (latin-1)
        ("/records/\xc0\xae\xc0\xae/admin", None),
        ("/records/users/%zz", None),  # not an escape: servers read it differently
        ("/records/users/%4", None),
        ("/records/%g0", None),
        ("/records/100%", None),
        ("records", None),
    ],
)
def test_canonical_path(raw, expected):
    assert canonical_path(raw) == expected


def _canonical_path_by_segments(raw: str) -> str | None:
    """The rule spelled out segment by segment (what the fast checks must equal)."""
    from urllib.parse import unquote

    if not raw.startswith("/") or len(raw) > 4096 or any(ord(c) > 127 for c in raw):
        return None
    for i, c in enumerate(raw):
        escape = raw[i + 1 : i + 3]
        if c == "%" and not (
            len(escape) == 2 and all(h in "0123456789abcdefABCDEF" for h in escape)
        ):
            return None
    lowered = raw.lower()
    if "%2f" in lowered or "%5c" in lowered or "%00" in lowered:
        return None
    try:
        path = unquote(raw, errors="strict") if "%" in raw else raw
    except UnicodeDecodeError:
        return None
    if any(c < " " or c in "\x7f\\" for c in path):
        return None
    segments = path.split("/")[1:]
    for i, segment in enumerate(segments):
        if segment in (".", "..") or (segment == "" and i != len(segments) - 1):
            return None
    return path


_PIECES = [
    "/",
    ".",
    "..",
    "a",
    "f",
    "z",
    "%2e",
    "%2E",
    "%",
    "%41",
    "%c3%a9",
    "\\",
    "é",
    "\xff",
    "\x01",
]


@given(st.lists(st.sampled_from(_PIECES)))
def test_canonical_path_equals_the_segment_rule(parts):
    raw = "".join(parts)
    assert canonical_path(raw) == _canonical_path_by_segments(raw)
    assert canonical_path("/" + raw) == _canonical_path_by_segments("/" + raw)


def test_routes_are_indexed_by_method_and_upstream_in_file_order():
    policy = parse_policy(
        """
[[upstreams]]
name = "u"
url = "http://127.0.0.1:9001"

[[routes]]
path = "/a/{rest:path}"
methods = ["GET"]
scope = "a:read"

[[routes]]
upstream = "u"
path = "/a/{rest:path}"
methods = ["*"]
scope = "a:any"

[[routes]]
upstream = "u"
path = "/a/b"
methods = ["PURGE"]
scope = "a:purge"
""",
        "t.toml",
    )
    assert policy.match("GET", "/a/x").scope == "a:read"  # /authz sees the first route
    assert policy.match("GET", "/a/x", proxied=True).scope == "a:any"  # no upstream: skipped
    assert policy.match("PURGE", "/a/b").scope == "a:any"  # file order wins
    assert policy.match("BREW", "/a/b").scope == "a:any"  # a method no route names
    assert policy.match("BREW", "/b") is None
    assert policy.match("", "/a/b").scope == "a:any"
