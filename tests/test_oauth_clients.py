"""A real OAuth client library (Authlib) against a real tokenward server, SQLite and PostgreSQL.

Token exchange (RFC 8693), refresh with rotation, the access token as a Bearer credential,
introspection (RFC 7662) and revocation (RFC 7009) with each client authentication method
Authlib offers, OAuth errors, and Authlib's own refresh of an expired access token.
"""

from __future__ import annotations

import asyncio
import time
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta

import authlib.deprecate  # noqa: F401 - its import puts an "always" filter in front
import httpx
import pytest

with warnings.catch_warnings():
    # Authlib's httpx integration prefers the httpx2 package and says so once, at import;
    # tokenward and its SDK use httpx, which it still supports.
    warnings.filterwarnings("ignore", "The httpx module is deprecated", DeprecationWarning)
    from authlib.integrations.httpx_client import AsyncOAuth2Client, OAuth2Client, OAuthError

from tests.gateway.support import uvicorn_server
from tokenward.app import Services, create_asgi
from tokenward.oauth.exchange import GRANT_EXCHANGE, TYPE_ACCESS
from tokenward.service import Issued, TokenSpec
from tokenward.tokens.format import generate_token

AUTH_METHODS = ["none", "client_secret_basic", "client_secret_post"]


@dataclass
class Server:
    url: str
    services: Services
    api_key: Issued  # records:read and verify, project "shop"
    resource_server: Issued  # verify and admin:write: introspects and revokes
    responses: list[httpx.Response] = field(default_factory=list)

    @property
    def token_endpoint(self) -> str:
        return f"{self.url}/v1/token"

    async def record(self, response: httpx.Response) -> None:
        await response.aread()
        self.responses.append(response)

    def client(self, method: str = "none", **kwargs: object) -> AsyncOAuth2Client:
        """An Authlib client; ``method`` is how it authenticates (with the resource server's
        credential as its secret, except for a public client)."""
        credentials: dict[str, object] = {"client_id": "my-app"}
        if method != "none":
            credentials = {
                "client_id": self.resource_server.record.id,
                "client_secret": self.resource_server.secret,
            }
        return AsyncOAuth2Client(
            **credentials,
            token_endpoint_auth_method=method,
            revocation_endpoint_auth_method=method,
            event_hooks={"response": [self.record]},
            **kwargs,
        )

    async def exchange(self, client: AsyncOAuth2Client, **form: object) -> dict:
        return await client.fetch_token(
            self.token_endpoint,
            grant_type=GRANT_EXCHANGE,
            subject_token=self.api_key.secret,
            subject_token_type=TYPE_ACCESS,
            **form,
        )

    async def introspect(self, token: str) -> dict:
        async with self.client("client_secret_basic") as rs:
            response = await rs.introspect_token(f"{self.url}/oauth/introspect", token=token)
        assert response.status_code == 200, response.text
        assert response.headers["cache-control"] == "no-store"
        return response.json()


@pytest.fixture
async def server(services: Services, admin: Issued) -> AsyncIterator[Server]:
    """A real tokenward server on a free loopback port, on this test's store."""
    await services.tokens.create_project(admin.record, "shop")
    api_key = await services.tokens.create_token(
        admin.record,
        TokenSpec(project="shop", scopes=["records:read", "verify"], ttl=timedelta(days=1)),
    )
    resource_server = await services.tokens.create_token(
        admin.record, TokenSpec(project="shop", scopes=["verify", "admin:write"])
    )
    async with uvicorn_server(create_asgi(services=services)) as port:
        yield Server(f"http://127.0.0.1:{port}", services, api_key, resource_server)


async def verify_with(client: AsyncOAuth2Client, server: Server, token: str) -> httpx.Response:
    """POST /v1/verify with the client's access token as its Bearer credential."""
    return await client.post(f"{server.url}/v1/verify", json={"token": token})


