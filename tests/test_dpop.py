"""DPoP (RFC 9449): a stolen sender-constrained token is useless without the private key."""

from __future__ import annotations

import secrets
import time
from datetime import UTC, datetime

import pytest
from joserfc.jwk import ECKey
from redis.asyncio import Redis

from tests.conftest import REDIS_URL
from tokenward.oauth.dpop import (
    DPoPChecker,
    DPoPError,
    DPoPRequest,
    RedisReplayCache,
    dpop_request,
    make_proof,
    normalize_htu,
)
from tokenward.oauth.exchange import GRANT_EXCHANGE, TYPE_ACCESS
from tokenward.tokens.model import Reason

TOKEN_URL = "http://tokenward.test/v1/token"
API_URL = "https://api.shop.example/records"


@pytest.fixture(scope="module")
def client_key():
    return ECKey.generate_key("P-256")


@pytest.fixture(scope="module")
def thief_key():
    return ECKey.generate_key("P-256")


async def bound_token(api, key):
    await api.post("/v1/projects", json={"name": "shop"})
    api_key = (
        await api.post("/v1/tokens", json={"project": "shop", "scopes": ["records:*"], "ttl": "1d"})
    ).json()
    response = await api.post(
        "/v1/token",
        data={
            "grant_type": GRANT_EXCHANGE,
            "subject_token_type": TYPE_ACCESS,
            "subject_token": api_key["token"],
        },
        headers={"DPoP": make_proof(key, "POST", TOKEN_URL)},
    )
    assert response.status_code == 200, response.text
    return response.json()


async def test_stolen_token_is_useless_without_the_private_key(
    api, services, client_key, thief_key
):
    body = await bound_token(api, client_key)
    token = body["access_token"]
    assert body["token_type"] == "DPoP"
    record = await services.store.get_token(body["token_id"])
    assert record.dpop_jkt == client_key.thumbprint()
    verify = services.verifier.verify

    def ctx(proof, method="GET", url=API_URL):
        return DPoPRequest(proof, method, url)

    async def attempt(label, proof, expected):
        decision = await verify(token, scope="records:read", dpop=proof)
        print(f"{label:<52} -> {decision.reason.value}")
        assert decision.reason is expected, label

    print()
    legit = make_proof(client_key, "GET", API_URL, access_token=token)
    await attempt("client: fresh proof by its key", ctx(legit), Reason.OK)
    # The thief has the token only.
    await attempt("thief: token alone (Bearer)", None, Reason.DPOP_REQUIRED)
    await attempt("thief: DPoP scheme, no proof", ctx(None), Reason.DPOP_REQUIRED)
    own_key = make_proof(thief_key, "GET", API_URL, access_token=token)
    await attempt("thief: proof signed by its own key", ctx(own_key), Reason.INVALID_DPOP_PROOF)
    # ... or also a proof it captured: replayed, or replayed against another URL.
    await attempt(
        "thief: replays the client's captured proof", ctx(legit), Reason.INVALID_DPOP_PROOF
    )
    other_url = make_proof(client_key, "GET", "https://api.shop.example/admin", access_token=token)
    await attempt(
        "thief: client's proof made for another URL", ctx(other_url), Reason.INVALID_DPOP_PROOF
    )
    other_method = make_proof(client_key, "DELETE", API_URL, access_token=token)
    await attempt(
        "thief: client's proof made for another method",
        ctx(other_method),
        Reason.INVALID_DPOP_PROOF,
    )
    other_token = make_proof(client_key, "GET", API_URL, access_token="tw_live_other")
    await attempt(
        "thief: client's proof made for another token", ctx(other_token), Reason.INVALID_DPOP_PROOF
    )
    stale = make_proof(client_key, "GET", API_URL, access_token=token, iat=time.time() - 600)
    await attempt(
        "thief: client's proof from 10 minutes ago", ctx(stale), Reason.INVALID_DPOP_PROOF
    )
    future = make_proof(client_key, "GET", API_URL, access_token=token, iat=time.time() + 600)
    await attempt("thief: proof dated 10 minutes ahead", ctx(future), Reason.INVALID_DPOP_PROOF)
    # And the legitimate client still works with a new proof.
    again = make_proof(client_key, "GET", API_URL, access_token=token)
    await attempt("client: next request, new proof", ctx(again), Reason.OK)


