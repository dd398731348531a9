"""``tokenward scan``: what it finds (checksum-confirmed, no false positives), where it looks
(.gitignore, --all, stdin, git history), what it prints (never a secret), its exit codes,
and, against a real server, lookup and ``--revoke`` per the project's policy."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tokenward.cli import app
from tokenward.leaks.scanner import ScanStats, files_under, find_in_bytes, scan_git_history
from tokenward.tokens.format import BASE62, checksum, generate_token

runner = CliRunner()
needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def scan(*args: str, env: dict[str, str] | None = None, stdin: bytes | None = None):
    return runner.invoke(app, ["scan", *args], env=env or {}, input=stdin, catch_exceptions=False)


def look_alike(rng: random.Random) -> str:
    """The right shape, a wrong checksum."""
    head = f"tw_{rng.choice(['live', 'test'])}_" + "".join(rng.choices(BASE62, k=32))
    right = checksum(head)
    while (check := "".join(rng.choices(BASE62, k=6))) == right:
        pass
    return head + check


# -- what is found --------------------------------------------------------------------------
def test_tokens_are_found_with_line_and_column():
    a, b = generate_token("live"), generate_token("test")
    text = f"first line\nkey = '{a}'\n\n  {b} and more\n".encode()
    found = find_in_bytes(text, "f.py")
    assert [(f.line, f.column, f.token) for f in found] == [(2, 8, a), (4, 3, b)]
    assert found[0].hint == f"{a[:8]}…{a[-4:]}" and a not in repr(found[0])


def test_random_look_alikes_are_never_reported():
    rng = random.Random(1414)
    fakes = [look_alike(rng) for _ in range(5000)]
    real = generate_token("live")
    text = ("\n".join(f"k{i} = {f}" for i, f in enumerate(fakes)) + f"\nreal = {real}\n").encode()
    found = find_in_bytes(text, "x")
    assert [f.token for f in found] == [real] and found[0].line == len(fakes) + 1


def test_a_token_glued_to_other_word_characters_is_not_a_match():
    token = generate_token("live")
    for text in (f"x{token}", f"{token}x", f"_{token}", f"{token}_"):
        assert find_in_bytes(text.encode(), "x") == []
    for text in (f"({token})", f'"{token}"', f"={token};", f"/{token}\n"):
        assert [f.token for f in find_in_bytes(text.encode(), "x")] == [token]


# -- where it looks -------------------------------------------------------------------------
def _tree(root: Path) -> dict[str, str]:
    tokens = {name: generate_token("live") for name in ("kept", "ignored", "negated", "deep")}
    (root / "src" / "build").mkdir(parents=True)
    (root / ".gitignore").write_text("*.log\n!keep.log\nbuild/\n")
    (root / "src" / ".gitignore").write_text("secret.txt\n")
    (root / "src" / "app.py").write_text(f"KEY = '{tokens['kept']}'\n")
    (root / "debug.log").write_text(tokens["ignored"])
    (root / "keep.log").write_text(tokens["negated"])
    (root / "src" / "build" / "out.js").write_text(tokens["ignored"])
    (root / "src" / "secret.txt").write_text(tokens["deep"])
    return tokens


def test_gitignore_is_respected_outside_git_and_all_includes_everything(tmp_path: Path):
    _tree(tmp_path)
    names = {Path(p).relative_to(tmp_path).as_posix() for p in files_under(tmp_path)}
    assert names == {".gitignore", "src/.gitignore", "src/app.py", "keep.log"}
    everything = {
        Path(p).relative_to(tmp_path).as_posix()
        for p in files_under(tmp_path, include_ignored=True)
    }
    assert {"debug.log", "src/build/out.js", "src/secret.txt"} <= everything


def _git(root: Path, *args: str) -> None:
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@example.com", *args],
        cwd=root,
        check=True,
        capture_output=True,
    )


@needs_git
def test_inside_a_git_work_tree_git_decides(tmp_path: Path):
    _tree(tmp_path)
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", "-f", "debug.log")  # tracked, so not ignored any more
    names = {Path(p).relative_to(tmp_path).as_posix() for p in files_under(tmp_path)}
    assert names == {".gitignore", "src/.gitignore", "src/app.py", "keep.log", "debug.log"}


@needs_git
def test_git_history_finds_a_token_removed_since_each_blob_once(tmp_path: Path):
    token = generate_token("live")
    (tmp_path / "a.env").write_text(f"TOKEN={token}\n")
    (tmp_path / "copy.env").write_text(f"TOKEN={token}\n")  # the same blob twice
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-qm", "add config")
    (tmp_path / "a.env").write_text("TOKEN=from-the-vault\n")
    (tmp_path / "copy.env").unlink()
    _git(tmp_path, "commit", "-qam", "remove the secret")
    stats = ScanStats()
    found = scan_git_history(tmp_path, stats)
    assert [f.token for f in found] == [token] and found[0].line == 1
    assert found[0].blob and found[0].path in ("a.env", "copy.env")
    result = scan("--git", str(tmp_path), "--json")
    assert result.exit_code == 1
    assert json.loads(result.stdout)["findings"][0]["git_object"] == found[0].blob
    assert token not in result.stdout


# -- the command ----------------------------------------------------------------------------
def test_exit_codes_and_no_secret_in_any_output(tmp_path: Path):
    token = generate_token("live")
    (tmp_path / "clean.txt").write_text("nothing here tw_live_short\n")
    assert scan(str(tmp_path)).exit_code == 0
    (tmp_path / "leak.txt").write_text(f"a\nb = {token}\n")
    for fmt in ("text", "json", "sarif"):
        result = scan("--format", fmt, str(tmp_path))
        assert result.exit_code == 1, result.output
        hint = token[:8] + "…" + token[-4:]
        assert token not in result.output
        assert hint in result.output or json.dumps(hint)[1:-1] in result.output
    assert scan().exit_code == 2  # nothing to scan
    assert scan(str(tmp_path / "missing")).exit_code == 2
    assert scan("--format", "xml", str(tmp_path)).exit_code == 2
    assert scan("--revoke", "--yes", str(tmp_path)).exit_code == 2  # no server access


def test_stdin_and_binary_files(tmp_path: Path):
    token = generate_token("test")
    result = scan("-", "--json", stdin=f"x\n{token}\n".encode())
    assert result.exit_code == 1
    assert json.loads(result.stdout)["findings"][0] == {
        "path": "-",
        "line": 2,
        "column": 1,
        "hint": token[:8] + "…" + token[-4:],
        "token": None,
    }
    (tmp_path / "blob.bin").write_bytes(b"\0\1\2" + token.encode())
    assert scan(str(tmp_path)).exit_code == 0  # binary: skipped, and said so
    assert scan("--binary", str(tmp_path)).exit_code == 1


def test_sarif_has_the_shape_code_scanning_wants(tmp_path: Path):
    token = generate_token("live")
    (tmp_path / "conf.yml").write_text(f"x: 1\nkey: {token}\n")
    out = tmp_path / "report.sarif"
    result = scan("--format", "sarif", "--output", str(out), str(tmp_path / "conf.yml"))
    assert result.exit_code == 1
    log = json.loads(out.read_text())
    assert log["version"] == "2.1.0" and log["$schema"].endswith("sarif-2.1.0.json")
    run = log["runs"][0]
    rule = run["tool"]["driver"]["rules"][0]
    assert run["tool"]["driver"]["name"] == "tokenward" and rule["id"] == "tokenward/token"
    (hit,) = run["results"]
    assert hit["ruleId"] == rule["id"] and hit["level"] == "error" and hit["message"]["text"]
    location = hit["locations"][0]["physicalLocation"]
    assert location["artifactLocation"]["uri"].endswith("conf.yml")
    assert location["region"]["startLine"] == 2 and location["region"]["startColumn"] == 6
    assert token not in out.read_text()


# -- with a server --------------------------------------------------------------------------
def _env(live) -> dict[str, str]:
    return {"TOKENWARD_URL": live.url, "TOKENWARD_ADMIN_TOKEN": live.admin_token}


async def test_found_tokens_are_looked_up_and_revoked_per_policy(live, tmp_path: Path):
    revoked = live.admin.create_token(project="shop", scopes=["records:read"], name="web")
    live.admin.create_project("lab")
    policy = runner.invoke(
        app, ["project", "policy", "lab", "--leak-action", "quarantine", "--json"], env=_env(live)
    )
    assert policy.exit_code == 0 and json.loads(policy.stdout)["leak_action"] == "quarantine"
    quarantined = live.admin.create_token(project="lab", scopes=["records:read"], name="ml")
    canary = live.admin.create_token(project="shop", scopes=["canary:none"], kind="canary")
    unknown = generate_token("live")
    (tmp_path / "a.py").write_text(
        f"WEB = '{revoked['token']}'\nML = '{quarantined['token']}'\n"
        f"BAIT = '{canary['token']}'\nOLD = '{unknown}'\n"
    )
    listed = scan("--json", str(tmp_path), env=_env(live))
    assert listed.exit_code == 1
    findings = json.loads(listed.stdout)["findings"]
    assert [f["token"] and f["token"]["id"] for f in findings] == [
        revoked["id"],
        quarantined["id"],
        canary["id"],
        None,
    ]
    assert findings[0]["token"]["project"] == "shop" and findings[0]["token"]["state"] == "active"
    text = scan(str(tmp_path), env=_env(live))
    assert revoked["id"] in text.stdout and "(canary)" in text.stdout
    no = runner.invoke(app, ["scan", "--revoke", str(tmp_path)], env=_env(live), input="n\n")
    assert no.exit_code == 2  # not a terminal: --revoke wants --yes
    done = scan("--revoke", "--yes", "--json", str(tmp_path), env=_env(live))
    assert done.exit_code == 1
    actions = {r["id"]: r["action"] for r in json.loads(done.stdout)["responses"]}
    assert actions == {revoked["id"]: "revoked", quarantined["id"]: "quarantined"}
    assert live.admin.get_token(revoked["id"])["revoked_at"] is not None
    assert live.admin.get_token(quarantined["id"])["quarantined_at"] is not None
    assert live.admin.get_token(canary["id"])["revoked_at"] is None
    for secret in (revoked["token"], quarantined["token"], canary["token"], unknown):
        assert secret not in done.stdout + listed.stdout + text.stdout


async def test_canary_from_the_cli_needs_no_scope(live):
    made = runner.invoke(
        app, ["token", "create", "--project", "shop", "--kind", "canary", "--json"], env=_env(live)
    )
    assert made.exit_code == 0, made.output
    body = json.loads(made.stdout)
    assert body["kind"] == "canary" and body["scopes"] == ["canary:none"]
    assert live.admin.verify(body["token"])["reason"] == "unknown"
    bad = runner.invoke(app, ["token", "create", "--project", "shop"], env=_env(live))
    assert bad.exit_code == 2  # an API key still needs --scope


def test_tokenward_scan_starts_without_the_rest_of_the_cli(tmp_path: Path):
    import sys

    lean = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, tokenward.leaks.cli; print('tokenward.cli' in sys.modules)",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert lean.stdout.strip() == "False"
    token = generate_token("live")
    (tmp_path / "f.txt").write_text(token)
    done = subprocess.run(
        [sys.executable, "-m", "tokenward", "scan", "--json", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1 and json.loads(done.stdout)["summary"]["found"] == 1
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "tokenward",
            "scan",
            "--output",
            str(tmp_path / "no" / "x"),
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
