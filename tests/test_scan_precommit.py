"""The pre-commit hook: its definition, and a real ``pre-commit try-repo`` run against a
temporary repository with a planted token (pre-commit installs tokenward from this
checkout into an environment of its own)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT
from tokenward.tokens.format import generate_token

HOOKS = ROOT / ".pre-commit-hooks.yaml"


def test_the_hooks_file_defines_tokenward_scan():
    hooks = yaml.safe_load(HOOKS.read_text())
    assert isinstance(hooks, list) and len(hooks) == 1
    (hook,) = hooks
    assert hook["id"] == "tokenward-scan"
    assert hook["entry"] == "tokenward scan"
    assert hook["language"] == "python"
    assert hook["pass_filenames"] is True
    assert set(hook) <= {
        "id",
        "name",
        "description",
        "entry",
        "language",
        "additional_dependencies",
        "pass_filenames",
        "types",
    }


def _pre_commit() -> str | None:
    beside = Path(sys.executable).with_name("pre-commit")
    return str(beside) if beside.exists() else shutil.which("pre-commit")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_pre_commit_try_repo_refuses_a_planted_token(tmp_path: Path):
    program = _pre_commit()
    if program is None:
        pytest.skip("pre-commit is not installed (pip install pre-commit)")
    if not (ROOT / ".git").exists():
        pytest.skip("the checkout is not a git repository")
    repo = tmp_path / "app"
    repo.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q"], cwd=repo, check=True)
    token = generate_token("live")
    (repo / "settings.py").write_text(f"API_KEY = '{token}'\n")
    (repo / "clean.py").write_text("API_KEY = os.environ['API_KEY']\n")
    subprocess.run([*git, "add", "."], cwd=repo, check=True)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("TOKENWARD_")},
        "PRE_COMMIT_HOME": str(tmp_path / "cache"),
    }
    command = [program, "try-repo", str(ROOT), "tokenward-scan"]
    found = subprocess.run(
        [*command, "--files", "settings.py", "clean.py"],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert found.returncode == 1, found.stdout + found.stderr
    assert "settings.py:1:12" in found.stdout and token not in found.stdout
    assert "clean.py:" not in found.stdout  # scanned too (pass_filenames), nothing in it
