"""Secret settings from files (``TOKENWARD_<NAME>_FILE``) and the TOML file, as sources of
the one settings class: which wins, and the errors, which name the variable, never the value."""

from __future__ import annotations

import os
import secrets
import subprocess

import pytest
from pydantic import ValidationError

from tests.conftest import ROOT, tokenward_cmd
from tokenward.cli.common import settings_message
from tokenward.settings import FromFile, Settings, load_hasher

#: The settings that may hold a credential (a password in a URL, a key). A new one must be
#: marked ``SECRET`` (or, like the server key, have a file setting of its own) and added here.
SECRET_SETTINGS = {"database_url", "redis_url"}
PG_URL = "postgresql+asyncpg://tokenward:{}@db.internal:5432/tokenward"


def _marked() -> set[str]:
    return {
        name
        for name, field in Settings.model_fields.items()
        if any(isinstance(m, FromFile) for m in field.metadata)
    }


def _error(monkeypatch: pytest.MonkeyPatch, **env: str) -> str:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValidationError) as caught:
        Settings.load()
    return settings_message(caught.value)


def test_the_secret_settings_are_marked():
    assert _marked() == SECRET_SETTINGS
    # the server key's file variant is a setting of its own (one key per line)
    assert "secret_key_file" in Settings.model_fields


@pytest.mark.parametrize("name", sorted(SECRET_SETTINGS))
def test_a_secret_comes_from_its_file_without_the_line_break(name, tmp_path, monkeypatch):
    value = f"redis://:{secrets.token_hex(8)}@cache.internal:6379/0"
    path = tmp_path / name
    path.write_text(value + "\n")
    monkeypatch.setenv(f"TOKENWARD_{name.upper()}_FILE", str(path))
    assert getattr(Settings.load(), name) == value
    path.write_text(value + "\r\n")  # written on Windows
    assert getattr(Settings.load(), name) == value
    path.write_text(value)  # no line break at all
    assert getattr(Settings.load(), name) == value


def test_variable_and_file_together_is_an_error_without_the_value(tmp_path, monkeypatch):
    password = secrets.token_hex(8)
    path = tmp_path / "db"
    path.write_text(PG_URL.format(password))
    message = _error(
        monkeypatch,
        TOKENWARD_DATABASE_URL=PG_URL.format("other" + password),
        TOKENWARD_DATABASE_URL_FILE=str(path),
    )
    assert (
        "TOKENWARD_DATABASE_URL_FILE: give TOKENWARD_DATABASE_URL or "
        "TOKENWARD_DATABASE_URL_FILE, not both" in message
    )
    assert password not in message


def test_a_missing_file_names_the_variable_and_the_path(tmp_path, monkeypatch):
    missing = tmp_path / "not-there"
    message = _error(monkeypatch, TOKENWARD_REDIS_URL_FILE=str(missing))
    assert message == (
        f"invalid setting: TOKENWARD_REDIS_URL_FILE: cannot read {missing}: "
        "No such file or directory"
    )


