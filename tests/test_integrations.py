"""The in-process integrations, through the runnable example in docs/examples."""

from __future__ import annotations

import importlib.util
import sys

import httpx

from tests.conftest import ROOT
from tokenward.service import TokenSpec


def load_example():
    path = ROOT / "docs" / "examples" / "inprocess_app.py"
    spec = importlib.util.spec_from_file_location("inprocess_app", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["inprocess_app"] = module
    spec.loader.exec_module(module)
    return module


async def test_fastapi_dependency_and_starlette_requires(services, admin):
    await services.tokens.create_project(admin.record, "app")
    reader = await services.tokens.create_token(
        admin.record, TokenSpec(project="app", scopes=["records:read"], principal="svc")
    )
    invoker = await services.tokens.create_token(
        admin.record, TokenSpec(project="app", scopes=["functions:*"])
    )
    app = load_example().build_app(services)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            ok = await client.get("/records", headers={"Authorization": f"Bearer {reader.secret}"})
            assert ok.status_code == 200 and ok.json()["principal"] == "svc"
            missing = await client.get("/records")
            assert missing.status_code == 401
            assert "Bearer" in missing.headers["www-authenticate"]
            wrong = await client.get(
                "/records", headers={"Authorization": f"Bearer {invoker.secret}"}
            )
            assert wrong.status_code == 403
            assert 'error="insufficient_scope"' in wrong.headers["www-authenticate"]
            # Starlette @requires with a wildcard scope on the token
            inv = await client.post(
                "/functions/invoke", headers={"Authorization": f"Bearer {invoker.secret}"}
            )
            assert inv.status_code == 200 and inv.json()["invoked"] is True
            denied = await client.post(
                "/functions/invoke", headers={"Authorization": f"Bearer {reader.secret}"}
            )
            assert denied.status_code == 403
            bad = await client.post(
                "/functions/invoke", headers={"Authorization": "Bearer tw_live_nope"}
            )
            assert bad.status_code == 401 and bad.json()["message"] == "malformed"
            await services.tokens.revoke_token(admin.record, reader.record.id, "test")
            gone = await client.get(
                "/records", headers={"Authorization": f"Bearer {reader.secret}"}
            )
            assert gone.status_code == 401, gone.text
            assert gone.json()["message"] == "revoked"  # the middleware answers first
