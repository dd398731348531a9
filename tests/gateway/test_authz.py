"""``/authz``: the forward-auth decision endpoint, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import secrets

import httpx
import pytest

from tests.gateway.support import POLICY, make_token, use_policy
from tokenward.app import create_asgi
from tokenward.audit.query import AuditFilter, list_events
from tokenward.limits import RateLimiter

REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture
def policy_text(request):
    return POLICY.format(port=9, dead_port=9)


def nginx_headers(token: str | None, method: str = "GET", uri: str = "/records/1") -> dict:
    headers = {"X-Original-Method": method, "X-Original-URI": uri}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return headers


async def client_for(services, client=("127.0.0.1", 50000)) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=create_asgi(services=services), client=client)
    return httpx.AsyncClient(transport=transport, base_url="http://tokenward.test")


async def test_allowed_answers_200_with_identity_and_one_event(services, admin, policy_text):
    sink = use_policy(services, policy_text)
    issued = await make_token(services, admin, principal="storefront", rate_limit=["5/minute"])
    async with await client_for(services) as c:
        r = await c.get("/authz", headers=nginx_headers(issued.secret, uri="/records/7?x=1"))
    assert r.status_code == 200
    assert r.headers["x-tokenward-token-id"] == issued.record.id
    assert r.headers["x-tokenward-principal"] == "storefront"
    assert r.headers["x-tokenward-scopes"] == "records:read"
    assert r.headers["x-tokenward-project"] == "shop"
    assert r.headers["ratelimit-limit"] == "5" and r.headers["ratelimit-remaining"] == "4"
    assert int(r.headers["ratelimit-reset"]) >= 0
    [event] = sink.access_events
    assert event.source == "authz" and event.decision.allowed
    assert (event.method, event.path, event.client_ip) == ("GET", "/records/7", "127.0.0.1")
    assert event.scope == "records:read"


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda t: t[:-1] + ("A" if t[-1] != "A" else "B"), "bad_checksum"),
        (lambda t: "tw_live_" + "a" * 38, "bad_checksum"),
        (lambda t: "garbage", "malformed"),
    ],
)
async def test_bad_token_is_401_invalid_token(services, admin, policy_text, mutate, reason):
    sink = use_policy(services, policy_text)
    issued = await make_token(services, admin)
    async with await client_for(services) as c:
        r = await c.get("/authz", headers=nginx_headers(mutate(issued.secret)))
    assert r.status_code == 401
    assert r.json() == {
        "error": "invalid_token",
        "message": "the token is malformed",
        "reason": reason,
    }
    assert 'error="invalid_token"' in r.headers["www-authenticate"]
    assert issued.secret not in r.text
    assert len(sink.access_events) == 1 and sink.access_events[0].fingerprint


async def test_missing_revoked_scope_and_no_route(services, admin, policy_text):
    use_policy(services, policy_text)
    issued = await make_token(services, admin)
    async with await client_for(services) as c:
        r = await c.get("/authz", headers=nginx_headers(None))
        assert r.status_code == 401 and r.json()["error"] == "missing_credential"
        assert r.headers["www-authenticate"] == 'Bearer realm="tokenward"'
        r = await c.get("/authz", headers=nginx_headers(issued.secret, "POST", "/records/1"))
        assert r.status_code == 403 and r.json()["error"] == "insufficient_scope"
        assert 'error="insufficient_scope", scope="records:write"' in r.headers["www-authenticate"]
        r = await c.get("/authz", headers=nginx_headers(issued.secret, "GET", "/admin"))
        assert r.status_code == 403 and r.json()["error"] == "no_route"
        r = await c.get("/authz", headers=nginx_headers(issued.secret, "GET", "/records/../admin"))
        assert r.status_code == 403 and r.json()["error"] == "no_route"
        r = await c.get("/authz", headers=nginx_headers(issued.secret, "GET", "/authz-only/x"))
        assert r.status_code == 200
        await services.tokens.revoke_token(admin.record, issued.record.id, "leaked")
        r = await c.get("/authz", headers=nginx_headers(issued.secret))
        assert r.status_code == 401 and r.json()["reason"] == "revoked"


async def test_scope_from_path_name_project_and_environment(services, admin, policy_text):
    use_policy(services, policy_text)
    fn = await make_token(services, admin, scopes=["functions:invoke:send-email"])
    other = await make_token(services, admin, project="other")
    test_env = await make_token(services, admin, environment="test")
    async with await client_for(services) as c:
        h = nginx_headers(fn.secret, "POST", "/functions/send-email")
        assert (await c.get("/authz", headers=h)).status_code == 200
        h = nginx_headers(fn.secret, "POST", "/functions/delete-all")
        assert (await c.get("/authz", headers=h)).status_code == 403
        r = await c.get("/authz", headers=nginx_headers(other.secret, "GET", "/shop/x"))
        assert r.status_code == 403 and r.json()["error"] == "wrong_project"
        r = await c.get("/authz", headers=nginx_headers(test_env.secret, "DELETE", "/shop/x"))
        assert r.status_code == 403 and r.json()["error"] == "wrong_environment"


async def test_traefik_caddy_and_envoy_styles(services, admin, policy_text):
    use_policy(services, policy_text)
    issued = await make_token(services, admin, scopes=["records:*"])
    auth = {"Authorization": f"Bearer {issued.secret}"}
    async with await client_for(services) as c:
        traefik = {**auth, "X-Forwarded-Method": "POST", "X-Forwarded-Uri": "/records/9?a=b"}
        assert (await c.get("/authz", headers=traefik)).status_code == 200
        r = await c.get(
            "/authz",
            headers={**auth, "X-Forwarded-Method": "DELETE", "X-Forwarded-Uri": "/records/9"},
        )
        assert r.status_code == 403  # no DELETE route on /records
        assert (await c.post("/authz/records/9?q=1", headers=auth)).status_code == 200
        assert (await c.get("/authz/records/9", headers=auth)).status_code == 200
        assert (await c.delete("/authz/records/9", headers=auth)).status_code == 403
        r = await c.get("/authz", headers=auth)
        assert r.status_code == 400 and r.json()["error"] == "missing_original_uri"


async def test_both_header_pairs_naming_different_requests_are_refused(
    services, admin, policy_text
):
    """A proxy sets one pair; a client who adds the other must not pick what is checked."""
    use_policy(services, policy_text)
    issued = await make_token(services, admin, scopes=["records:read"])
    auth = {"Authorization": f"Bearer {issued.secret}"}
    async with await client_for(services) as c:
        spoofed = {
            **auth,
            "X-Forwarded-Method": "DELETE",
            "X-Forwarded-Uri": "/admin/everything",  # what the proxy will forward
            "X-Original-Method": "GET",
            "X-Original-URI": "/records/1",  # what the client wants checked instead
        }
        r = await c.get("/authz", headers=spoofed)
        assert r.status_code == 403 and r.json()["error"] == "ambiguous_request"
        assert r.headers["x-tokenward-error"] == "ambiguous_request"
        same = {**auth, "X-Forwarded-Uri": "/records/1", "X-Original-URI": "/records/1"}
        assert (await c.get("/authz", headers=same)).status_code == 200
        method_only = {**same, "X-Forwarded-Method": "DELETE", "X-Original-Method": "GET"}
        assert (await c.get("/authz", headers=method_only)).status_code == 403
    page = await list_events(services.engine, AuditFilter(reason="ambiguous_request"), limit=10)
    assert [e.values["decision"] for e in page.events] == ["deny", "deny"]  # audited


async def test_rate_limits_token_and_route_with_retry_after(services, admin, policy_text):
    use_policy(services, policy_text)
    issued = await make_token(services, admin, scopes=["functions:*"], rate_limit=["10/minute"])
    h = nginx_headers(issued.secret, "POST", "/functions/send")
    async with await client_for(services) as c:
        statuses = [(await c.get("/authz", headers=h)) for _ in range(3)]
    assert [r.status_code for r in statuses] == [200, 200, 429]
    last = statuses[-1]
    assert last.json()["error"] == "rate_limited"
    assert int(last.headers["retry-after"]) >= 1
    assert last.headers["ratelimit-limit"] == "2" and last.headers["ratelimit-remaining"] == "0"


async def test_failed_authentication_blocks_the_ip_before_lookup(services, admin, policy_text):
    sink = use_policy(services, policy_text, auth_failure_limit="3/minute")
    good = await make_token(services, admin)
    bad = good.secret[:-1] + ("A" if good.secret[-1] != "A" else "B")
    from tokenward.tokens.format import generate_token

    async with (
        await client_for(services) as c,
        await client_for(services, ("127.0.0.2", 1)) as other,
    ):
        for credential in (bad, generate_token("live"), "nonsense"):
            assert (await c.get("/authz", headers=nginx_headers(credential))).status_code == 401
        misses = services.verifier.misses
        r = await c.get("/authz", headers=nginx_headers(good.secret))
        assert r.status_code == 429 and r.json()["error"] == "too_many_failures"
        assert int(r.headers["retry-after"]) >= 1
        assert services.verifier.misses == misses  # no lookup happened
        assert (await other.get("/authz", headers=nginx_headers(good.secret))).status_code == 200
    assert len(sink.access_events) == 5


async def test_ip_allowlists_token_and_project(services, admin, policy_text, api):
    use_policy(services, policy_text)
    issued = await make_token(services, admin, ip_allowlist=["10.0.0.0/8", "2001:db8::/32"])
    plain = await make_token(services, admin)
    async with (
        await client_for(services, ("10.1.2.3", 1)) as inside,
        await client_for(services, ("192.0.2.1", 1)) as outside,
        await client_for(services, ("2001:db8::7", 1)) as v6,
    ):
        assert (await inside.get("/authz", headers=nginx_headers(issued.secret))).status_code == 200
        assert (await v6.get("/authz", headers=nginx_headers(issued.secret))).status_code == 200
        r = await outside.get("/authz", headers=nginx_headers(issued.secret))
        assert r.status_code == 403 and r.json()["error"] == "ip_not_allowed"
        assert (await outside.get("/authz", headers=nginx_headers(plain.secret))).status_code == 200
        # The project's own allowlist, set through the admin API, binds every token of it.
        r = await api.patch("/v1/projects/shop", json={"ip_allowlist": ["192.0.2.0/24"]})
        assert r.status_code == 200 and r.json()["ip_allowlist"] == ["192.0.2.0/24"]
        assert (await outside.get("/authz", headers=nginx_headers(plain.secret))).status_code == 200
        r = await inside.get("/authz", headers=nginx_headers(plain.secret))
        assert r.status_code == 403 and r.json()["error"] == "ip_not_allowed"
        # Token and project lists must both pass.
        r = await inside.get("/authz", headers=nginx_headers(issued.secret))
        assert r.status_code == 403
        r = await api.patch("/v1/projects/shop", json={"ip_allowlist": ["nope"]})
        assert r.status_code == 422 and r.json()["error"] == "invalid_cidr"
        r = await api.patch("/v1/projects/shop", json={"ip_allowlist": []})
        assert (await inside.get("/authz", headers=nginx_headers(plain.secret))).status_code == 200


async def test_x_forwarded_for_is_believed_only_from_trusted_proxies(services, admin, policy_text):
    use_policy(services, policy_text, trusted_proxies="127.0.0.0/8")
    issued = await make_token(services, admin, ip_allowlist=["198.51.100.0/24"])
    h = nginx_headers(issued.secret)
    async with (
        await client_for(services) as proxy,
        await client_for(services, ("203.0.113.9", 1)) as direct,
    ):
        ok = {**h, "X-Forwarded-For": "6.6.6.6, 198.51.100.4"}
        assert (await proxy.get("/authz", headers=ok)).status_code == 200
        spoof = {**h, "X-Forwarded-For": "198.51.100.4, 6.6.6.6"}
        assert (await proxy.get("/authz", headers=spoof)).status_code == 403
        assert (await direct.get("/authz", headers=ok)).status_code == 403


async def test_rate_limit_with_redis_is_shared_by_replicas(services, admin, policy_text):
    use_policy(services, policy_text)
    issued = await make_token(services, admin, scopes=["records:read"], rate_limit=["3/minute"])
    namespace = "tw-test-" + secrets.token_hex(6)
    await services.limiter.aclose()
    services.limiter = RateLimiter(REDIS_URL, namespace=namespace)
    services.verifier.limiter = services.limiter
    services.enforcement.limiter = services.limiter
    other_limiter = RateLimiter(REDIS_URL, namespace=namespace)  # a second replica's view
    try:
        async with await client_for(services) as c:
            codes = [
                (await c.get("/authz", headers=nginx_headers(issued.secret))).status_code
                for _ in range(2)
            ]
            hit = await other_limiter.hit(issued.record.id, ("3/minute",))
            assert hit.allowed and hit.remaining == 0
            codes.append((await c.get("/authz", headers=nginx_headers(issued.secret))).status_code)
    finally:
        await other_limiter.aclose()
    assert codes == [200, 200, 429]


async def test_unavailable_rate_limit_store_fails_closed(services, admin, policy_text):
    use_policy(services, policy_text)
    issued = await make_token(services, admin, rate_limit=["3/minute"])
    dead = services.verifier.limiter = RateLimiter("redis://127.0.0.1:9/0")
    try:
        async with await client_for(services) as c:
            r = await c.get("/authz", headers=nginx_headers(issued.secret))
    finally:
        await dead.aclose()
    assert r.status_code == 503 and r.json()["error"] == "unavailable"


async def test_remaining_uses_are_exact_across_replicas(services, admin, settings):
    from tokenward.app import open_services

    use_policy(services, POLICY.format(port=9, dead_port=9))
    issued = await make_token(services, admin, uses=12)
    replica = await open_services(settings)  # a second process's view of the same store
    try:
        use_policy(replica, POLICY.format(port=9, dead_port=9))
        async with await client_for(services) as a, await client_for(replica) as b:
            h = nginx_headers(issued.secret)
            responses = await asyncio.gather(
                *[(a if i % 2 else b).get("/authz", headers=h) for i in range(30)]
            )
    finally:
        await replica.close()
    codes = [r.status_code for r in responses]
    assert codes.count(200) == 12 and codes.count(401) == 18
    assert {r.json()["reason"] for r in responses if r.status_code == 401} == {"uses_exhausted"}


async def test_identity_headers_cannot_be_split(services, admin):
    use_policy(services, POLICY.format(port=9, dead_port=9))
    issued = await make_token(services, admin, principal="evil\r\nX-Admin: yes")
    async with await client_for(services) as c:
        r = await c.get("/authz", headers=nginx_headers(issued.secret))
    assert r.status_code == 200
    assert r.headers["x-tokenward-principal"] == "evilX-Admin: yes"
    assert "x-admin" not in r.headers


async def test_dpop_bound_token_needs_a_fresh_proof_for_this_url(services, admin, policy_text):
    from joserfc.jwk import ECKey

    from tokenward.oauth.dpop import make_proof

    use_policy(services, policy_text)
    key, thief = ECKey.generate_key("P-256"), ECKey.generate_key("P-256")
    issued = await make_token(services, admin, dpop_jkt=key.thumbprint())
    url = "https://api.shop.example/records/1"
    proxy = {
        "X-Original-Method": "GET",
        "X-Original-URI": "/records/1",
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "api.shop.example",
    }

    def proof(k, target=url):
        return make_proof(k, "GET", target, access_token=issued.secret)

    async with await client_for(services) as c:
        ok = await c.get(
            "/authz",
            headers={**proxy, "Authorization": f"DPoP {issued.secret}", "DPoP": proof(key)},
        )
        assert ok.status_code == 200, ok.text
        stolen = await c.get(
            "/authz", headers={**proxy, "Authorization": f"Bearer {issued.secret}"}
        )
        assert stolen.status_code == 401
        assert stolen.headers["x-tokenward-error"] in ("dpop_required", "invalid_token")
        forged = await c.get(
            "/authz",
            headers={**proxy, "Authorization": f"DPoP {issued.secret}", "DPoP": proof(thief)},
        )
        assert forged.status_code == 401
        elsewhere = await c.get(
            "/authz",
            headers={
                **proxy,
                "Authorization": f"DPoP {issued.secret}",
                "DPoP": proof(key, "https://api.shop.example/records/2"),
            },
        )
        assert elsewhere.status_code == 401


async def test_method_and_uri_are_chosen_per_field_and_every_source_must_agree(
    services, admin, policy_text
):
    """The method came from the /authz request line (GET) while the proxy said DELETE."""
    sink = use_policy(services, policy_text)
    issued = await make_token(services, admin, scopes=["records:*"])
    auth = {"Authorization": f"Bearer {issued.secret}"}
    uri = "/records/users/7"
    async with await client_for(services) as c:
        # X-Original-URI without a method, the method in X-Forwarded-Method: DELETE counts.
        r = await c.get(
            "/authz",
            headers={
                **auth,
                "X-Original-URI": uri,
                "X-Forwarded-Method": "DELETE",
                "X-Forwarded-Uri": uri,
            },
        )
        assert r.status_code == 403 and r.json()["error"] == "no_route"  # no DELETE route
        assert (sink.access_events[-1].method, sink.access_events[-1].path) == ("DELETE", uri)

        ambiguous = [
            # the nginx pair says GET, the Traefik/Caddy pair DELETE, for the same URI
            {"X-Original-Method": "GET", "X-Original-URI": uri, "X-Forwarded-Method": "DELETE"},
            # a method from one pair, the URI from the other, disagreeing on the method
            {"X-Original-Method": "GET", "X-Forwarded-Method": "DELETE", "X-Forwarded-Uri": uri},
            # the URIs disagree, no method at all
            {"X-Original-URI": uri, "X-Forwarded-Uri": "/records/users/8"},
        ]
        for headers in ambiguous:
            r = await c.get("/authz", headers={**auth, **headers})
            assert r.status_code == 403 and r.json()["error"] == "ambiguous_request", headers
        # Envoy: the request line below /authz is a source too.
        for method, headers in [
            ("DELETE", {"X-Forwarded-Method": "GET"}),
            ("DELETE", {"X-Original-Method": "GET"}),
            ("GET", {"X-Original-URI": "/records/users/8"}),
            ("GET", {"X-Forwarded-Uri": "/records/users/8"}),
        ]:
            r = await c.request(method, f"/authz{uri}", headers={**auth, **headers})
            assert r.status_code == 403 and r.json()["error"] == "ambiguous_request", headers
        agreeing = {
            "X-Original-Method": "get",
            "X-Original-URI": uri,
            "X-Forwarded-Method": "GET",
            "X-Forwarded-Uri": uri,
        }
        assert (await c.get("/authz", headers={**auth, **agreeing})).status_code == 200
        r = await c.get(f"/authz{uri}", headers={**auth, **agreeing})
        assert r.status_code == 200
        # Header names with underscores are other headers: tokenward does not read them.
        r = await c.get(
            "/authz", headers={**auth, "X-Original-URI": uri, "X_Original_Method": "DELETE"}
        )
        assert r.status_code == 200


async def test_a_repeated_original_request_header_must_repeat_its_value(
    services, admin, policy_text
):
    """Before, the last X-Original-URI won."""
    use_policy(services, policy_text)
    issued = await make_token(services, admin)
    auth = ("Authorization", f"Bearer {issued.secret}")
    async with await client_for(services) as c:
        for name, first, second in [
            ("X-Original-URI", "/records/1", "/admin"),
            ("X-Original-URI", "/admin", "/records/1"),
            ("X-Original-Method", "DELETE", "GET"),
            ("X-Forwarded-Uri", "/admin", "/records/1"),
            ("X-Forwarded-Method", "DELETE", "GET"),
        ]:
            pair = "X-Original-URI" if name.startswith("X-Original") else "X-Forwarded-Uri"
            headers = [auth, (name, first), (name, second)]
            if name != pair:
                headers.append((pair, "/records/1"))
            r = await c.get("/authz", headers=headers)
            assert r.status_code == 403 and r.json()["error"] == "ambiguous_request", name
        same = [auth, ("X-Original-URI", "/records/1"), ("X-Original-URI", "/records/1")]
        assert (await c.get("/authz", headers=same)).status_code == 200


async def test_raw_bytes_and_invalid_escapes_in_the_original_uri_match_no_route(
    services, admin, policy_text
):
    use_policy(services, policy_text)
    issued = await make_token(services, admin)
    async with await client_for(services) as c:
        for uri in (
            b"/records/users/\xff\xfe",
            b"/records/\xc0\xae\xc0\xae/admin",
            b"/records/\xc3\xa9",  # valid UTF-8, but raw: HTTP wants it percent-encoded
            b"/records/users/%zz",
            b"/records/users/%f",
        ):
            for header in (b"X-Original-URI", b"X-Forwarded-Uri"):
                headers = [(b"Authorization", f"Bearer {issued.secret}".encode()), (header, uri)]
                r = await c.get("/authz", headers=headers)
                assert r.status_code == 403 and r.json()["error"] == "no_route", uri
        r = await c.get("/authz", headers=nginx_headers(issued.secret, uri="/records/%C3%A9"))
        assert r.status_code == 200


async def test_more_than_one_authorization_header_is_refused(services, admin, policy_text):
    sink = use_policy(services, policy_text)
    issued = await make_token(services, admin)
    other = await make_token(services, admin, scopes=["records:*"])
    async with await client_for(services) as c:
        for values in ((issued.secret, other.secret), (issued.secret, issued.secret)):
            r = await c.get(
                "/authz",
                headers=[
                    ("X-Original-URI", "/records/1"),
                    *[("Authorization", f"Bearer {v}") for v in values],
                ],
            )
            assert r.status_code == 401  # nginx passes only 2xx, 401 and 403
            assert r.json()["error"] == "duplicate_authorization"
            assert "more than one Authorization header" in r.json()["message"]
            assert r.headers["x-tokenward-error"] == "duplicate_authorization"
            assert 'error="invalid_request"' in r.headers["www-authenticate"]
            assert "x-tokenward-principal" not in r.headers
            for secret in (issued.secret, other.secret):
                assert secret not in r.text and secret not in str(r.headers)
    assert [e.decision.allowed for e in sink.access_events] == [False, False]
    assert [e.decision.reason.value for e in sink.access_events] == ["malformed", "malformed"]
