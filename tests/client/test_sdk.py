"""The SDK's pieces without a server: the async twin of every admin method, the same idea
of a token secret as the server's, webhook signatures the server's signer makes, and the
compatibility names under ``tokenward.client``."""

from __future__ import annotations

import inspect
import time

import pytest

import tokenward_client
from tokenward.oauth.webhooks import sign
from tokenward.tokens.format import TokenFormatError, generate_token, holds_token, parse_token
from tokenward_client import AdminClient, AsyncAdminClient, verify_webhook_signature
from tokenward_client._secrets import holds_token as client_holds_token
from tokenward_client._secrets import is_token, looks_like_secret


def _methods(cls: type) -> dict[str, inspect.Signature]:
    return {
        name: inspect.signature(member)
        for name, member in vars(cls).items()
        if callable(member) and not name.startswith("_")
    }


def test_every_admin_method_has_an_async_twin_with_the_same_parameters():
    sync, async_ = _methods(AdminClient), _methods(AsyncAdminClient)
    assert sorted(set(sync) - {"refuse_secrets"}) == sorted(async_)
    for name, signature in async_.items():
        assert list(signature.parameters) == list(sync[name].parameters), name
        assert inspect.iscoroutinefunction(getattr(AsyncAdminClient, name)) or (
            inspect.isasyncgenfunction(getattr(AsyncAdminClient, name))
        ), name


def _damaged(token: str) -> list[str]:
    return [
        token[:-1] + ("A" if token[-1] != "A" else "B"),  # bad checksum: still a secret
        token[:20],  # cut
        token.replace("tw_", "tw-"),
        token + "x",
        f"tok_{token}",
        token.replace("t", "%74", 1),
        token.lower(),
    ]


@pytest.mark.parametrize("environment", ["live", "test"])
def test_a_secret_is_seen_as_the_server_sees_it(environment):
    for _ in range(20):
        token = generate_token(environment)
        assert is_token(token) and looks_like_secret(token)
        for text in _damaged(token):
            try:
                parse_token(text)
                shaped = True
            except TokenFormatError as exc:
                shaped = exc.reason == "bad_checksum"
            assert is_token(text) == shaped, text
            assert client_holds_token(text) == holds_token(text), text
    for name in ("shop", "tok_abc123", "tw_live_short", "records:read", "trp_x"):
        assert not looks_like_secret(name)


def test_webhook_signatures_of_the_server_are_accepted_and_nothing_else():
    body, now = b'{"event":"token.rotated"}', int(time.time())
    header = sign("whsec", body, now)
    assert verify_webhook_signature("whsec", body, header)
    assert not verify_webhook_signature("other", body, header)
    assert not verify_webhook_signature("whsec", body + b" ", header)
    assert not verify_webhook_signature("whsec", body, sign("whsec", body, now - 301))
    assert verify_webhook_signature("whsec", body, sign("whsec", body, now - 301), max_age=600)
    for garbage in ("", "t=x,v1=00", "v1=00", "t=1"):
        assert not verify_webhook_signature("whsec", body, garbage)


def test_the_old_import_paths_are_the_same_objects():
    from tokenward.client.admin import AdminClient as OldAdmin
    from tokenward.client.auth import TokenwardAuth as OldAuth
    from tokenward.client.oauth import exchange_token as old_exchange

    import tokenward.client

    assert OldAdmin is AdminClient
    assert OldAuth is tokenward_client.TokenwardAuth
    assert old_exchange is tokenward_client.exchange_token
    assert tokenward.client.AsyncAdminClient is AsyncAdminClient
    assert set(tokenward_client.__all__) <= set(tokenward.client.__all__)


def test_the_public_names():
    assert sorted(tokenward_client.__all__) == [
        "AdminAPIError",
        "AdminClient",
        "AsyncAdminClient",
        "AsyncVerifyClient",
        "TokenSecretAsId",
        "TokenwardAuth",
        "TokenwardAuthError",
        "VerifyClient",
        "exchange_token",
        "github_actions_identity",
        "verify_webhook_signature",
    ]
