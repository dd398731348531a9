"""Every setting has a description and a row in README.md's configuration table."""

from __future__ import annotations

from tests.conftest import ROOT
from tokenward.settings import Settings


def test_every_setting_is_documented():
    readme = (ROOT / "README.md").read_text()
    for name, field in Settings.model_fields.items():
        assert field.description, name
        assert f"| `TOKENWARD_{name.upper()}` |" in readme, f"TOKENWARD_{name.upper()}"
