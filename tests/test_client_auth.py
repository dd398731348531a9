"""The SDK against a real server on loopback: exchange, refresh, DPoP, herd, retry on 401."""

from __future__ import annotations

import asyncio
import os
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tokenward_client import TokenwardAuth, TokenwardAuthError


def api_key(live, scopes=("admin:read", "records:read")):
    return live.admin.create_token(project="shop", scopes=list(scopes), ttl="1d")


async def test_sync_client_exchanges_once_and_uses_the_token(live):
    key = api_key(live)
    auth = TokenwardAuth(live.url, api_key=key["token"], scope="admin:read")
    with httpx.Client(auth=auth, base_url=live.url) as http:
        for _ in range(3):
            response = http.get("/v1/projects")
            assert response.status_code == 200, response.text
            # The request carried a short-lived access token, never the API key.
            sent = response.request.headers["authorization"]
            assert sent.startswith("Bearer tw_live_") and key["token"] not in sent
    assert auth.token_requests == 1
    kinds = sorted(t["kind"] for t in live.admin.list_tokens(project="shop"))
    assert kinds == ["access", "api_key", "refresh"]


async def test_threads_share_one_refresh(live):
    key = api_key(live)
    auth = TokenwardAuth(live.url, api_key=key["token"])
    with httpx.Client(auth=auth, base_url=live.url) as http:

        def call(_):
            return http.get("/v1/projects").status_code

        with ThreadPoolExecutor(8) as pool:
            statuses = await asyncio.to_thread(lambda: list(pool.map(call, range(16))))
    assert statuses == [200] * 16
    assert auth.token_requests == 1


async def test_async_client_no_thundering_herd(live):
    key = api_key(live)
    auth = TokenwardAuth(live.url, api_key=key["token"])
    async with httpx.AsyncClient(auth=auth, base_url=live.url) as http:
        responses = await asyncio.gather(*[http.get("/v1/projects") for _ in range(20)])
    assert [r.status_code for r in responses] == [200] * 20
    assert auth.token_requests == 1


async def test_refreshes_before_expiry_with_the_refresh_token(live):
    key = api_key(live)
    now = [time.time()]
    auth = TokenwardAuth(live.url, api_key=key["token"], lifetime=600, clock=lambda: now[0])
    async with httpx.AsyncClient(auth=auth, base_url=live.url) as http:
        assert (await http.get("/v1/projects")).status_code == 200
        first_refresh = auth._refresh
        now[0] += 600 - 30  # inside the refresh margin, before the expiry
        assert (await http.get("/v1/projects")).status_code == 200
    assert auth.token_requests == 2
    assert auth._refresh != first_refresh  # the refresh token rotated
    refresh_tokens = [t for t in live.admin.list_tokens(project="shop") if t["kind"] == "refresh"]
    assert len(refresh_tokens) == 2
    assert sum(t["replaced_by"] is not None for t in refresh_tokens) == 1


async def test_401_gets_a_new_token_and_retries_once(live):
    key = api_key(live)
    auth = TokenwardAuth(live.url, api_key=key["token"])
    with httpx.Client(auth=auth, base_url=live.url) as http:
        assert http.get("/v1/projects").status_code == 200
        access_id = next(
            t["id"] for t in live.admin.list_tokens(project="shop") if t["kind"] == "access"
        )
        live.admin.revoke_token(access_id, "test")
        assert http.get("/v1/projects").status_code == 200
    assert auth.token_requests == 2


async def test_dpop_bound_tokens(live):
    key = api_key(live)
    auth = TokenwardAuth(live.url, api_key=key["token"], dpop=True)
    async with httpx.AsyncClient(auth=auth, base_url=live.url) as http:
        response = await http.get("/v1/projects")
        assert response.status_code == 200, response.text
        assert response.request.headers["authorization"].startswith("DPoP ")
        stolen = response.request.headers["authorization"].split()[1]
    # The same access token without the key is refused.
    thief = httpx.get(live.url + "/v1/projects", headers={"Authorization": f"Bearer {stolen}"})
    assert thief.status_code == 401 and thief.json()["error"] == "dpop_required"


