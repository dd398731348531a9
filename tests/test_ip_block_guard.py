"""A manual IP block cannot lock everyone out: never-block networks, /0 and other very wide
networks, and the caller's own address are refused with 422."""

from __future__ import annotations

import httpx
import pytest

from tokenward.app import create_asgi

from .api.test_bad_input import assert_clean_error


@pytest.mark.parametrize(
    "network",
    [
        "127.0.0.1",
        "127.0.0.0/8",
        "126.0.0.0/7",  # wider than the floor, and covers loopback
        "::1",
        "0.0.0.0/0",
        "::/0",
        "10.0.0.0/7",
        "2001:db8::/31",
        "::ffff:127.0.0.1",
    ],
)
async def test_lockout_blocks_are_refused(api, network):
    response = await api.post("/v1/ip-blocks", json={"network": network, "seconds": 1})
    body = assert_clean_error(response, 422)
    assert body["error"] in (
        "network_never_blocked",
        "block_too_wide",
        "invalid_cidr",
    ), body
    assert (await api.get("/v1/ip-blocks")).json()["blocks"] == []
    assert (await api.get("/v1/projects")).status_code == 200  # nobody locked out


async def test_narrow_blocks_are_accepted(api):
    for network in ("10.9.0.0/16", "10.0.0.0/8", "2001:db8::/32", "192.0.2.7"):
        response = await api.post("/v1/ip-blocks", json={"network": network, "seconds": 60})
        assert response.status_code == 201, response.text
    assert len((await api.get("/v1/ip-blocks")).json()["blocks"]) == 4


async def test_the_callers_own_address_is_refused(services, admin):
    transport = httpx.ASGITransport(
        app=create_asgi(services=services), client=("198.51.100.7", 50000)
    )
    headers = {"Authorization": f"Bearer {admin.secret}"}
    async with httpx.AsyncClient(
        transport=transport, base_url="http://tokenward.test", headers=headers
    ) as remote:
        response = await remote.post("/v1/ip-blocks", json={"network": "198.51.100.0/24"})
        body = assert_clean_error(response, 422)
        assert body["error"] == "block_includes_caller"
        assert (await remote.get("/v1/projects")).status_code == 200


async def test_the_never_block_setting_is_what_is_protected(api, services):
    """``TOKENWARD_ANOMALY_NEVER_BLOCK`` fills the blocklist's never-block networks."""
    import ipaddress

    services.anomaly.blocklist.never_block = [ipaddress.ip_network("203.0.113.0/24")]
    refused = await api.post("/v1/ip-blocks", json={"network": "203.0.113.0/28"})
    assert assert_clean_error(refused, 422)["error"] == "network_never_blocked"
    allowed = await api.post("/v1/ip-blocks", json={"network": "127.0.0.2", "seconds": 1})
    assert allowed.status_code == 201