async def test_verify_api_checks_proofs(api, client_key, thief_key):
    token = (await bound_token(api, client_key))["access_token"]

    async def check(proof, url=API_URL):
        body = {"token": token, "dpop": proof, "method": "GET", "url": url}
        return (await api.post("/v1/verify", json=body)).json()

    good = make_proof(client_key, "GET", API_URL + "?page=2", access_token=token)
    assert (await check(good, API_URL + "?page=2"))["valid"]
    assert (await check(good))["reason"] == "invalid_dpop_proof"  # replay
    thief = make_proof(thief_key, "GET", API_URL, access_token=token)
    assert (await check(thief))["reason"] == "invalid_dpop_proof"
    plain = (await api.post("/v1/verify", json={"token": token})).json()
    assert plain["reason"] == "dpop_required"
    incomplete = await api.post("/v1/verify", json={"token": token, "dpop": good})
    assert incomplete.status_code == 422
    garbage = await check("not.a.proof")
    assert garbage["reason"] == "invalid_dpop_proof"
    introspected = await api.post("/oauth/introspect", data={"token": token})
    assert introspected.json()["cnf"] == {"jkt": client_key.thumbprint()}


async def test_bound_refresh_token_needs_the_key(api, client_key, thief_key):
    body = await bound_token(api, client_key)
    form = {"grant_type": "refresh_token", "refresh_token": body["refresh_token"]}
    stolen = await api.post("/v1/token", data=form)
    assert stolen.status_code == 400 and stolen.json()["error"] == "invalid_dpop_proof"
    thief = await api.post(
        "/v1/token", data=form, headers={"DPoP": make_proof(thief_key, "POST", TOKEN_URL)}
    )
    assert thief.json()["error"] == "invalid_dpop_proof"
    ok = await api.post(
        "/v1/token", data=form, headers={"DPoP": make_proof(client_key, "POST", TOKEN_URL)}
    )
    assert ok.status_code == 200 and ok.json()["token_type"] == "DPoP"


async def test_token_endpoint_rejects_bad_proofs(api, client_key):
    await api.post("/v1/projects", json={"name": "shop"})
    key = (await api.post("/v1/tokens", json={"project": "shop", "scopes": ["a:b"]})).json()
    form = {
        "grant_type": GRANT_EXCHANGE,
        "subject_token_type": TYPE_ACCESS,
        "subject_token": key["token"],
    }
    wrong_url = make_proof(client_key, "POST", "http://elsewhere.test/v1/token")
    response = await api.post("/v1/token", data=form, headers={"DPoP": wrong_url})
    assert response.status_code == 400 and response.json()["error"] == "invalid_dpop_proof"
    two = [("DPoP", make_proof(client_key, "POST", TOKEN_URL))] * 2
    response = await api.post("/v1/token", data=form, headers=two)
    assert response.json()["error"] == "invalid_dpop_proof"


async def test_project_can_require_dpop(api, client_key):
    await api.post("/v1/projects", json={"name": "shop"})
    await api.put("/v1/projects/shop/policy", json={"require_dpop": True})
    key = (await api.post("/v1/tokens", json={"project": "shop", "scopes": ["a:b"]})).json()
    form = {
        "grant_type": GRANT_EXCHANGE,
        "subject_token_type": TYPE_ACCESS,
        "subject_token": key["token"],
    }
    refused = await api.post("/v1/token", data=form)
    assert refused.status_code == 400 and refused.json()["error"] == "invalid_dpop_proof"
    bound = await api.post(
        "/v1/token", data=form, headers={"DPoP": make_proof(client_key, "POST", TOKEN_URL)}
    )
    assert bound.json()["token_type"] == "DPoP"


async def test_api_key_can_be_bound_to_a_key(api, services, client_key):
    await api.post("/v1/projects", json={"name": "shop"})
    key = (await api.post("/v1/tokens", json={"project": "shop", "scopes": ["a:b"]})).json()
    bound = await api.put(f"/v1/tokens/{key['id']}/dpop", json={"jkt": client_key.thumbprint()})
    assert bound.status_code == 200 and bound.json()["dpop_jkt"] == client_key.thumbprint()
    assert (await services.verifier.verify(key["token"])).reason is Reason.DPOP_REQUIRED
    proof = make_proof(client_key, "GET", API_URL, access_token=key["token"])
    assert (
        await services.verifier.verify(key["token"], dpop=DPoPRequest(proof, "GET", API_URL))
    ).allowed
    bad = await api.put(f"/v1/tokens/{key['id']}/dpop", json={"jkt": "short"})
    assert bad.status_code == 422


