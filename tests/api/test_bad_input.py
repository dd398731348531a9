"""Invariant 7: bad input anywhere gets a clear 4xx JSON error, never a 500 or a trace."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenward.tokens.format import generate_token

JSON_TYPE = {"content-type": "application/json"}
PRESENTED = generate_token("live")  # a token sent in bad requests: must never come back


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def assert_clean_error(response, *statuses: int) -> dict:
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    if statuses:
        assert response.status_code in statuses, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json"), response.text
    body = response.json()
    assert isinstance(body, dict), body
    assert isinstance(body.get("error"), str) and body["error"], body
    assert isinstance(body.get("message"), str) and body["message"], body
    text = response.text
    assert "Traceback" not in text and 'File "' not in text
    assert PRESENTED not in text and PRESENTED[8:-6] not in text
    return body


@pytest.fixture
async def setup(api):
    assert (await api.post("/v1/projects", json={"name": "app"})).status_code == 201
    created = await api.post("/v1/tokens", json={"project": "app", "scopes": ["records:read"]})
    assert created.status_code == 201
    return created.json()


GOOD_TOKEN = {"project": "app", "scopes": ["records:read"]}

BAD_TOKEN_BODIES = [
    # unknown fields
    {**GOOD_TOKEN, "colour": "red"},
    {**GOOD_TOKEN, "token": PRESENTED},
    {**GOOD_TOKEN, PRESENTED: 1},
    # wrong types
    {"project": "app", "scopes": "records:read"},
    {"project": "app", "scopes": [1]},
    {"project": 5, "scopes": ["records:read"]},
    {**GOOD_TOKEN, "uses": "ten"},
    {**GOOD_TOKEN, "uses": 0},
    {**GOOD_TOKEN, "uses": -1},
    {**GOOD_TOKEN, "uses": 10**12},
    {**GOOD_TOKEN, "uses": 1.5},
    {**GOOD_TOKEN, "ip_allowlist": "10.0.0.0/8"},
    {**GOOD_TOKEN, "metadata": ["a"]},
    {**GOOD_TOKEN, "metadata": {"k": 1}},
    {**GOOD_TOKEN, "environment": "prod"},
    {**GOOD_TOKEN, "kind": "refresh"},
    {**GOOD_TOKEN, "expires_at": "tomorrow"},
    {**GOOD_TOKEN, "expires_at": "2030-01-01T00:00:00"},  # naive
    {**GOOD_TOKEN, "expires_at": "2001-01-01T00:00:00Z"},  # past
    {**GOOD_TOKEN, "expires_at": "9999-12-31T23:59:59Z"},  # beyond any sane lifetime
    {**GOOD_TOKEN, "not_before": "0001-01-01T00:00:00+14:00"},  # before year 1 in UTC
    {**GOOD_TOKEN, "not_before": "9999-12-31T23:59:59-14:00"},  # after year 9999 in UTC
    {**GOOD_TOKEN, "ttl": "1h", "expires_at": "2099-01-01T00:00:00Z"},
    {"project": "app"},
    {"project": "app", "scopes": []},
    {"project": "app", "scopes": ["a:b"] * 65},
    # over-long strings
    {**GOOD_TOKEN, "name": "n" * 129},
    {**GOOD_TOKEN, "principal": "p" * 129},
    {"project": "p" * 65, "scopes": ["records:read"]},
    {**GOOD_TOKEN, "metadata": {"k" * 65: "v"}},
    {**GOOD_TOKEN, "metadata": {"k": "v" * 513}},
    {**GOOD_TOKEN, "metadata": {f"k{i}": "v" for i in range(33)}},
    # control characters PostgreSQL cannot store
    {**GOOD_TOKEN, "name": "a\x00b"},
    {**GOOD_TOKEN, "principal": "svc\x00"},
    {"project": "app\x00", "scopes": ["records:read"]},
    {**GOOD_TOKEN, "metadata": {"k\x00": "v"}},
    {**GOOD_TOKEN, "metadata": {"k": "v\x00"}},
    # bad durations
    {**GOOD_TOKEN, "ttl": "abc"},
    {**GOOD_TOKEN, "ttl": "0s"},
    {**GOOD_TOKEN, "ttl": "99999d"},
    {**GOOD_TOKEN, "ttl": 3600},
    {**GOOD_TOKEN, "ttl": "1h" * 40},
    # bad CIDRs
    {**GOOD_TOKEN, "ip_allowlist": ["10.0.0.0/33"]},
    {**GOOD_TOKEN, "ip_allowlist": ["not-an-ip"]},
    {**GOOD_TOKEN, "ip_allowlist": ["::1/129"]},
    {**GOOD_TOKEN, "ip_allowlist": [""]},
    {**GOOD_TOKEN, "ip_allowlist": [PRESENTED]},
    {**GOOD_TOKEN, "ip_allowlist": ["10.0.0.0/8"] * 101},
    # bad scopes
    {"project": "app", "scopes": ["records::read"]},
    {"project": "app", "scopes": ["a:b:c:d:e"]},
    {"project": "app", "scopes": [""]},
    {"project": "app", "scopes": ["x" * 129]},
    {"project": "app", "scopes": ["records:read\n"]},
    {"project": "app", "scopes": ["réad"]},
    {"project": "app", "scopes": [PRESENTED]},
    # bad rate strings
    {**GOOD_TOKEN, "rate_limit": "0/minute"},
    {**GOOD_TOKEN, "rate_limit": "abc"},
    {**GOOD_TOKEN, "rate_limit": "10/fortnight"},
    {**GOOD_TOKEN, "rate_limit": "10/0 minute"},
    {**GOOD_TOKEN, "rate_limit": "١٠/minute"},
    {**GOOD_TOKEN, "rate_limit": ["10/minute"]},
    {**GOOD_TOKEN, "rate_limit": PRESENTED},
    {**GOOD_TOKEN, "rate_limit": "1/minute;" * 30},
    # whole-body shapes
    [],
    [GOOD_TOKEN],
    "records:read",
    None,
    42,
]


async def test_bad_token_bodies(api, setup):
    for body in BAD_TOKEN_BODIES:
        response = await api.post("/v1/tokens", content=json.dumps(body), headers=JSON_TYPE)
        assert_clean_error(response, 400, 403, 404, 409, 422)
    listed = (await api.get("/v1/tokens", params={"project": "app"})).json()["tokens"]
    assert [t["id"] for t in listed] == [setup["id"]]  # none of them made a token


BAD_VERIFY_BODIES = [
    {"token": PRESENTED, "colour": "red"},
    {"token": PRESENTED, PRESENTED: "x"},
    {"token": 5},
    {"token": None},
    {"token": [PRESENTED]},
    {"token": PRESENTED, "scope": 5},
    {"token": PRESENTED, "ip": ["10.0.0.1"]},
    {"token": PRESENTED, "environment": "prod"},
    {"token": "x" * 4097},
    {"token": PRESENTED, "scope": "s" * 129},
    {"token": PRESENTED, "ip": "1" * 65},
    {"token": PRESENTED, "ip": "not-an-ip"},
    {"token": PRESENTED, "ip": "\u0000"},
    {"token": PRESENTED, "ip": "10.0.0.0/8"},
    {"token": PRESENTED, "project": "p" * 65},
    {"scope": "records:read"},
    {},
    [],
    [PRESENTED],
    PRESENTED,
    None,
]


async def test_bad_verify_bodies(api):
    for body in BAD_VERIFY_BODIES:
        response = await api.post("/v1/verify", content=json.dumps(body), headers=JSON_TYPE)
        assert_clean_error(response, 400, 422)


async def test_invalid_json_everywhere(api, setup):
    token_id = setup["id"]
    for path in (
        "/v1/projects",
        "/v1/tokens",
        "/v1/verify",
        f"/v1/tokens/{token_id}/revoke",
        f"/v1/tokens/{token_id}/rotate",
    ):
        for raw in (b"{", b'{"token": "' + PRESENTED.encode() + b'"', b"\xff\xfe", b"nul"):
            response = await api.post(path, content=raw, headers=JSON_TYPE)
            body = assert_clean_error(response, 400, 422)
            assert body["error"] in ("invalid_json", "invalid_request"), (path, body)


async def test_bad_project_bodies(api):
    for body in (
        {"name": "Shop"},
        {"name": ""},
        {"name": "-x"},
        {"name": "a" * 64},
        {"name": "a b"},
        {"name": "shop\n"},
        {"name": 5},
        {"name": "shop", "extra": 1},
        {},
        [],
        ["shop"],
    ):
        assert_clean_error(await api.post("/v1/projects", json=body), 400, 422)


async def test_bad_revoke_and_rotate_bodies(api, setup):
    token_id = setup["id"]
    for body in ({"reason": "r" * 201}, {"reason": 5}, {"why": "x"}, [], ["x"]):
        assert_clean_error(await api.post(f"/v1/tokens/{token_id}/revoke", json=body), 422)
    assert_clean_error(
        await api.post(f"/v1/tokens/{token_id}/revoke", json={"reason": "a\x00b"}), 422
    )
    for body in (
        {"grace": "forever"},
        {"grace": "31d"},
        {"grace": "-1h"},
        {"grace": 3600},
        {"grace": "1h", "extra": True},
        [],
    ):
        assert_clean_error(await api.post(f"/v1/tokens/{token_id}/rotate", json=body), 422)
    # Nothing above changed the token.
    shown = (await api.get(f"/v1/tokens/{token_id}")).json()
    assert shown["state"] == "active"


async def test_bad_query_and_path_parameters(api, setup):
    long_id = "tok_" + "x" * 200
    for response in [
        await api.get("/v1/tokens", params={"limit": "abc"}),
        await api.get("/v1/tokens", params={"limit": -1}),
        await api.get("/v1/tokens", params={"state": "zombie"}),
        await api.get("/v1/tokens", params={"cursor": "x" * 300}),
        await api.get("/v1/tokens", params={"cursor": "tok_\x00"}),
        await api.patch(f"/v1/tokens/{long_id}", json={"name": "x"}),
        await api.post(f"/v1/tokens/{long_id}/disable"),
        await api.get("/v1/tokens", params={"project": "p" * 65}),
        await api.get("/v1/tokens", params={"project": "app\x00"}),
        await api.get(f"/v1/tokens/{long_id}"),
        await api.get("/v1/tokens/tok_%00"),
        await api.post(f"/v1/tokens/{long_id}/revoke"),
        await api.post(f"/v1/tokens/{long_id}/rotate"),
        await api.post("/v1/tokens/tok_%00/revoke"),
        await api.post("/v1/tokens/tok_%00/rotate"),
        await api.get("/v1/projects/" + "p" * 200),
        await api.get("/v1/projects/app%00"),
        await api.get("/v1/tokens/tok_doesnotexist0000"),
    ]:
        assert_clean_error(response, 404, 422)


async def test_huge_bodies_are_refused_with_413(api, services):
    limit = services.settings.max_body_bytes
    huge = b'{"token": "' + b"a" * (limit + 10) + b'"}'
    for path in ("/v1/verify", "/v1/tokens", "/v1/projects", "/oauth/introspect"):
        response = await api.post(path, content=huge)
        body = assert_clean_error(response, 413)
        assert body["error"] == "payload_too_large"


async def test_unsupported_methods_and_unknown_routes(api, setup):
    token_id = setup["id"]
    for method, path in [
        ("DELETE", "/v1/tokens"),
        ("PUT", "/v1/projects"),
        ("GET", "/v1/verify"),
        ("PATCH", "/v1/tokens"),
        ("GET", f"/v1/tokens/{token_id}/disable"),
        ("DELETE", f"/v1/tokens/{token_id}"),
        ("GET", f"/v1/tokens/{token_id}/revoke"),
        ("GET", "/oauth/introspect"),
        ("POST", "/healthz"),
    ]:
        response = await api.request(method, path)
        assert_clean_error(response, 405)
    for path in ("/nope", "/v1", "/v1/tokenz", "/v2/tokens", f"/v1/tokens/{token_id}/extra"):
        body = assert_clean_error(await api.get(path), 404)
        assert body["error"] == "not_found"
    body = assert_clean_error(await api.get(f"/v1/{PRESENTED}"), 404)


AUTHORIZATIONS = [
    None,
    "",
    "Bearer",
    "Bearer ",
    "Basic dXNlcjpwYXNz",
    "bearer garbage",
    f"Token {PRESENTED}",
    f"Bearer {PRESENTED}",  # well formed, unknown
    "Bearer " + PRESENTED[:-1] + ("A" if PRESENTED[-1] != "A" else "B"),  # bad checksum
]


async def test_missing_or_invalid_authorization_is_401(api, setup, services):
    api.headers.pop("Authorization", None)
    # Every refusal here comes from one address: past the failed-credential limit it would be
    # 429 (tests/test_failed_credentials.py); this test is about the 401s before that.
    services.enforcement.failures.limit = ()
    for authorization in AUTHORIZATIONS:
        await _all_refuse(api, setup, authorization)


async def _all_refuse(api, setup, authorization) -> None:
    headers = {"Authorization": authorization} if authorization is not None else {}
    requests = [
        ("GET", "/v1/projects", None),
        ("POST", "/v1/projects", {"name": "x"}),
        ("GET", "/v1/projects/app", None),
        ("GET", "/v1/tokens", None),
        ("POST", "/v1/tokens", GOOD_TOKEN),
        ("GET", f"/v1/tokens/{setup['id']}", None),
        ("POST", f"/v1/tokens/{setup['id']}/revoke", {}),
        ("POST", f"/v1/tokens/{setup['id']}/rotate", {}),
        ("POST", "/v1/verify", {"token": PRESENTED}),
    ]
    for method, path, body in requests:
        response = await api.request(method, path, json=body, headers=headers)
        assert_clean_error(response, 401)
        assert response.headers["www-authenticate"].lower().startswith("bearer")
    response = await api.post("/oauth/introspect", data={"token": PRESENTED}, headers=headers)
    assert_clean_error(response, 401)
    assert "www-authenticate" in response.headers


# -- fuzz: hypothesis-generated JSON never produces a 5xx -----------------------------------
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=8,
)
interesting_text = st.one_of(
    st.text(max_size=40),
    st.sampled_from(
        [
            "records:read",
            "*",
            "1h",
            "0s",
            "10/minute",
            "10.0.0.0/8",
            "app",
            "live",
            "test",
            "canary",
            "2030-01-01T00:00:00Z",
            "0001-01-01T00:00:00+14:00",
            "9999-12-31T23:59:59-14:00",
            "a\x00b",
            PRESENTED,
        ]
    ),
)
field_value = st.one_of(json_values, interesting_text, st.lists(interesting_text, max_size=3))

TOKEN_FIELDS = [
    "project",
    "environment",
    "scopes",
    "name",
    "principal",
    "kind",
    "ttl",
    "expires_at",
    "not_before",
    "ip_allowlist",
    "rate_limit",
    "uses",
    "metadata",
    "unknown",
]
VERIFY_FIELDS = ["token", "scope", "ip", "project", "environment", "unknown"]


def collect(strategy, count: int) -> list:
    """Draw ``count`` examples from ``strategy`` (hypothesis runs outside the event loop)."""
    drawn: list = []

    @settings(
        max_examples=count,
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def draw(value) -> None:
        drawn.append(value)

    draw()
    return drawn


def bodies_for(fields: list[str]):
    objects = st.fixed_dictionaries({}, optional={f: field_value for f in fields})
    return st.one_of(objects, objects, objects, json_values)


async def test_fuzzed_token_bodies_never_5xx(api, setup):
    for body in collect(bodies_for(TOKEN_FIELDS), 150):
        response = await api.post("/v1/tokens", json=body)
        assert response.status_code < 500, (body, response.text)
        if response.status_code >= 400:
            assert_clean_error(response)


async def test_fuzzed_verify_bodies_never_5xx(api, setup):
    for body in collect(bodies_for(VERIFY_FIELDS), 150):
        response = await api.post("/v1/verify", json=body)
        assert response.status_code < 500, (body, response.text)
        if response.status_code >= 400:
            assert_clean_error(response)
        else:
            assert response.json()["valid"] is False


def test_what_the_server_cannot_parse_is_json_and_never_quoted(tmp_path):
    """Below the application: a malformed header line, with a token in it, on a real server."""
    import os
    import socket
    import subprocess

    from tests.conftest import serve_tokenward, tokenward_cmd

    env = {**os.environ, "TOKENWARD_DATA_DIR": str(tmp_path)}
    init = subprocess.run(
        tokenward_cmd("init", "--json"), env=env, capture_output=True, check=True, timeout=60
    )
    secret = json.loads(init.stdout)["admin_token"]
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115 (closed below)
    served = serve_tokenward(env=env, stderr=log)
    server, port = served.proc, served.port
    try:
        for bad in (f"Authorization: Bearer {secret}\x01", f"Content-Length: {secret}"):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
                conn.sendall(f"POST /v1/verify HTTP/1.1\r\nHost: x\r\n{bad}\r\n\r\n".encode())
                answer = b""
                while chunk := conn.recv(4096):
                    answer += chunk
            head, _, body = answer.decode("latin-1").partition("\r\n\r\n")
            assert head.startswith("HTTP/1.1 400") and "application/json" in head
            assert json.loads(body)["error"] == "bad_request"
            assert secret not in answer.decode("latin-1")
    finally:
        server.terminate()
        server.wait(10)
        log.close()
    assert secret not in (tmp_path / "server.log").read_text(errors="replace")


async def test_every_answer_has_its_request_id_and_the_security_headers(api, services):
    """Fast path, framework route, error, and a 413 given before any route is reached."""
    limit = services.settings.max_body_bytes
    answers = [
        await api.get("/healthz"),
        await api.get("/v1/projects"),
        await api.get("/nope"),
        await api.post("/v1/verify", content=b"{"),
        await api.post("/v1/tokens", content=b"x" * (limit + 1)),
    ]
    assert [r.status_code for r in answers] == [200, 200, 404, 400, 413]
    for r in answers:
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["x-frame-options"] == "DENY"
        assert r.headers["referrer-policy"] == "no-referrer"
        assert r.headers["x-request-id"].startswith("req_")


def test_an_oversized_request_head_is_refused_with_431(tmp_path):
    """uvicorn sets no bound on headers with httptools; the API port refuses more than
    ``MAX_HEAD_BYTES`` of request line and headers, sent at once or in pieces, and counts
    each request of a kept-alive connection on its own (bodies do not count)."""
    import os
    import socket
    import subprocess
    import time

    from tests.conftest import serve_tokenward, tokenward_cmd
    from tokenward.server import MAX_HEAD_BYTES

    def exchange(conn: socket.socket, *parts: bytes) -> bytes:
        for part in parts:
            conn.sendall(part)
            time.sleep(0.02)  # each part arrives on its own
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer) < answer.index(b"\r\n\r\n") + 4 + int(
            answer.split(b"content-length: ")[1].split(b"\r\n")[0]
        ):
            chunk = conn.recv(65536)
            if not chunk:
                break
            answer += chunk
        return answer

    env = {**os.environ, "TOKENWARD_DATA_DIR": str(tmp_path)}
    subprocess.run(tokenward_cmd("init", "--json"), env=env, capture_output=True, check=True)
    served = serve_tokenward(env=env)
    server, port = served.proc, served.port
    try:
        big = b"X-Padding: " + b"a" * MAX_HEAD_BYTES + b"\r\n"
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            answer = exchange(conn, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + big + b"\r\n")
        head, _, body = answer.decode("latin-1").partition("\r\n\r\n")
        assert head.startswith("HTTP/1.1 431") and "application/json" in head
        assert json.loads(body)["error"] == "headers_too_large"
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            pieces = [b"GET /healthz HTTP/1.1\r\nHost: x\r\n"] + [
                big[i : i + 4096] for i in range(0, len(big), 4096)
            ]
            assert exchange(conn, *pieces).startswith(b"HTTP/1.1 431")
        # Just under the bound, many times on one connection, then a body larger than it.
        ok = b"X-Padding: " + b"a" * (MAX_HEAD_BYTES // 2) + b"\r\n"
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
            for _ in range(4):
                answer = exchange(conn, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + ok + b"\r\n")
                assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
            payload = json.dumps({"token": "x" * (MAX_HEAD_BYTES * 2)}).encode()
            head = (
                b"POST /v1/verify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + b"Content-Length: "
                + str(len(payload)).encode()
                + b"\r\n\r\n"
            )
            # The body after its head, in pieces larger than the bound: bodies never count.
            cut = MAX_HEAD_BYTES + 10
            answer = exchange(conn, head + payload[:100], payload[100:cut], payload[cut:])
            assert not answer.startswith(b"HTTP/1.1 431"), answer[:200]
    finally:
        server.terminate()
        server.wait(10)


async def test_two_authorization_headers_are_refused_not_guessed_at(api, admin):
    """Servers differ on which of two credentials counts (first, last, both joined): the
    API refuses such a request on every route, the fast path included."""
    import httpx

    good = f"Bearer {admin.secret}"
    for method, path, body in (
        ("POST", "/v1/verify", {"token": "tw_live_x"}),
        ("GET", "/v1/projects", None),
        ("POST", "/oauth/introspect", None),
    ):
        for pair in ([good, "Bearer tw_live_other"], ["Bearer tw_live_other", good]):
            headers = httpx.Headers([("authorization", value) for value in pair])
            response = await api.request(method, path, json=body, headers=headers)
            assert response.status_code == 400, (path, response.text)
            assert response.json()["error"] == "invalid_request"
            assert "more than one Authorization" in response.json()["message"]
            assert admin.secret not in response.text
            assert response.headers["x-request-id"]
    assert (await api.get("/v1/projects")).status_code == 200  # one header: as always


async def test_verify_reads_json_whatever_its_declared_type_but_says_when_it_is_not(api):
    """``curl -d`` declares a form: a JSON body is read all the same. A body that is not
    JSON, declared as something else, is the wrong format (415); declared JSON, it is
    broken JSON (400)."""
    form = {"content-type": "application/x-www-form-urlencoded"}
    response = await api.post("/v1/verify", content=b'{"token": "tw_live_x"}', headers=form)
    assert response.status_code == 200 and response.json()["valid"] is False
    response = await api.post("/v1/verify", content=b"token=tw_live_x", headers=form)
    assert assert_clean_error(response, 415)["error"] == "unsupported_media_type"
    response = await api.post(
        "/v1/verify", content=b"token=tw_live_x", headers={"content-type": "application/json"}
    )
    assert assert_clean_error(response, 400)["error"] == "invalid_json"


async def test_digits_that_are_not_ascii_or_too_many_are_refused_not_a_500(api):
    """``"²".isdigit()`` is true in Python and ``int("²")`` raises: numbers are ASCII."""
    response = await api.post(
        "/v1/token",
        data={
            "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
            "subject_token_type": "urn:ietf:params:oauth:token-type:access_token",
            "subject_token": "tw_live_x",
            "expires_in": "²",
        },
    )
    assert response.status_code == 400 and response.json()["error"] == "invalid_request"
    for cursor in ("²", "1" * 40 + ".alt_x", "٣.alt_x"):
        response = await api.get("/v1/alerts", params={"cursor": cursor})
        assert_clean_error(response, 400, 422)
    for cursor in ("²", "9" * 19):
        response = await api.get("/v1/audit", params={"cursor": cursor})
        assert_clean_error(response, 400, 422)