@pytest.mark.parametrize("method", AUTH_METHODS)
async def test_exchange_refresh_and_use_as_bearer(server, method):
    async with server.client(method) as client:
        token = await server.exchange(client, scope="records:read verify")
        assert token["token_type"] == "Bearer"
        assert token["scope"] == "records:read verify"
        assert token["expires_in"] == 900
        assert token["issued_token_type"] == TYPE_ACCESS
        assert token["access_token"].startswith("tw_live_")
        assert token["refresh_token"].startswith("tw_live_")
        assert client.token["access_token"] == token["access_token"]
        assert abs(client.token["expires_at"] - (time.time() + 900)) <= 2
        answer = server.responses[-1]
        assert answer.status_code == 200
        assert answer.headers["cache-control"] == "no-store"
        assert answer.headers["pragma"] == "no-cache"

        # The access token is the Bearer credential Authlib attaches.
        verified = await verify_with(client, server, server.api_key.secret)
        assert verified.status_code == 200 and verified.json()["valid"] is True
        sent = verified.request.headers["authorization"]
        assert sent == f"Bearer {token['access_token']}"
        # It is the narrowed token, not the API key: no admin scope.
        listed = await client.get(f"{server.url}/v1/tokens")
        assert listed.status_code == 403 and listed.json()["error"] == "insufficient_scope"

        first_refresh = token["refresh_token"]
        refreshed = await client.refresh_token(server.token_endpoint)
        assert refreshed["access_token"] != token["access_token"]
        assert refreshed["refresh_token"] not in (first_refresh, token["access_token"])
        assert refreshed["scope"] == "records:read verify"
        assert client.token["access_token"] == refreshed["access_token"]
        verified = await verify_with(client, server, server.api_key.secret)
        assert verified.json()["valid"] is True
        assert verified.request.headers["authorization"] == f"Bearer {refreshed['access_token']}"

        # The first refresh token is spent: presented again after the concurrency grace, it
        # is reuse, and the whole family is revoked (docs/short-lived-tokens.md).
        now = server.services.verifier.clock()
        server.services.verifier.clock = lambda: now + timedelta(seconds=30)
        with pytest.raises(OAuthError) as reused:
            await client.refresh_token(server.token_endpoint, refresh_token=first_refresh)
        assert reused.value.error == "invalid_grant"
        assert "family is revoked" in reused.value.description
        assert server.responses[-1].status_code == 400
        denied = await verify_with(client, server, server.api_key.secret)
        assert denied.status_code == 401
        assert await server.introspect(refreshed["access_token"]) == {"active": False}
    assert (await server.introspect(server.api_key.secret))["active"] is True


@pytest.mark.parametrize("method", ["client_secret_basic", "client_secret_post"])
async def test_introspect_and_revoke_with_client_authentication(server, method):
    async with server.client("none") as holder:
        token = await server.exchange(holder, scope="records:read", expires_in=600)
    async with server.client(method) as rs:
        response = await rs.introspect_token(
            f"{server.url}/oauth/introspect", token=token["access_token"]
        )
        assert response.status_code == 200, response.text
        assert response.headers["cache-control"] == "no-store"
        body = response.json()
        assert body["active"] is True
        assert body["scope"] == "records:read" and body["token_type"] == "access"
        assert body["client_id"] == "shop" and body["jti"] == token["token_id"]
        assert abs(body["exp"] - (time.time() + 600)) <= 2
        if method == "client_secret_basic":
            assert response.request.headers["authorization"].startswith("Basic ")
        else:
            assert "authorization" not in response.request.headers
            assert b"client_secret=" in response.request.content

        revoked = await rs.revoke_token(
            f"{server.url}/oauth/revoke",
            token=token["access_token"],
            token_type_hint="access_token",
        )
        assert revoked.status_code == 200, revoked.text
        assert revoked.headers["cache-control"] == "no-store"
        response = await rs.introspect_token(
            f"{server.url}/oauth/introspect", token=token["access_token"]
        )
        assert response.json() == {"active": False}
        # Unknown tokens are answered 200 too (RFC 7009 §2.2).
        unknown = await rs.revoke_token(f"{server.url}/oauth/revoke", token=generate_token("live"))
        assert unknown.status_code == 200
    assert (await server.introspect(server.api_key.secret))["active"] is True


