"""Client IP: the socket peer, or X-Forwarded-For only through trusted proxies."""

from __future__ import annotations

import pytest

from tokenward.clientip import ClientIPResolver, parse_cidrs

TRUSTED = ClientIPResolver(parse_cidrs("10.0.0.0/8, ::1"))


@pytest.mark.parametrize(
    ("resolver", "peer", "xff", "expected"),
    [
        (ClientIPResolver(), "203.0.113.5", ["1.2.3.4"], "203.0.113.5"),  # nothing trusted
        (TRUSTED, "203.0.113.5", ["1.2.3.4"], "203.0.113.5"),  # untrusted peer
        (TRUSTED, "10.0.0.1", ["1.2.3.4"], "1.2.3.4"),
        (TRUSTED, "10.0.0.1", ["6.6.6.6, 1.2.3.4, 10.0.0.2"], "1.2.3.4"),  # rightmost untrusted
        (TRUSTED, "10.0.0.1", ["6.6.6.6", "1.2.3.4"], "1.2.3.4"),  # several header lines
        (TRUSTED, "10.0.0.1", [], "10.0.0.1"),
        (TRUSTED, "10.0.0.1", ["10.0.0.3"], "10.0.0.3"),  # all trusted: the leftmost
        (TRUSTED, "10.0.0.1", ["1.2.3.4, garbage"], "10.0.0.1"),  # garbage stops the walk
        (TRUSTED, "::1", ["2001:db8::1"], "2001:db8::1"),
        (TRUSTED, "::ffff:10.0.0.1", ["1.2.3.4:5678"], "1.2.3.4"),
        (TRUSTED, "10.0.0.1", ["[2001:db8::2]:443"], "2001:db8::2"),
    ],
)
def test_resolve(resolver, peer, xff, expected):
    assert resolver.resolve(peer, xff) == expected


def test_bad_cidr_is_refused():
    with pytest.raises(ValueError, match="not an IPv4 or IPv6"):
        parse_cidrs("10.0.0.0/8, nope")


def test_settings_refuse_bad_trusted_proxies_and_failure_limit():
    from pydantic import ValidationError

    from tokenward.settings import Settings

    with pytest.raises(ValidationError):
        Settings(trusted_proxies="10.0.0.0/33")
    with pytest.raises(ValidationError):
        Settings(auth_failure_limit="lots")


async def test_admin_api_resolves_the_caller_ip_through_trusted_proxies(services, admin, api):
    from tokenward.service import TokenSpec

    await services.tokens.create_project(admin.record, "ops")
    walled = await services.tokens.create_token(
        admin.record,
        TokenSpec(project="ops", scopes=["admin:read", "verify"], ip_allowlist=["198.51.100.0/24"]),
    )
    headers = {"Authorization": f"Bearer {walled.secret}", "X-Forwarded-For": "198.51.100.4"}
    verify = {"token": walled.secret}
    # The peer (127.0.0.1) is not trusted: the header is ignored and the allowlist denies.
    assert (await api.get("/v1/projects", headers=headers)).status_code == 403
    services.settings = services.settings.model_copy(update={"trusted_proxies": "127.0.0.0/8"})
    assert (await api.get("/v1/projects", headers=headers)).status_code == 200
    r = await api.post("/v1/verify", headers=headers, json=verify)
    assert r.status_code == 200
    spoofed = {**headers, "X-Forwarded-For": "198.51.100.4, 203.0.113.1"}
    assert (await api.get("/v1/projects", headers=spoofed)).status_code == 403
