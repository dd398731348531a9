"""Whose word the ``ip`` of ``POST /v1/verify`` is, and what it may trigger (docs/anomaly.md).

The address a caller reports is its word about its own client. A project-bound caller's
reports count, and block, only in its project; a global caller's reports, and a caller's own
socket address, are the server's business and may block an address for everyone.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tokenward.app import Services, create_asgi
from tokenward.service import Issued
from tokenward.tokens.format import generate_token

ATTACKED = "198.51.100.9"


def _client(services: Services, credential: str, peer: str) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=create_asgi(services=services), client=(peer, 50000))
    return httpx.AsyncClient(
        transport=transport,
        base_url="http://tokenward.test",
        headers={"Authorization": f"Bearer {credential}"},
    )


@pytest.fixture
async def tenants(services: Services, admin: Issued) -> AsyncIterator[dict[str, Any]]:
    """Projects alpha and beta, alpha's verify credential, a key of each; brute force blocks."""
    async with _client(services, admin.secret, "127.0.0.1") as api:
        settings = {"brute_force": {"threshold": 3, "actions": ["alert", "block_ip"]}}
        assert (await api.put("/v1/anomaly/settings", json=settings)).status_code == 200
        made: dict[str, Any] = {"api": api}
        for project in ("alpha", "beta"):
            assert (await api.post("/v1/projects", json={"name": project})).status_code == 201
            key = await api.post("/v1/tokens", json={"project": project, "scopes": ["x:y"]})
            made[project] = key.json()["token"]
        checker = await api.post("/v1/tokens", json={"project": "alpha", "scopes": ["verify"]})
        made["alpha_verifier"] = checker.json()["token"]
        yield made


async def _verify(client: httpx.AsyncClient, token: str, ip: str) -> dict[str, Any]:
    response = await client.post("/v1/verify", json={"token": token, "ip": ip})
    assert response.status_code == 200, response.text
    return dict(response.json())


async def test_a_project_bound_callers_reports_block_only_in_its_project(
    services: Services, tenants: dict[str, Any]
) -> None:
    api = tenants["api"]
    async with _client(services, tenants["alpha_verifier"], "192.0.2.10") as alpha:
        for _ in range(3):
            assert (await _verify(alpha, generate_token("live"), ATTACKED))["reason"] == "unknown"
        # alpha refuses the address it reported ...
        assert (await _verify(alpha, tenants["alpha"], ATTACKED))["reason"] == "ip_blocked"
    # ... every other project, the gateway and a global caller do not
    assert (await _verify(api, tenants["beta"], ATTACKED))["valid"] is True
    assert (await services.verifier.verify(tenants["beta"], ip=ATTACKED)).allowed
    assert (await services.verifier.verify(tenants["alpha"], ip=ATTACKED, project=None)).allowed
    [block] = (await api.get("/v1/ip-blocks")).json()["blocks"]
    alpha_id = (await api.get("/v1/projects/alpha")).json()["id"]
    assert block["network"] == f"{ATTACKED}/32" and block["project_id"] == alpha_id
    [alert] = (await api.get("/v1/alerts", params={"detector": "brute_force"})).json()["alerts"]
    assert alert["project_id"] == alpha_id
    # a block made on one replica reaches the others: the scope is stored with it
    await services.anomaly.refresh_blocks()  # type: ignore[union-attr]
    assert (await services.verifier.verify(tenants["beta"], ip=ATTACKED)).allowed


async def test_a_global_callers_reports_block_for_everyone(
    services: Services, tenants: dict[str, Any]
) -> None:
    api = tenants["api"]
    for _ in range(3):
        await _verify(api, generate_token("live"), ATTACKED)
    assert (await _verify(api, tenants["beta"], ATTACKED))["reason"] == "ip_blocked"
    assert not (await services.verifier.verify(tenants["alpha"], ip=ATTACKED)).allowed
    [block] = (await api.get("/v1/ip-blocks")).json()["blocks"]
    assert block["project_id"] is None


async def test_a_callers_own_address_is_the_servers_observation(
    services: Services, tenants: dict[str, Any]
) -> None:
    peer = "192.0.2.77"
    async with _client(services, tenants["alpha_verifier"], peer) as alpha:
        for _ in range(3):
            await _verify(alpha, generate_token("live"), peer)
    assert not (await services.verifier.verify(tenants["beta"], ip=peer)).allowed


async def test_reports_of_several_projects_do_not_add_up(
    services: Services, tenants: dict[str, Any]
) -> None:
    api = tenants["api"]
    beta_checker = await api.post("/v1/tokens", json={"project": "beta", "scopes": ["verify"]})
    async with (
        _client(services, tenants["alpha_verifier"], "192.0.2.10") as alpha,
        _client(services, beta_checker.json()["token"], "192.0.2.11") as beta,
    ):
        for client in (alpha, beta, alpha, beta):
            await _verify(client, generate_token("live"), ATTACKED)
    assert (await api.get("/v1/ip-blocks")).json()["blocks"] == []