async def test_replay_cache_in_redis_is_shared_by_replicas(client_key):
    redis = Redis.from_url(REDIS_URL)
    prefix = f"tw-test-{secrets.token_hex(6)}:"
    try:
        replica_a = DPoPChecker(RedisReplayCache(redis, prefix))
        replica_b = DPoPChecker(RedisReplayCache(redis, prefix))
        proof = make_proof(client_key, "GET", API_URL)
        now = datetime.now(UTC)
        await replica_a.check(DPoPRequest(proof, "GET", API_URL), now=now)
        with pytest.raises(DPoPError, match="replay"):
            await replica_b.check(DPoPRequest(proof, "GET", API_URL), now=now)
        ttl = await redis.ttl(next(iter(await redis.keys(prefix + "*"))))
        assert 0 < ttl <= 70
    finally:
        for key in await redis.keys(prefix + "*"):
            await redis.delete(key)
        await redis.aclose()


async def test_replay_cache_down_fails_closed(client_key):
    redis = Redis.from_url("redis://127.0.0.1:9/0", socket_connect_timeout=0.2)
    try:
        checker = DPoPChecker(RedisReplayCache(redis, "x:"))
        proof = make_proof(client_key, "GET", API_URL)
        from tokenward.errors import Unavailable

        with pytest.raises(Unavailable):
            await checker.check(DPoPRequest(proof, "GET", API_URL), now=datetime.now(UTC))
    finally:
        await redis.aclose()


def test_request_helpers():
    assert normalize_htu("HTTPS://Api.Example:443/a?b=1#c") == "https://api.example/a"
    assert normalize_htu("http://h:8080") == "http://h:8080/"
    credential, ctx = dpop_request(
        {"authorization": "DPoP tw_live_x", "dpop": "p"}, "GET", "https://h/x"
    )
    assert credential == "tw_live_x" and ctx == DPoPRequest("p", "GET", "https://h/x")
    assert dpop_request({"authorization": "Bearer t"}, "GET", "u") == ("t", None)
    assert dpop_request({"authorization": "Basic t"}, "GET", "u")[0] is None


@pytest.mark.parametrize(
    "mutate",
    [
        lambda h, c: h.update(typ="JWT"),
        lambda h, c: h.update(alg="HS256"),
        lambda h, c: h.pop("jwk"),
        lambda h, c: c.pop("jti"),
        lambda h, c: c.update(jti="short"),
        lambda h, c: c.update(iat="now"),
    ],
)
async def test_malformed_proofs(client_key, mutate):
    import json

    from joserfc import jwt

    header = {"typ": "dpop+jwt", "alg": "ES256", "jwk": client_key.as_dict(private=False)}
    claims = {"jti": secrets.token_hex(8), "htm": "GET", "htu": API_URL, "iat": int(time.time())}
    mutate(header, claims)
    if header.get("alg") == "HS256":
        proof = ".".join(
            [
                _b64(json.dumps(header).encode()),
                _b64(json.dumps(claims).encode()),
                _b64(b"sig"),
            ]
        )
    else:
        proof = jwt.encode(header, claims, client_key)
    with pytest.raises(DPoPError) as info:
        await DPoPChecker().check(DPoPRequest(proof, "GET", API_URL), now=datetime.now(UTC))
    assert info.value.reason == "invalid_dpop_proof"


def _b64(data):
    import base64

    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


async def test_public_url_names_the_htu_behind_a_proxy(api, services, client_key):
    services.settings.public_url = "https://tokens.example.com/"
    try:
        await api.post("/v1/projects", json={"name": "shop"})
        key = (await api.post("/v1/tokens", json={"project": "shop", "scopes": ["a:b"]})).json()
        form = {
            "grant_type": GRANT_EXCHANGE,
            "subject_token_type": TYPE_ACCESS,
            "subject_token": key["token"],
        }
        internal = make_proof(client_key, "POST", TOKEN_URL)
        refused = await api.post("/v1/token", data=form, headers={"DPoP": internal})
        assert refused.json()["error"] == "invalid_dpop_proof"
        public = make_proof(client_key, "POST", "https://tokens.example.com/v1/token")
        ok = await api.post("/v1/token", data=form, headers={"DPoP": public})
        assert ok.status_code == 200 and ok.json()["token_type"] == "DPoP"
    finally:
        services.settings.public_url = None
