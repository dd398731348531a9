"""What the API says about itself: /docs (no other origin, the dashboard's CSP), RFC 8414
metadata, RFC 6750 challenges, and the Allow of a 405."""

from __future__ import annotations

import re

from tests.api.test_admin_api import bearer, new_project, new_token
from tokenward.dashboard.web import CSP


async def test_the_docs_page_loads_nothing_from_another_origin_and_carries_the_csp(api):
    page = await api.get("/docs")
    assert page.status_code == 200 and page.headers["content-security-policy"] == CSP
    assert "'unsafe-inline'" not in CSP and "http" not in CSP
    assert "<script>" not in page.text and "style=" not in page.text  # nothing inline
    referenced = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert referenced and all(url.startswith("/docs/assets/") for url in referenced)
    for url in referenced:
        asset = await api.get(url)
        assert asset.status_code == 200, url
        assert asset.headers["content-security-policy"] == CSP
        assert b"//cdn." not in asset.content and b"unpkg.com" not in asset.content
    licence = await api.get("/docs/assets/LICENSE")
    assert licence.status_code == 200 and "Apache License" in licence.text
    assert (await api.get("/docs/assets/..%2Fapi%2Fdocs.py")).status_code == 404
    assert (await api.get("/docs/assets/index.html")).status_code == 404  # only what it uses
    for gone in ("/redoc", "/docs/oauth2-redirect"):
        assert (await api.get(gone)).status_code == 404  # FastAPI's CDN pages are off


async def test_authorization_server_metadata_names_what_exists(api):
    r = await api.get("/.well-known/oauth-authorization-server", headers={"Authorization": ""})
    assert r.status_code == 200
    meta = r.json()
    base = "http://tokenward.test"
    assert meta["issuer"] == base
    assert meta["token_endpoint"] == f"{base}/v1/token"
    assert meta["introspection_endpoint"] == f"{base}/oauth/introspect"
    assert meta["revocation_endpoint"] == f"{base}/oauth/revoke"
    assert meta["grant_types_supported"] == [
        "urn:ietf:params:oauth:grant-type:token-exchange",
        "refresh_token",
    ]
    assert meta["response_types_supported"] == []  # there is no authorization endpoint
    assert "client_secret_basic" in meta["introspection_endpoint_auth_methods_supported"]
    assert "none" in meta["revocation_endpoint_auth_methods_supported"]
    # Every endpoint it names answers (an OAuth error for an empty request, not a 404).
    for key in ("token_endpoint", "introspection_endpoint", "revocation_endpoint"):
        path = meta[key].removeprefix(base)
        answer = await api.post(path, headers={"Authorization": ""})
        assert answer.status_code in (400, 401), (path, answer.status_code)
        assert answer.json()["error"] in ("invalid_request", "missing_credential")


async def test_admin_challenges_carry_the_rfc6750_error(api):
    await new_project(api, "shop")
    reader = await new_token(api, project="shop", scopes=["admin:read"])

    missing = await api.get("/v1/projects", headers={"Authorization": ""})
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == 'Bearer realm="tokenward"'  # §3.1: no code

    for path, send in (("/v1/projects", api.get), ("/v1/verify", api.post)):  # fast path too
        bad = await send(path, headers=bearer("tw_live_" + "x" * 38))
        assert bad.status_code == 401
        assert bad.headers["www-authenticate"] == 'Bearer realm="tokenward", error="invalid_token"'

    short = await api.post("/v1/projects", json={"name": "other"}, headers=bearer(reader["token"]))
    assert short.status_code == 403 and short.json()["error"] == "insufficient_scope"
    assert short.headers["www-authenticate"] == (
        'Bearer realm="tokenward", error="insufficient_scope", scope="admin:write"'
    )

    two = await api.get(
        "/v1/projects",
        headers=[("Authorization", f"Bearer {reader['token']}"), ("Authorization", "Bearer x")],
    )
    assert two.status_code == 400 and two.json()["error"] == "invalid_request"
    assert two.headers["www-authenticate"] == 'Bearer realm="tokenward", error="invalid_request"'


async def test_a_405_names_every_method_of_its_path(api):
    for path, allowed in (
        ("/v1/projects", "GET, POST"),
        ("/v1/tokens/tok_x/rotation", "DELETE, GET, PUT"),
        ("/v1/verify", "POST"),
    ):
        r = await api.request("OPTIONS", path)
        assert r.status_code == 405 and r.headers["allow"] == allowed, path
        assert r.json()["error"] == "method_not_allowed"
