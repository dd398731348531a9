"""Which requested scopes look like typos, and the scopes a route policy asks for."""

from __future__ import annotations

import pytest

from tokenward.gateway.config import parse_policy
from tokenward.tokens.scopes import unknown_scopes

KNOWN = ["records:read", "functions:invoke:*"]
BUILTIN = ["admin:read", "admin:write", "verify"]


@pytest.mark.parametrize(
    ("scope", "expected"),
    [
        ("records:read", []),
        ("records:*", []),  # covers a known scope
        ("records:read:own", [("records:read:own", "records:read")]),  # a scope of its own
        ("functions:invoke:resize", []),
        ("admin:read", []),
        ("*", []),
        ("records-read", [("records-read", "records:read")]),
        ("records:reed", [("records:reed", "records:read")]),
        ("billing:read", [("billing:read", None)]),
    ],
    ids=["known", "wider", "longer", "wildcard-route", "builtin", "all", "dash", "typo", "new"],
)
def test_a_scope_is_known_when_it_meets_a_known_one(scope, expected):
    assert unknown_scopes([scope], KNOWN, BUILTIN) == expected


def test_with_nothing_known_only_the_shape_is_checked():
    assert unknown_scopes(["records:reed", "billing:read"], [], BUILTIN) == []
    assert unknown_scopes(["records-read"], [], BUILTIN) == [("records-read", None)]
    assert unknown_scopes(["admin-read"], [], BUILTIN) == [("admin-read", "admin:read")]


def test_a_route_policy_lists_the_scopes_it_asks_for():
    policy = parse_policy(
        """
[[upstreams]]
name = "api"
url = "http://127.0.0.1:9"

[[routes]]
upstream = "api"
path = "/records"
methods = ["GET"]
scope = "records:read"

[[routes]]
upstream = "api"
path = "/functions/{name}"
methods = ["POST"]
scope = "functions:invoke:{name}"

[[routes]]
upstream = "api"
path = "/records/{id}"
methods = ["GET"]
scope = "records:read"
"""
    )
    assert policy.scopes() == ["records:read", "functions:invoke:*"]
