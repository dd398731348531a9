"""Workload identity: CI jobs exchange OIDC ID tokens from a real local issuer."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from joserfc.jwk import ECKey, OctKey

from tokenward.oauth.exchange import GRANT_EXCHANGE, TYPE_ID_TOKEN
from tokenward.tokens.model import Reason


async def trust(api, issuer, project="shop", **fields):
    if (await api.get(f"/v1/projects/{project}")).status_code == 404:
        await api.post("/v1/projects", json={"name": project})
    body = {
        "name": "deploy",
        "issuer": issuer.url,
        "audience": "tokenward",
        "claims": {"repository": "acme/shop", "ref": "refs/heads/*"},
        "scopes": ["records:read", "records:write"],
        "max_ttl": "10m",
        "refresh_ttl": "1h",
        **fields,
    }
    response = await api.post(f"/v1/projects/{project}/trust-policies", json=body)
    assert response.status_code == 201, response.text
    return response.json()


async def ci_exchange(api, id_token, audience="shop", **form):
    """Exchange a CI identity token into the project ``audience`` names (None: none named)."""
    if audience is not None:
        form["audience"] = audience
    return await api.post(
        "/v1/token",
        data={
            "grant_type": GRANT_EXCHANGE,
            "subject_token_type": TYPE_ID_TOKEN,
            "subject_token": id_token,
            **form,
        },
    )


async def test_transcript_ci_identity_to_family_revoked(api, services, issuer, events, capsys):
    """CI identity → short-lived token → use → expiry → refresh → reuse → family revoked → alert."""
    say = print
    policy = await trust(api, issuer)
    say(f"trust policy {policy['id']}: {policy['issuer']} aud=tokenward claims={policy['claims']}")

    response = await ci_exchange(api, issuer.token(), scope="records:read")
    assert response.status_code == 200, response.text
    first = response.json()
    say(
        f"1 CI identity exchanged: token_type={first['token_type']} scope={first['scope']} "
        f"expires_in={first['expires_in']} refresh_token=yes token_id={first['token_id']}"
    )
    assert first["scope"] == "records:read" and first["expires_in"] <= 600

    verifier = services.verifier
    used = await verifier.verify(first["access_token"], scope="records:read")
    assert used.allowed
    say(f"2 use: verify records:read -> {used.reason.value} principal={used.token.principal}")
    assert used.token.principal == "repo:acme/shop:ref:refs/heads/main"
    assert used.token.metadata["oidc_repository"] == "acme/shop"

    now = verifier.clock()
    verifier.clock = lambda: now + timedelta(minutes=16)
    expired = await verifier.verify(first["access_token"], scope="records:read")
    assert expired.reason is Reason.EXPIRED
    say(f"3 16 minutes later: verify -> {expired.reason.value}")

    second = (
        await api.post(
            "/v1/token",
            data={"grant_type": "refresh_token", "refresh_token": first["refresh_token"]},
        )
    ).json()
    assert "access_token" in second, second
    assert (await verifier.verify(second["access_token"], scope="records:read")).allowed
    say(f"4 refresh: new access token {second['token_id']} valid, refresh token rotated")

    verifier.clock = lambda: now + timedelta(minutes=17)
    reuse = await api.post(
        "/v1/token", data={"grant_type": "refresh_token", "refresh_token": first["refresh_token"]}
    )
    assert reuse.status_code == 400
    say(
        f"5 old refresh token presented again -> {reuse.status_code} {reuse.json()['error']}: "
        f"{reuse.json()['message']}"
    )

    revoked = await verifier.verify(second["access_token"])
    assert revoked.reason is Reason.REVOKED
    after = await api.post(
        "/v1/token", data={"grant_type": "refresh_token", "refresh_token": second["refresh_token"]}
    )
    assert after.json()["error"] == "invalid_grant"
    say(
        f"6 family revoked: newest access token -> {revoked.reason.value}; newest refresh token "
        f"-> {after.json()['error']}"
    )

    [alert] = [e for e in events.security_events if e.kind == "refresh_token_reuse"]
    say(
        f"7 alert: security event {alert.kind} severity={alert.severity} "
        f"family={alert.evidence['family_id']} revoked={len(alert.evidence['revoked_token_ids'])}"
    )
    assert alert.severity == "critical" and alert.project_id == revoked.token.project_id
    out = capsys.readouterr().out
    assert first["access_token"] not in out and first["refresh_token"] not in out
    with capsys.disabled():
        print("\n" + out)


async def test_each_identity_token_is_accepted_once(api, issuer):
    await trust(api, issuer)
    token = issuer.token()
    assert (await ci_exchange(api, token)).status_code == 200
    replay = await ci_exchange(api, token)
    assert replay.status_code == 400 and "already used" in replay.json()["message"]


CLAIM_CASES = [
    ({"aud": "someone-else"}, "no trust policy matches"),
    ({"repository": "evil/shop"}, "no trust policy matches"),
    ({"ref": "refs/tags/v1"}, "no trust policy matches"),
    ({"repository": None}, "no trust policy matches"),
    ({"exp": int(time.time()) - 120}, "expired"),
    ({"exp": None}, "no expiry"),
    ({"exp": "soon"}, "not a number"),
    ({"nbf": int(time.time()) + 600}, "not valid yet"),
    ({"iat": int(time.time()) + 600}, "future"),
    ({"jti": None}, "no jti"),
    ({"iss": "https://unknown.example"}, "accepts identity tokens of this issuer"),
]


async def test_claims_are_checked_explicitly(api, issuer):
    await trust(api, issuer)
    for claims, message in CLAIM_CASES:
        response = await ci_exchange(api, issuer.token(**claims))
        assert response.status_code == 400, (claims, response.text)
        assert response.json()["error"] == "invalid_grant"
        assert message in response.json()["message"], (claims, response.text)


async def test_forged_and_malformed_tokens_are_refused(api, issuer):
    await trust(api, issuer)
    stranger = ECKey.generate_key("P-256", parameters={"kid": "k1"})
    forged = await ci_exchange(api, issuer.token(key=stranger))
    assert "signature" in forged.json()["message"]
    for junk in ("a.b.c", "x" * 20, issuer.token()[:-8] + "AAAAAAAA"):
        response = await ci_exchange(api, junk)
        assert response.status_code == 400 and response.json()["error"] == "invalid_grant"
    secret = OctKey.generate_key(256, parameters={"kid": "k1"})
    symmetric = await ci_exchange(api, issuer.token(key=secret, header={"alg": "HS256"}))
    assert symmetric.status_code == 400 and "asymmetric" in symmetric.json()["message"]


async def test_issuer_key_rotation_is_followed(api, services, issuer):
    await trust(api, issuer)
    assert (await ci_exchange(api, issuer.token())).status_code == 200
    fetches = services.sessions.identity.fetches
    assert (await ci_exchange(api, issuer.token())).status_code == 200
    assert services.sessions.identity.fetches == fetches  # cached
    issuer.rotate_keys()
    services.sessions.identity.refetch_interval = 0
    response = await ci_exchange(api, issuer.token())
    assert response.status_code == 200, response.text
    assert services.sessions.identity.fetches == fetches + 1


async def test_scope_and_lifetime_are_bounded_by_the_policy(api, issuer):
    await trust(api, issuer, refresh_ttl=None)
    wider = await ci_exchange(api, issuer.token(), scope="admin:write")
    assert wider.json()["error"] == "invalid_scope"
    longer = await ci_exchange(api, issuer.token(), expires_in="3000")
    assert longer.json()["error"] == "invalid_request"
    ok = (await ci_exchange(api, issuer.token())).json()
    assert ok["expires_in"] <= 600 and "refresh_token" not in ok


async def test_several_matching_policies_of_a_project_need_a_name(api, issuer):
    await trust(api, issuer)
    read_only = await trust(api, issuer, name="read-only", scopes=["records:read"])
    ambiguous = await ci_exchange(api, issuer.token())
    assert "several trust policies of this project" in ambiguous.json()["message"]
    assert "audience=shop/<trust policy>" in ambiguous.json()["message"]
    chosen = await ci_exchange(api, issuer.token(), audience="shop/read-only")
    assert chosen.status_code == 200 and chosen.json()["scope"] == "records:read"
    by_id = await ci_exchange(api, issuer.token(), audience=read_only["id"])
    assert by_id.status_code == 200 and by_id.json()["scope"] == "records:read"


@pytest.mark.parametrize("first", ["victim", "intruder"])
async def test_another_projects_trust_policy_never_interferes(api, services, issuer, first):
    """Tenant isolation: a project's admin trusting the very same identities (same issuer,
    audience and claims, or a ``*`` claim), created before or after, changes nothing for
    another project's exchanges, which only ever look at their own project's policies."""
    victim = {"project": "shop", "scopes": ["records:read"]}
    intruders = [
        {"project": "evil", "name": "deploy", "scopes": ["files:read"]},
        {"project": "evil", "name": "any", "claims": {"repository": "*"}, "scopes": ["x:y"]},
    ]
    order = [victim, *intruders] if first == "victim" else [*intruders, victim]
    for fields in order:
        await trust(api, issuer, **fields)
    for audience in ("shop", "shop/deploy"):
        response = await ci_exchange(api, issuer.token(), audience=audience)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["scope"] == "records:read"
        record = (await services.verifier.verify(body["access_token"])).token
        assert record.project == "shop"
    # Unnamed, the exchange is refused for want of a project, never judged against another
    # project's policies ("several trust policies match" was the finding).
    unnamed = (await ci_exchange(api, issuer.token(), audience=None)).json()
    assert unnamed["error"] == "invalid_request" and "several" not in unnamed["message"]
    # Another project's policy cannot be reached through this project's name.
    for audience in ("shop/any", "shop/nope"):
        response = await ci_exchange(api, issuer.token(), audience=audience)
        assert response.status_code == 400 and response.json()["error"] == "invalid_grant"
    # The other project gets its own tokens only when it is named (its admin's choice).
    theirs = await ci_exchange(api, issuer.token(), audience="evil/deploy")
    assert theirs.status_code == 200 and theirs.json()["scope"] == "files:read"


async def test_an_identity_exchange_names_its_project(api, issuer, events):
    await trust(api, issuer)
    for audience in (None, ""):
        unnamed = await ci_exchange(api, issuer.token(), audience=audience)
        assert unnamed.status_code == 400, unnamed.text
        assert unnamed.json()["error"] == "invalid_request"
        assert "name the project" in unnamed.json()["message"]
    for audience in ("shop/deploy/x", "shop/Deploy", "a b", "/deploy", "shop/"):
        bad = await ci_exchange(api, issuer.token(), audience=audience)
        assert bad.status_code == 400 and bad.json()["error"] == "invalid_request", audience
        assert "audience must be" in bad.json()["message"]
    # A project that does not exist and one without a policy for the issuer look the same.
    await api.post("/v1/projects", json={"name": "other"})
    answers = set()
    for audience in ("nowhere", "other", "trp_" + "A" * 16):
        response = await ci_exchange(api, issuer.token(), audience=audience)
        assert response.status_code == 400 and response.json()["error"] == "invalid_grant"
        answers.add(response.json()["message"])
    assert answers == {"no trust policy of this project accepts identity tokens of this issuer"}
    denied = [e for e in events.access_events if e.source == "token_endpoint"]
    assert denied and not any(e.decision.allowed for e in denied)


async def test_issuer_down_fails_closed(api, issuer):
    await trust(api, issuer)
    issuer.close()
    response = await ci_exchange(api, issuer.token())
    assert response.status_code == 503
    assert response.json()["error"] == "issuer_unavailable"


async def test_trust_policy_admin(api, issuer, services):
    policy = await trust(api, issuer)
    assert policy["scopes"] == ["records:read", "records:write"]
    listed = (await api.get("/v1/trust-policies", params={"project": "shop"})).json()
    assert [p["name"] for p in listed["trust_policies"]] == ["deploy"]
    dup = await api.post(
        "/v1/projects/shop/trust-policies",
        json={
            "name": "deploy",
            "issuer": issuer.url,
            "audience": "a",
            "claims": {"sub": "x"},
            "scopes": ["records:read"],
        },
    )
    assert dup.status_code == 409
    for bad in (
        {"issuer": "http://evil.example"},
        {"issuer": "ftp://x.example"},
        {"claims": {}},
        {"scopes": ["bad scope"]},
        {"max_ttl": "2d"},
    ):
        body = {
            "name": "x",
            "issuer": issuer.url,
            "audience": "a",
            "claims": {"sub": "x"},
            "scopes": ["records:read"],
            **bad,
        }
        response = await api.post("/v1/projects/shop/trust-policies", json=body)
        assert response.status_code == 422, (bad, response.text)
    assert (await api.delete("/v1/projects/shop/trust-policies/deploy")).status_code == 204
    assert (await api.delete("/v1/projects/shop/trust-policies/deploy")).status_code == 404
    assert (await ci_exchange(api, issuer.token())).json()["error"] == "invalid_grant"


async def test_trust_policy_cannot_grant_more_than_its_creator(api, services, issuer):
    await api.post("/v1/projects", json={"name": "shop"})
    limited = (
        await api.post(
            "/v1/tokens", json={"project": "shop", "scopes": ["admin:*", "records:read"]}
        )
    ).json()
    body = {
        "name": "x",
        "issuer": issuer.url,
        "audience": "a",
        "claims": {"sub": "x"},
        "scopes": ["records:write"],
    }
    response = await api.post(
        "/v1/projects/shop/trust-policies",
        json=body,
        headers={"Authorization": f"Bearer {limited['token']}"},
    )
    assert response.status_code == 403


async def test_identity_exchanges_are_audited(api, issuer, events):
    await trust(api, issuer)
    ok = (await ci_exchange(api, issuer.token())).json()
    bad = issuer.token(repository="evil/shop")
    await ci_exchange(api, bad)
    [allowed, denied] = [e for e in events.access_events if e.source == "token_endpoint"]
    assert allowed.decision.allowed and allowed.decision.token.id == ok["token_id"]
    assert not denied.decision.allowed and denied.fingerprint
    assert bad not in repr(denied)
