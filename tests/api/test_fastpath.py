"""The hot routes' own layer (api/fastpath.py) answers a fault as every other route does."""

from __future__ import annotations

import pytest

from tokenward.app import Services
from tokenward.service import Issued


class Boom(RuntimeError):
    pass


async def _boom(*args: object, **kwargs: object) -> None:
    raise Boom("a bug, not a bad input")


async def test_a_fault_in_verify_is_the_json_500_not_a_raised_error(
    api, services: Services, admin: Issued, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(services.verifier, "verify", _boom)
    r = await api.post("/v1/verify", json={"token": admin.secret})
    assert r.status_code == 500
    assert r.json() == {"error": "internal_error", "message": "an unexpected error occurred"}
    assert r.headers["x-request-id"].startswith("req_")
    assert "Boom" not in r.text and admin.secret not in r.text


async def test_a_fault_in_authz_is_the_json_500_not_a_raised_error(
    api, services: Services, admin: Issued, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert services.enforcement is not None
    monkeypatch.setattr(services.enforcement, "decide", _boom)
    r = await api.get(
        "/authz", headers={"X-Original-URI": "/records/1", "X-Original-Method": "GET"}
    )
    assert r.status_code == 500
    assert r.json()["error"] == "internal_error"
    assert r.headers["x-request-id"].startswith("req_")
