"""Docs that must stay true: every setting is documented; the public surface is pinned."""

from __future__ import annotations

import re

import tokenward
from tests.conftest import ROOT
from tokenward.settings import Settings


def test_every_setting_has_a_readme_row_and_a_description():
    readme = (ROOT / "README.md").read_text()
    for name, field in Settings.model_fields.items():
        assert field.description, f"setting {name} has no description"
        assert f"`TOKENWARD_{name.upper()}`" in readme, f"README lacks TOKENWARD_{name.upper()}"


def test_readme_lists_no_setting_that_does_not_exist():
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `TOKENWARD_([A-Z_]+)`", table, re.M))
    assert documented == {n.upper() for n in Settings.model_fields}


def test_public_surface_is_pinned():
    assert sorted(tokenward.__all__) == sorted(
        [
            "TOKEN_PATTERN",
            "Decision",
            "Reason",
            "ScopeSet",
            "TokenFormatError",
            "TokenKind",
            "TokenRecord",
            "TokenState",
            "Verifier",
            "__version__",
            "find_tokens",
            "generate_token",
            "parse_token",
        ]
    )
    for name in tokenward.__all__:
        assert hasattr(tokenward, name)


def test_readme_test_command_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "./scripts/test" in readme and "./scripts/test" in ci
    assert "./scripts/run" in readme
