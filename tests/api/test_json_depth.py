"""Invariant 7 for nested JSON: every body is bounded in depth before any parser reads it."""

from __future__ import annotations

import pytest

from tests.api.test_bad_input import assert_clean_error
from tokenward.api.middleware import MAX_JSON_DEPTH, json_nests_deeper

JSON_TYPE = {"content-type": "application/json"}
FORM_TYPE = {"content-type": "application/x-www-form-urlencoded"}


def nested(levels: int, leaf: bytes = b"1") -> bytes:
    """``levels`` arrays and objects inside each other, as a value."""
    out = leaf
    for level in range(levels):
        out = b"[" + out + b"]" if level % 2 else b'{"k":' + out + b"}"
    return out


def body_with(levels: int) -> bytes:
    """A JSON object whose ``x`` field nests so that the whole body has ``levels`` levels."""
    return b'{"x":' + nested(levels - 1) + b"}"


ENDPOINTS = [
    ("POST", "/v1/token"),
    ("POST", "/v1/verify"),
    ("POST", "/v1/projects"),
    ("PATCH", "/v1/projects/app"),
    ("POST", "/v1/tokens"),
    ("PUT", "/v1/projects/app/policy"),
    ("POST", "/v1/projects/app/trust-policies"),
    ("POST", "/v1/alerts/alt_x/ack"),
    ("POST", "/v1/ip-blocks"),
    ("PUT", "/v1/anomaly/settings"),
    ("POST", "/oauth/introspect"),
    ("POST", "/oauth/revoke"),
]


@pytest.mark.parametrize(("method", "path"), ENDPOINTS)
@pytest.mark.parametrize("levels", [MAX_JSON_DEPTH + 1, 5000])
async def test_a_body_nested_too_deep_is_a_400_everywhere(api, method, path, levels):
    response = await api.request(method, path, content=body_with(levels), headers=JSON_TYPE)
    body = assert_clean_error(response, 400)
    assert body == {
        "error": "json_too_deep",
        "message": f"the JSON body nests deeper than {MAX_JSON_DEPTH} levels",
    }


@pytest.mark.parametrize("headers", [{}, {"content-type": "text/plain"}, FORM_TYPE])
async def test_verify_reads_json_whatever_its_declared_type_and_bounds_it_too(api, headers):
    response = await api.post("/v1/verify", content=b"[" * 3000 + b"]" * 3000, headers=headers)
    assert assert_clean_error(response, 400)["error"] == "json_too_deep"


async def test_a_body_without_content_type_is_bounded(api):
    """The framework reads such a body as JSON: the deep one never gets there."""
    response = await api.post("/v1/token", content=b"[" * 2000)
    assert assert_clean_error(response, 400)["error"] == "json_too_deep"


async def test_the_bound_itself_is_accepted(api):
    """Exactly ``MAX_JSON_DEPTH`` levels reach the route, which judges the content."""
    response = await api.post("/v1/projects", content=body_with(MAX_JSON_DEPTH), headers=JSON_TYPE)
    assert assert_clean_error(response, 422)["error"] != "json_too_deep"
    response = await api.post("/v1/verify", content=body_with(MAX_JSON_DEPTH), headers=JSON_TYPE)
    assert assert_clean_error(response)["error"] != "json_too_deep"


async def test_brackets_inside_strings_and_forms_are_data(api):
    text = '["\\"' + "[" * 200 + '"]'
    assert not json_nests_deeper(text.encode(), MAX_JSON_DEPTH)
    response = await api.post("/v1/projects", json={"name": "{[" * 200})
    assert assert_clean_error(response, 422)["error"] != "json_too_deep"
    # A form's brackets are its values, not structure: /v1/token judges them as parameters.
    form = b"grant_type=refresh_token&refresh_token=" + b"[" * 500
    response = await api.post("/v1/token", content=form, headers=FORM_TYPE)
    body = assert_clean_error(response, 400)
    assert body["error"] != "json_too_deep"
    # Same for a dashboard form.
    response = await api.post(
        "/dashboard/login", content=b"login=" + b"{" * 500 + b"&password=x", headers=FORM_TYPE
    )
    assert response.status_code < 500
    assert "json_too_deep" not in response.text


async def test_a_streamed_body_over_the_size_bound_is_a_413_before_any_route(api, services):
    limit = services.settings.max_body_bytes

    async def chunks():
        yield b'{"name": "'
        yield b"a" * limit
        yield b'"}'

    response = await api.post("/v1/projects", content=chunks(), headers=JSON_TYPE)
    assert assert_clean_error(response, 413)["error"] == "payload_too_large"


async def test_the_depth_bound_is_a_setting(services, admin):
    import httpx

    from tokenward.app import create_asgi

    services.settings = services.settings.model_copy(update={"max_json_depth": 4})
    app = create_asgi(services=services)
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 50000))
    async with httpx.AsyncClient(transport=transport, base_url="http://tokenward.test") as client:
        auth = {"Authorization": f"Bearer {admin.secret}", **JSON_TYPE}
        response = await client.post("/v1/projects", content=body_with(5), headers=auth)
        body = assert_clean_error(response, 400)
        assert body["message"] == "the JSON body nests deeper than 4 levels"
        response = await client.post("/v1/projects", content=body_with(4), headers=auth)
        assert assert_clean_error(response, 422)["error"] != "json_too_deep"


async def test_authz_judges_the_request_not_the_body_it_never_reads(api):
    """A proxy may send the original body along (Envoy's ``with_request_body``): it is the
    upstream's; /authz answers its decision as for any other request."""
    response = await api.post("/authz/records", content=b"[" * 3000, headers=JSON_TYPE)
    assert "json_too_deep" not in response.text
    assert response.status_code in (401, 403, 404), response.text