async def test_identity_token_source(live, issuer):
    live.admin.request(
        "POST",
        "/v1/projects/shop/trust-policies",
        json={
            "name": "ci",
            "issuer": issuer.url,
            "audience": "tokenward",
            "claims": {"repository": "acme/shop"},
            "scopes": ["admin:read"],
        },
    )
    auth = TokenwardAuth(live.url, identity_token=issuer.token, project="shop")
    with httpx.Client(auth=auth, base_url=live.url) as http:
        assert http.get("/v1/projects").status_code == 200
    assert TokenwardAuth(live.url, identity_token="x", project="a", audience="b").audience == "a/b"
    with pytest.raises(ValueError, match="give project="):
        TokenwardAuth(live.url, identity_token=issuer.token)
    with pytest.raises(ValueError, match="one of its policies"):
        TokenwardAuth(live.url, identity_token="x", project="a", audience="b/c")


async def test_refused_credential_raises(live):
    auth = TokenwardAuth(live.url, api_key="tw_live_" + "a" * 38)
    with httpx.Client(auth=auth) as http, pytest.raises(TokenwardAuthError) as info:
        http.get(live.url + "/v1/projects")
    assert info.value.code == "invalid_grant"
    with pytest.raises(ValueError):
        TokenwardAuth(live.url)


async def test_documented_example_runs(live):
    import subprocess
    import sys
    from pathlib import Path

    key = api_key(live)
    example = Path(__file__).resolve().parent.parent / "docs" / "examples" / "sdk_example.py"
    env = {"TOKENWARD_URL": live.url, "TOKENWARD_API_KEY": key["token"], "PATH": "/usr/bin"}
    if "PYTHONPATH" in os.environ:  # a checkout's code under test, not the installed one
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, str(example)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("DPoP call -> projects: shop") == 3
    assert "1 token request for 3 API calls" in result.stdout
    assert key["token"] not in result.stdout


async def test_api_key_bound_to_the_clients_key(live):
    from joserfc.jwk import ECKey

    key = api_key(live)
    client_key = ECKey.generate_key("P-256")
    live.admin.request("PUT", f"/v1/tokens/{key['id']}/dpop", json={"jkt": client_key.thumbprint()})
    stolen = TokenwardAuth(live.url, api_key=key["token"])
    with httpx.Client(auth=stolen) as http, pytest.raises(TokenwardAuthError) as info:
        http.get(live.url + "/v1/projects")
    assert info.value.code == "invalid_grant" and "dpop_required" in info.value.message
    owner = TokenwardAuth(live.url, api_key=key["token"], dpop=client_key)
    with httpx.Client(auth=owner) as http:
        assert http.get(live.url + "/v1/projects").status_code == 200


async def test_the_asked_lifetime_holds_for_refreshed_tokens_too(live):
    key = api_key(live)
    now = [time.time()]
    auth = TokenwardAuth(live.url, api_key=key["token"], lifetime=120, clock=lambda: now[0])
    lifetimes = []
    async with httpx.AsyncClient(auth=auth, base_url=live.url) as http:
        for _ in range(3):
            assert (await http.get("/v1/projects")).status_code == 200
            lifetimes.append(auth._refresh_at - now[0])
            now[0] += 120  # past the refresh point
    assert auth.token_requests == 3
    # Each token, the refreshed ones included, was asked for with 120 s (a default of 900
    # would put the refresh point far beyond 120 s).
    assert all(0 < left <= 120 for left in lifetimes), lifetimes


def test_one_auth_serves_several_event_loops(live):
    """An asyncio lock belongs to the loop that first waits on it: one auth object used by
    one ``asyncio.run`` after another must not carry a lock from a loop that is gone."""
    key = api_key(live)
    now = [time.time()]
    auth = TokenwardAuth(live.url, api_key=key["token"], lifetime=60, clock=lambda: now[0])

    async def burst() -> list[int]:
        async with httpx.AsyncClient(auth=auth, base_url=live.url) as http:
            responses = await asyncio.gather(*[http.get("/v1/projects") for _ in range(8)])
        return [r.status_code for r in responses]

    for _ in range(4):
        now[0] += 120  # every run starts with a refresh, with requests waiting on the lock
        assert asyncio.run(burst()) == [200] * 8
    assert auth.token_requests == 4
