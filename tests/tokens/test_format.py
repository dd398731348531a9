"""The token wire format (DESIGN.md §3): shape, checksum, scanning and hints."""

from __future__ import annotations

import math
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenward.tokens.format import (
    BASE62,
    BODY_LENGTH,
    CHECK_LENGTH,
    TOKEN_LENGTH,
    TOKEN_PATTERN,
    Environment,
    TokenFormatError,
    checksum,
    find_tokens,
    generate_token,
    parse_token,
    token_hint,
)

SHAPE = re.compile(r"tw_(live|test)_[0-9A-Za-z]{32}[0-9A-Za-z]{6}")

environments = st.sampled_from(["live", "test"])
bodies = st.text(alphabet=BASE62, min_size=BODY_LENGTH, max_size=BODY_LENGTH)


def build(env: str, body: str) -> str:
    head = f"tw_{env}_{body}"
    return head + checksum(head)


@pytest.mark.parametrize("env", ["live", "test"])
def test_generated_token_has_the_documented_shape_and_round_trips(env):
    token = generate_token(env)
    assert SHAPE.fullmatch(token)
    assert len(token) == TOKEN_LENGTH == len("tw_live_") + 32 + 6
    assert token.startswith(f"tw_{env}_")
    assert token[-CHECK_LENGTH:] == checksum(token[:-CHECK_LENGTH])
    parsed = parse_token(token)
    assert parsed.environment is Environment(env)
    assert parsed.value == token


def test_checksum_is_base62_crc32_most_significant_digit_first():
    import zlib

    head = "tw_live_" + "a" * 32
    value = 0
    for char in checksum(head):
        value = value * 62 + BASE62.index(char)
    assert value == zlib.crc32(head.encode())


def test_unknown_environment_is_rejected():
    with pytest.raises(ValueError):
        generate_token("prod")


@given(environments, bodies)
def test_every_constructed_token_round_trips(env, body):
    token = build(env, body)
    assert parse_token(token).environment.value == env
    assert find_tokens(f"leaked: {token} (oops)") == [token]


@settings(max_examples=300)
@given(environments, bodies, st.data())
def test_every_single_character_change_is_rejected(env, body, data):
    token = build(env, body)
    position = data.draw(st.integers(0, len(token) - 1), label="position")
    alphabet = BASE62 + "_-.:/+= \n\x00é€"
    replacement = data.draw(
        st.sampled_from(alphabet).filter(lambda c: c != token[position]), label="replacement"
    )
    changed = token[:position] + replacement + token[position + 1 :]
    with pytest.raises(TokenFormatError) as info:
        parse_token(changed)
    assert info.value.reason in ("malformed", "bad_checksum")
    assert changed not in str(info.value)
    assert find_tokens(changed) == []


@settings(max_examples=10)
@given(environments, bodies)
def test_exhaustive_single_character_changes_of_one_token(env, body):
    token = build(env, body)
    for position in range(len(token)):
        for char in BASE62 + "_":
            if char == token[position]:
                continue
            changed = token[:position] + char + token[position + 1 :]
            with pytest.raises(TokenFormatError):
                parse_token(changed)


@settings(max_examples=500)
@given(st.one_of(st.text(max_size=80), st.text(alphabet=BASE62 + "_tw", min_size=40, max_size=50)))
def test_random_text_never_parses_unless_it_is_a_valid_token(text):
    try:
        parsed = parse_token(text)
    except TokenFormatError as exc:
        assert exc.reason in ("malformed", "bad_checksum")
        return
    # It parsed: then it really is a token of the documented shape with a matching checksum.
    assert SHAPE.fullmatch(text)
    assert checksum(text[:-CHECK_LENGTH]) == text[-CHECK_LENGTH:]
    assert parsed.value == text


@settings(max_examples=200)
@given(environments, bodies, st.integers(0, 5))
def test_wrong_length_is_malformed(env, body, cut):
    token = build(env, body)
    for changed in (token[: len(token) - 1 - cut], token + BASE62[: cut + 1]):
        with pytest.raises(TokenFormatError) as info:
            parse_token(changed)
        assert info.value.reason == "malformed"


def test_bad_checksum_and_malformed_reasons():
    token = generate_token("live")
    flipped = token[:-1] + ("A" if token[-1] != "A" else "B")
    with pytest.raises(TokenFormatError) as info:
        parse_token(flipped)
    assert info.value.reason == "bad_checksum"
    for garbage in ("", "tw_live_", "Bearer " + token, token + " ", "tw_prod_" + "a" * 38):
        with pytest.raises(TokenFormatError) as info:
            parse_token(garbage)
        assert info.value.reason == "malformed"


def test_find_tokens_finds_tokens_and_drops_look_alikes():
    live, test = generate_token("live"), generate_token("test")
    look_alike = live[:-1] + ("x" if live[-1] != "x" else "y")  # matches the regex, bad check
    assert TOKEN_PATTERN.search(look_alike)
    text = (
        f"config:\n  key = {live}\n  other = '{test}'\n"
        f"  stale = {look_alike}\n  url = https://x.test/?k={live}&z=1\n"
    )
    assert find_tokens(text) == [live, test, live]
    assert find_tokens(look_alike) == []
    assert find_tokens("nothing here tw_live_short") == []


def test_find_tokens_does_not_match_inside_longer_words():
    token = generate_token("live")
    assert find_tokens("x" + token) == []
    assert find_tokens(token + "x") == []


@given(environments, bodies)
def test_hint_shows_no_more_than_prefix_and_last_four(env, body):
    token = build(env, body)
    hint = token_hint(token)
    assert hint == f"tw_{env}_…{token[-4:]}"
    # Nothing of the secret body appears beyond the last four characters.
    secret_part = token[len(f"tw_{env}_") : -4]
    visible = hint.replace(f"tw_{env}_", "", 1).replace(token[-4:], "")
    assert not set(visible) & set(BASE62)
    assert secret_part not in hint
    assert len(hint) <= len(f"tw_{env}_") + 1 + 4


def test_entropy_is_about_190_bits_and_tokens_do_not_repeat():
    bits = BODY_LENGTH * math.log2(len(BASE62))
    assert len(set(BASE62)) == 62 and 189 < bits < 192
    tokens = [generate_token("live") for _ in range(10_000)]
    assert len(set(tokens)) == len(tokens)
    bodies_seen = {t[8:40] for t in tokens}
    assert len(bodies_seen) == len(tokens)
    # Every base62 character turns up in the bodies, about evenly (the source is uniform).
    counts = {c: 0 for c in BASE62}
    for t in tokens:
        for c in t[8:40]:
            counts[c] += 1
    expected = 10_000 * 32 / 62
    assert all(0.85 * expected < n < 1.15 * expected for n in counts.values())
