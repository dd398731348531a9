"""The PostgreSQL gateway's pure parts: the ``[[postgres]]`` section, the statement lexer
(redaction, read-only attempts) and the SCRAM-SHA-256 client (RFC 7677's test vector)."""

from __future__ import annotations

import pytest

from tokenward.gateway import ConfigError, parse_policy
from tokenward.gateway.pgsql import leaves_read_only, redact, verb
from tokenward.gateway.pgwire import ProtocolError, ScramClient, error_fields, error_response

LISTENER = """
[[postgres]]
name = "appdb"
listen = "127.0.0.1:6432"
upstream = "postgresql://tokenward_gw@127.0.0.1:5432/app"
read_scope = "db:appdb:read"
write_scope = "db:appdb:write"
{extra}
"""


def test_the_example_listener_parses_with_its_defaults():
    (listener,) = parse_policy(LISTENER.format(extra="")).postgres
    assert (listener.host, listener.port) == ("127.0.0.1", 6432)
    assert (listener.upstream_user, listener.upstream_database) == ("tokenward_gw", "app")
    assert listener.upstream_port == 5432 and listener.upstream_sslmode == "disable"
    assert listener.max_connections_per_token == 10 and listener.audit_statements == "redacted"
    assert listener.limit is None
    ipv6 = LISTENER.format(extra="").replace("127.0.0.1:6432", "[::1]:6432")
    assert parse_policy(ipv6).postgres[0].host == "::1"


def test_every_listener_key_is_documented():
    from pathlib import Path

    from tokenward.gateway.config import POSTGRES_KEYS

    doc = (Path(__file__).parents[2] / "docs" / "databases.md").read_text()
    table = doc.split("## The `[[postgres]]` table", 1)[1].split("\n## ", 1)[0]
    documented = set()
    for line in table.splitlines():
        if line.startswith("| `"):
            documented.update(k.strip("` ") for k in line.split("|")[1].split(","))
    assert documented == set(POSTGRES_KEYS)


@pytest.mark.parametrize(
    ("extra", "upstream", "problem"),
    [
        ("", "postgresql://gw:secret@127.0.0.1/app", "must not hold a password"),
        ("", "http://127.0.0.1/app", "postgresql:// URL"),
        ("", "postgresql://127.0.0.1/app", "must name the role"),
        ("", "postgresql://gw@127.0.0.1/", "must name the database"),
        ("", "postgresql://gw@127.0.0.1/app?sslmode=allow", "sslmode"),
        ('password_env = "PGPASSWORD"', None, "TOKENWARD_*"),
        ('password_env = "TOKENWARD_X"\npassword_file = "/p"', None, "not both"),
        ("idle_timeout = -1", None, "seconds"),
        ('audit_statements = "some"', None, "redacted"),
        ('rate_limit = "often"', None, "postgres[0].rate_limit"),
        ("surprise = 1", None, "unknown key"),
    ],
)
def test_a_bad_listener_names_its_line_and_key(extra, upstream, problem):
    text = LISTENER.format(extra=extra)
    if upstream is not None:
        text = text.replace("postgresql://tokenward_gw@127.0.0.1:5432/app", upstream)
    with pytest.raises(ConfigError) as info:
        parse_policy(text, "t.toml")
    assert problem in str(info.value) and "t.toml:" in str(info.value)


def test_the_upstream_password_comes_from_the_environment_or_a_file(monkeypatch, tmp_path):
    (listener,) = parse_policy(
        LISTENER.format(extra='password_env = "TOKENWARD_PG_APPDB_PASSWORD"')
    ).postgres
    with pytest.raises(ConfigError, match="TOKENWARD_PG_APPDB_PASSWORD is not set"):
        listener.upstream_password()
    monkeypatch.setenv("TOKENWARD_PG_APPDB_PASSWORD", "from-env")
    assert listener.upstream_password() == "from-env"
    secret = tmp_path / "pw"
    secret.write_text("from-file\n")
    (listener,) = parse_policy(LISTENER.format(extra=f'password_file = "{secret}"')).postgres
    assert listener.upstream_password() == "from-file"


@pytest.mark.parametrize(
    ("sql", "redacted"),
    [
        ("select * from t where a = 'x''y' and b = 42", "select * from t where a = ? and b = ?"),
        ("select E'\\'' , $$body$$, $q$x$q$, 1.5e3, $1", "select ? , ?, ?, ?, $1"),
        ('select "col1", t2.c3 from "t 4" -- secret\n', 'select "col1", t2.c3 from "t 4"'),
        ("select 1 /* a /* nested */ secret */ + 2", "select ? + ?"),
        ("select 'unterminated secret", "select ?"),
        ("insert into t values (X'ff', B'01', U&'d\\0061t')", "insert into t values (?, ?, ?)"),
    ],
)
def test_literal_values_and_comments_are_redacted(sql, redacted):
    assert redact(sql) == redacted


def test_the_verb_is_the_first_keyword():
    assert verb(redact("  (select 1)")) == "SELECT" and verb("") == "QUERY"


@pytest.mark.parametrize(
    "sql",
    [
        "SET default_transaction_read_only = off",
        "set session transaction_read_only to false",
        'SET "default_transaction_read_only" TO DEFAULT',
        "begin /* x */ read  write",
        "BEGIN TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ WRITE",
        "select 1; START TRANSACTION READ WRITE",
        "SET TRANSACTION READ WRITE",
        "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE",
        "select pg_catalog.set_config('default_transaction_read_only', 'off', false)",
        'SET U&"transaction_r\\0065ad_only" = off',
    ],
)
def test_attempts_to_leave_read_only_are_recognised(sql):
    assert leaves_read_only(sql)


@pytest.mark.parametrize(
    "sql",
    [
        "select 'begin read write'",
        "RESET default_transaction_read_only",
        "BEGIN READ ONLY",
        "select * from readings",
        "SET search_path = app",
    ],
)
def test_ordinary_statements_are_not_taken_for_attempts(sql):
    assert not leaves_read_only(sql)


def test_scram_sha_256_matches_rfc_7677():
    client = ScramClient("pencil", {}, user="user")
    client.first("rOprNGfwEbeRWgbNEkqO")
    server_first = (
        "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
    )
    assert client.final(server_first) == (
        b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
        b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
    )
    client.verify("v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")
    with pytest.raises(ProtocolError, match="signature"):
        client.verify("v=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=")


def test_scram_refuses_a_nonce_that_does_not_extend_its_own():
    client = ScramClient("pencil", {})
    client.first("abc")
    with pytest.raises(ProtocolError, match="nonce"):
        client.final("r=xyz123,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096")


def test_an_error_response_round_trips():
    message = error_response("28P01", "bad token", detail="why")
    assert message[:1] == b"E"
    fields = error_fields(message[5:])
    assert fields["C"] == "28P01" and fields["M"] == "bad token" and fields["S"] == "FATAL"
