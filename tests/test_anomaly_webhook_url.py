# ruff: noqa: F811 (the fixtures of tests.test_dashboard are imported by name)
"""The alert webhook URL follows the rule of rotation webhooks (one validator): https, and
plain http to loopback only; on the API and in the dashboard."""

from __future__ import annotations

import pytest

from tests.test_dashboard import (  # noqa: F401 (fixtures)
    _quick_password_hashing,
    accounts,
    clock,
    dash,
    owner,
)

from .api.test_bad_input import assert_clean_error

REFUSED = [
    "http://169.254.169.254/latest",
    "http://10.0.0.5/hook",
    "http://hooks.example.com/tokenward",
    "ftp://hooks.example.com/x",
]
ACCEPTED = ["https://hooks.example.com/tokenward", "http://127.0.0.1:9000/hook"]


@pytest.mark.parametrize("url", REFUSED)
async def test_api_refuses_plain_http_to_other_hosts(api, url):
    response = await api.put("/v1/anomaly/settings", json={"webhook_url": url})
    body = assert_clean_error(response, 422)
    assert body["error"] == "invalid_settings"
    assert (await api.get("/v1/anomaly/settings")).json()["overrides"] == {}


async def test_api_accepts_https_and_loopback(api):
    for url in ACCEPTED:
        response = await api.put("/v1/anomaly/settings", json={"webhook_url": url})
        assert response.status_code == 200, response.text


async def test_dashboard_refuses_plain_http_to_other_hosts(dash, clock, accounts, services):
    p = await owner(dash, clock, accounts)
    await p.get("/dashboard/settings")
    for url in REFUSED[:3]:
        response = await p.post("/dashboard/settings/webhook", {"webhook_url": url})
        assert response.status_code == 422
        assert "https" in response.text
    stored, _ = await dash[1].alerts.get_settings("*")
    assert not stored.get("webhook_url")
    ok = await p.post("/dashboard/settings/webhook", {"webhook_url": ACCEPTED[0]})
    assert ok.status_code == 200 and "whsec_" in ok.text