@pytest.mark.parametrize("method", ["client_secret_basic", "client_secret_post"])
async def test_bad_client_credentials_are_invalid_client(server, method):
    target = server.api_key.secret
    wrong_id = AsyncOAuth2Client(
        client_id=server.api_key.record.id,  # not the id of the secret below
        client_secret=server.resource_server.secret,
        token_endpoint_auth_method=method,
        revocation_endpoint_auth_method=method,
    )
    wrong_secret = AsyncOAuth2Client(
        client_id=server.resource_server.record.id,
        client_secret=generate_token("live"),
        token_endpoint_auth_method=method,
        revocation_endpoint_auth_method=method,
    )
    for client in (wrong_id, wrong_secret):
        async with client:
            for path in ("/oauth/introspect", "/oauth/revoke"):
                call = (
                    client.introspect_token if path.endswith("introspect") else client.revoke_token
                )
                response = await call(f"{server.url}{path}", token=target)
                assert response.status_code == 401, response.text
                assert response.json()["error"] == "invalid_client"
                assert response.headers["cache-control"] == "no-store"
                challenge = response.headers["www-authenticate"]
                expected = "Basic" if method == "client_secret_basic" else "Bearer"
                assert challenge.startswith(expected)
                assert target not in response.text
    assert (await server.introspect(target))["active"] is True


async def test_one_client_authentication_method_and_a_well_formed_one(server):
    basic = httpx.BasicAuth(server.resource_server.record.id, server.resource_server.secret)
    form = {"token": server.api_key.secret}
    async with httpx.AsyncClient(base_url=server.url) as http:
        for path in ("/oauth/introspect", "/oauth/revoke"):
            both = await http.post(
                path,
                data={**form, "client_secret": server.resource_server.secret},
                auth=basic,
            )
            assert both.status_code == 400 and both.json()["error"] == "invalid_request"
            garbled = await http.post(path, data=form, headers={"Authorization": "Basic %%%"})
            assert garbled.status_code == 401 and garbled.json()["error"] == "invalid_client"
            assert garbled.headers["www-authenticate"].startswith("Basic")
    assert (await server.introspect(server.api_key.secret))["active"] is True


async def test_a_client_without_admin_scope_cannot_revoke_others(server):
    reader = await server.services.tokens.create_token(
        (await server.services.store.get_token(server.resource_server.record.id)),
        TokenSpec(project="shop", scopes=["verify"]),
    )
    async with AsyncOAuth2Client(client_id=reader.record.id, client_secret=reader.secret) as client:
        response = await client.revoke_token(
            f"{server.url}/oauth/revoke", token=server.api_key.secret
        )
        assert response.status_code == 403 and response.json()["error"] == "insufficient_scope"
        # Its own token it may give up, authenticating with that very token.
        own = await client.revoke_token(f"{server.url}/oauth/revoke", token=reader.secret)
        assert own.status_code == 200
    assert (await server.introspect(server.api_key.secret))["active"] is True
    assert await server.introspect(reader.secret) == {"active": False}


async def test_a_public_client_revokes_its_refresh_token_and_so_its_grant(server):
    async with server.client("none") as client:
        token = await server.exchange(client)
        assert (await server.introspect(token["access_token"]))["active"] is True
        response = await client.revoke_token(
            f"{server.url}/oauth/revoke",
            token=token["refresh_token"],
            token_type_hint="refresh_token",
        )
        assert response.status_code == 200, response.text
        assert "authorization" not in response.request.headers
        # RFC 7009 §2.1: the access tokens of the same grant go with it.
        assert await server.introspect(token["access_token"]) == {"active": False}
        with pytest.raises(OAuthError) as refused:
            await client.refresh_token(server.token_endpoint)
        assert refused.value.error == "invalid_grant"
        assert "revoked" in refused.value.description
    assert (await server.introspect(server.api_key.secret))["active"] is True