def test_an_unreadable_empty_or_binary_file_is_an_error(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.write_text("\n")
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe\x00secret")
    message = _error(
        monkeypatch,
        TOKENWARD_DATABASE_URL_FILE=str(empty),
        TOKENWARD_REDIS_URL_FILE=str(binary),
    )
    assert f"TOKENWARD_DATABASE_URL_FILE: {empty} is empty" in message
    assert f"TOKENWARD_REDIS_URL_FILE: {binary} is not UTF-8 text" in message
    assert "secret" not in message.replace("invalid setting", "")
    message = _error(monkeypatch, TOKENWARD_DATABASE_URL_FILE=str(tmp_path))  # a folder
    assert f"TOKENWARD_DATABASE_URL_FILE: cannot read {tmp_path}: Is a directory" in message


def test_a_file_variant_of_a_setting_that_is_no_secret_is_not_read(tmp_path, monkeypatch):
    """Only secrets have ``_FILE`` variants: ``TOKENWARD_HOST_FILE`` means nothing (as any
    other unknown variable), and its file is never opened."""
    monkeypatch.setenv("TOKENWARD_HOST_FILE", str(tmp_path / "not-there"))
    assert Settings.load().host == "127.0.0.1"


def test_which_source_wins(tmp_path, monkeypatch):
    """Flags > environment (a variable or its file) > the TOML file > defaults."""
    in_file = PG_URL.format(secrets.token_hex(8))
    (tmp_path / "db").write_text(in_file + "\n")
    (tmp_path / "tokenward.toml").write_text(
        'database_url = "sqlite+aiosqlite:///from-toml.db"\n'
        'redis_url = "redis://from-toml:6379/0"\n'
        "cache_ttl = 2.5\n"
    )
    monkeypatch.setenv("TOKENWARD_CONFIG_FILE", str(tmp_path / "tokenward.toml"))
    monkeypatch.setenv("TOKENWARD_DATABASE_URL_FILE", str(tmp_path / "db"))
    settings = Settings.load()
    assert settings.database_url == in_file  # the file's variable over the TOML file
    assert settings.redis_url == "redis://from-toml:6379/0"
    assert settings.cache_ttl == 2.5
    monkeypatch.setenv("TOKENWARD_CACHE_TTL", "1")
    assert Settings.load().cache_ttl == 1.0  # a variable over the TOML file
    flagged = Settings.load(database_url="sqlite+aiosqlite:///flag.db", cache_ttl=None)
    assert flagged.database_url == "sqlite+aiosqlite:///flag.db"  # a flag over everything
    assert flagged.cache_ttl == 1.0  # a flag not given (None) is no override


def test_the_toml_file_must_exist_and_be_toml(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENWARD_CONFIG_FILE", str(tmp_path / "missing.toml"))
    with pytest.raises(FileNotFoundError):
        Settings.load()
    (tmp_path / "bad.toml").write_text("cache_ttl = \n")
    message = _error(monkeypatch, TOKENWARD_CONFIG_FILE=str(tmp_path / "bad.toml"))
    assert message.startswith(f"invalid setting: TOKENWARD_CONFIG_FILE: {tmp_path}/bad.toml is")
    (tmp_path / "unknown.toml").write_text("cache_tll = 1\n")
    message = _error(monkeypatch, TOKENWARD_CONFIG_FILE=str(tmp_path / "unknown.toml"))
    assert message == "invalid setting: TOKENWARD_CACHE_TLL: Extra inputs are not permitted"


def test_the_server_key_from_a_secret_file(tmp_path, monkeypatch):
    """``TOKENWARD_SECRET_KEY_FILE`` (a mounted secret): the key file, one key per line;
    with ``TOKENWARD_SECRET_KEY`` as well it is an error, not a silent choice."""
    key = secrets.token_hex(32)
    expected = load_hasher(Settings(secret_key=key)).hash("x")
    (tmp_path / "key").write_text(f"{key}\n")
    monkeypatch.setenv("TOKENWARD_SECRET_KEY_FILE", str(tmp_path / "key"))
    assert load_hasher(Settings.load()).hash("x") == expected
    other = secrets.token_hex(32)
    message = _error(monkeypatch, TOKENWARD_SECRET_KEY=other)
    assert message == (
        "invalid setting: TOKENWARD_SECRET_KEY_FILE: give TOKENWARD_SECRET_KEY or "
        "TOKENWARD_SECRET_KEY_FILE, not both"
    )
    with pytest.raises(ValidationError) as caught:
        Settings.load()
    assert other not in str(caught.value)  # not even in the exception's own text


@pytest.mark.slow
def test_serve_stops_on_a_missing_secret_file_in_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENWARD_")}
    env.update(NO_COLOR="1", COLUMNS="200", TOKENWARD_DATA_DIR=str(tmp_path))
    env["TOKENWARD_DATABASE_URL_FILE"] = str(tmp_path / "absent")
    result = subprocess.run(
        tokenward_cmd("serve", "--port", "0"),
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (
        f"error: invalid setting: TOKENWARD_DATABASE_URL_FILE: cannot read {tmp_path}/absent: "
        "No such file or directory"
    )


def test_the_file_variants_are_documented():
    readme = (ROOT / "README.md").read_text()
    for name in sorted(SECRET_SETTINGS):
        assert f"`TOKENWARD_{name.upper()}_FILE`" in readme, name
