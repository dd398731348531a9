"""One failed-credential limit for every place a credential is accepted (tokenward.failures).

The gateway and ``/authz`` had it (tests/gateway/test_authz.py); these are the other entry
points: any bearer-authenticated admin call, the verify API's caller, ``POST /v1/token``,
``/oauth/introspect`` and ``/oauth/revoke`` (Bearer and client secrets). Each answers ``429
too_many_failures`` with ``Retry-After`` and the JSON error body, before any lookup, with an
access event; failures anywhere count towards one limit per address.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import pytest

from tests.conftest import truncate_all
from tokenward.app import Services, create_asgi, open_services
from tokenward.service import Issued, TokenSpec, issue_bootstrap_record
from tokenward.settings import Settings
from tokenward.tokens.format import generate_token

EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
API_KEY = "urn:tokenward:params:oauth:token-type:api_key"
GUESSER = "192.0.2.66"
BYSTANDER = "192.0.2.67"


@pytest.fixture
async def guarded(settings: Settings) -> AsyncIterator[tuple[Services, Issued, str]]:
    """Services with a limit of 3 failures a minute; the global admin and a project key."""
    services = await open_services(settings.model_copy(update={"auth_failure_limit": "3/minute"}))
    await truncate_all(services)
    try:
        admin = issue_bootstrap_record(services.hasher, services.verifier.clock())
        await services.store.insert_token(admin.record, services.hasher.hash(admin.secret))
        await services.tokens.create_project(admin.record, "app")
        key = await services.tokens.create_token(
            admin.record, TokenSpec(project="app", scopes=["records:read"])
        )
        yield services, admin, key.secret
    finally:
        await services.close()


def _client(services: Services, peer: str) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=create_asgi(services=services), client=(peer, 50000))
    return httpx.AsyncClient(transport=transport, base_url="http://tokenward.test")


def _bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def _basic(secret: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f":{secret}".encode()).decode()}


def _assert_refused(response: httpx.Response) -> None:
    assert response.status_code == 429, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["error"] == "too_many_failures"
    assert response.json()["message"]
    assert int(response.headers["retry-after"]) >= 1


Call = Callable[[httpx.AsyncClient, str], Awaitable[httpx.Response]]


async def _admin_call(c: httpx.AsyncClient, secret: str) -> httpx.Response:
    return await c.get("/v1/projects", headers=_bearer(secret))


async def _revoke_call(c: httpx.AsyncClient, secret: str) -> httpx.Response:
    return await c.post("/v1/tokens/tok_0000000000000000/revoke", json={}, headers=_bearer(secret))


async def _verify_caller(c: httpx.AsyncClient, secret: str) -> httpx.Response:
    token = generate_token("live")
    return await c.post("/v1/verify", json={"token": token}, headers=_bearer(secret))


async def _token_endpoint(c: httpx.AsyncClient, secret: str) -> httpx.Response:
    form = {"grant_type": EXCHANGE, "subject_token": secret, "subject_token_type": API_KEY}
    return await c.post("/v1/token", data=form)


async def _introspect_basic(c: httpx.AsyncClient, secret: str) -> httpx.Response:
    return await c.post("/oauth/introspect", data={"token": "x"}, headers=_basic(secret))


async def _introspect_bearer(c: httpx.AsyncClient, secret: str) -> httpx.Response:
    return await c.post("/oauth/introspect", data={"token": "x"}, headers=_bearer(secret))


async def _revoke_post(c: httpx.AsyncClient, secret: str) -> httpx.Response:
    form = {"token": generate_token("live"), "client_secret": secret}
    return await c.post("/oauth/revoke", data=form)


async def _revoke_bearer(c: httpx.AsyncClient, secret: str) -> httpx.Response:
    form = {"token": generate_token("live")}
    return await c.post("/oauth/revoke", data=form, headers=_bearer(secret))


ENTRY_POINTS: dict[str, tuple[Call, str]] = {
    # name: (a call presenting ``secret`` as its credential, which good credential to use)
    "admin_api": (_admin_call, "admin"),
    "admin_api_write": (_revoke_call, "admin"),
    "verify_caller": (_verify_caller, "admin"),
    "token_endpoint": (_token_endpoint, "key"),
    "introspect_basic": (_introspect_basic, "admin"),
    "introspect_bearer": (_introspect_bearer, "admin"),
    "revoke_client_secret_post": (_revoke_post, "admin"),
    "revoke_bearer": (_revoke_bearer, "admin"),
}


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
async def test_repeated_unknown_credentials_get_429_before_any_lookup(
    guarded: tuple[Services, Issued, str], entry: str
) -> None:
    services, admin, key = guarded
    call, which = ENTRY_POINTS[entry]
    good = admin.secret if which == "admin" else key
    async with _client(services, GUESSER) as guesser, _client(services, BYSTANDER) as other:
        typo = good[:-1] + ("0" if good[-1] != "0" else "1")  # never the credential itself
        for credential in (generate_token("live"), typo, "nonsense-credential"):
            response = await call(guesser, credential)
            assert response.status_code in (400, 401), (response.status_code, response.text)
        misses = services.verifier.misses
        _assert_refused(await call(guesser, good))  # even the good credential: no lookup
        assert services.verifier.misses == misses
        # another address is not refused
        assert (await call(other, good)).status_code not in (401, 429)


async def test_failures_anywhere_count_towards_one_limit(
    guarded: tuple[Services, Issued, str],
) -> None:
    services, admin, key = guarded
    async with _client(services, GUESSER) as guesser:
        await _admin_call(guesser, generate_token("live"))
        await _token_endpoint(guesser, generate_token("live"))
        await _introspect_basic(guesser, generate_token("live"))
        _assert_refused(await _admin_call(guesser, admin.secret))
        _assert_refused(await _token_endpoint(guesser, key))
        # and the gateway's (and /authz's) decision refuses the address as well
        assert services.enforcement is not None
        decided = await services.enforcement.decide("GET", "/x", f"Bearer {key}", GUESSER)
        assert decided.status == 429 and decided.error == "too_many_failures"


async def test_the_refusal_is_audited(guarded: tuple[Services, Issued, str]) -> None:
    services, admin, _ = guarded
    async with _client(services, GUESSER) as guesser, _client(services, BYSTANDER) as other:
        for _ in range(3):
            await _admin_call(guesser, generate_token("live"))
        _assert_refused(await _admin_call(guesser, admin.secret))
        await services.audit.flush()  # type: ignore[union-attr]
        found = await other.get(
            "/v1/audit", params={"reason": "too_many_failures"}, headers=_bearer(admin.secret)
        )
    assert found.status_code == 200, found.text
    [event] = found.json()["events"]
    assert event["client_ip"] == GUESSER and event["decision"] == "deny"


async def test_tokens_a_verify_caller_asks_about_do_not_count(
    guarded: tuple[Services, Issued, str],
) -> None:
    """The verify API's ``token`` and ``ip`` are another party's: brute_force's business."""
    services, admin, _ = guarded
    async with _client(services, GUESSER) as caller:
        for _ in range(5):
            response = await caller.post(
                "/v1/verify",
                json={"token": generate_token("live"), "ip": GUESSER},
                headers=_bearer(admin.secret),
            )
            assert response.status_code == 200 and response.json()["reason"] == "unknown"
        assert (await _admin_call(caller, admin.secret)).status_code == 200