ERRORS = [
    (
        "refresh_token",
        {"refresh_token": generate_token("live")},
        "invalid_grant",
    ),
    (
        GRANT_EXCHANGE,
        {"subject_token": generate_token("live"), "subject_token_type": TYPE_ACCESS},
        "invalid_grant",
    ),
    ("api_key", {"scope": "admin:write"}, "invalid_scope"),
    ("api_key", {"scope": "records:read not a scope!"}, "invalid_scope"),
    ("api_key", {"expires_in": 7200}, "invalid_request"),
    ("client_credentials", {}, "unsupported_grant_type"),
    ("password", {"username": "u", "password": "p"}, "unsupported_grant_type"),
]


@pytest.mark.parametrize(("grant_type", "form", "code"), ERRORS)
async def test_errors_surface_as_oauth_errors(server, grant_type, form, code):
    async with server.client("none") as client:
        with pytest.raises(OAuthError) as raised:
            if grant_type == "api_key":
                await server.exchange(client, **form)
            else:
                await client.fetch_token(server.token_endpoint, grant_type=grant_type, **form)
    assert raised.value.error == code
    assert raised.value.description
    answer = server.responses[-1]
    assert answer.status_code == 400
    assert answer.headers["cache-control"] == "no-store"
    assert server.api_key.secret not in answer.text


async def test_authlib_refreshes_an_expired_access_token_by_itself(server):
    updates: list[dict] = []

    async def update_token(token, refresh_token=None, access_token=None):
        updates.append({"token": dict(token), "refresh_token": refresh_token})

    async with server.client(
        "none", token_endpoint=server.token_endpoint, update_token=update_token, leeway=0
    ) as client:
        first = await server.exchange(client, scope="verify", expires_in=1)
        assert first["expires_in"] == 1
        ok = await verify_with(client, server, server.api_key.secret)
        assert ok.status_code == 200 and ok.json()["valid"] is True
        while not client.token.is_expired(leeway=0):
            await asyncio.sleep(0.1)
        await asyncio.sleep(1)  # Authlib rounds expires_at down to the second; the server not
        # The server agrees it is expired.
        assert await server.introspect(first["access_token"]) == {"active": False}

        again = await verify_with(client, server, server.api_key.secret)
        assert again.status_code == 200 and again.json()["valid"] is True
        assert len(updates) == 1
        assert updates[0]["refresh_token"] == first["refresh_token"]
        renewed = client.token
        assert renewed["access_token"] != first["access_token"]
        assert renewed["refresh_token"] != first["refresh_token"]
        assert again.request.headers["authorization"] == f"Bearer {renewed['access_token']}"
        assert renewed["expires_in"] == 900  # the refresh asked for no lifetime: the default
        # Not expired: the next request refreshes nothing.
        await verify_with(client, server, server.api_key.secret)
        assert len(updates) == 1


async def test_the_sync_client_too(server):
    def run() -> tuple[dict, dict, int, int]:
        with OAuth2Client(client_id="my-app") as client:
            token = client.fetch_token(
                server.token_endpoint,
                grant_type=GRANT_EXCHANGE,
                subject_token=server.api_key.secret,
                subject_token_type=TYPE_ACCESS,
                scope="verify",
            )
            verified = client.post(f"{server.url}/v1/verify", json={"token": token["access_token"]})
            refreshed = client.refresh_token(server.token_endpoint)
            revoked = client.revoke_token(
                f"{server.url}/oauth/revoke", token=refreshed["refresh_token"]
            )
            return token, refreshed, verified.status_code, revoked.status_code

    token, refreshed, verified, revoked = await asyncio.to_thread(run)
    assert verified == 200 and revoked == 200
    assert refreshed["access_token"] != token["access_token"]
    assert await server.introspect(refreshed["access_token"]) == {"active": False}
