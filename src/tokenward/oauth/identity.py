"""Workload identity: a CI job's OIDC ID token, checked against the project's trust policies.

An admin registers a trust policy (issuer URL, audience, required claims such as the
repository and the ref). A CI job posts its ID token to the token endpoint; this module:

1. takes the project the tokens are for from the request's ``audience`` (RFC 8693 §2.1, the
   target service): ``shop``, ``shop/deploy`` (one of its trust policies) or a trust policy
   id. Required: only the policies of that one project are ever looked at, so no other
   project's policy can match, shadow or make ambiguous an exchange (tenant isolation); and
   reads the unverified ``iss`` only to find that project's policies of that issuer (none:
   refused, the same answer whether the project exists or not);
2. fetches the issuer's keys (discovery document → ``jwks_uri``), caches them, and refetches
   when a token names a key id it does not know (the issuer rotated its keys), at most once
   per ``refetch_interval`` so garbage cannot make it hammer the issuer;
3. verifies the signature (asymmetric algorithms only);
4. checks the claims explicitly — ``iss``, ``aud``, ``exp``, ``nbf``, ``iat`` — because
   joserfc's decode verifies the signature and nothing else;
5. picks the one policy of the project whose audience and required claims match (values
   may be glob patterns: ``refs/tags/v*``);
6. accepts each ``jti`` once (stored until the token expires).
"""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import ipaddress
import json
import re
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from tokenward.errors import BadRequest, Unavailable
from tokenward.oauth.store import SessionStore, TrustPolicy

#: C0 controls and DEL: no claim needs them, and PostgreSQL cannot store NUL.
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
#: The last second of year 9999: a later ``exp`` is no date.
_LATEST = 253_402_300_799
ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA")
MAX_ID_TOKEN_BYTES = 16_384


#: A trust policy's public id (``new_public_id("trp")``); a policy *name* is lower case.
_POLICY_ID = re.compile(r"^trp_[A-Za-z0-9]{16}$")
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_POLICY_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
TARGET_FORMS = "audience=<project>, <project>/<trust policy> or a trust policy id"


def invalid_grant(message: str) -> BadRequest:
    return BadRequest("invalid_grant", message, error_description=message)


def invalid_request(message: str) -> BadRequest:
    return BadRequest("invalid_request", message, error_description=message)


@dataclass(frozen=True, slots=True)
class Target:
    """Where an identity exchange asks for tokens: a project (by name), optionally one of its
    trust policies (by name); or one trust policy by its id, which implies its project."""

    project: str | None = None
    policy: str | None = None
    policy_id: str | None = None

    @classmethod
    def parse(cls, audience: str | None) -> Target:
        if not audience:
            raise invalid_request(
                "name the project the tokens are for: " + TARGET_FORMS + " (trust policies "
                "of other projects may match the same identity)"
            )
        if _POLICY_ID.match(audience):
            return cls(policy_id=audience)
        project, slash, policy = audience.partition("/")
        if not _NAME.match(project) or (slash and not _POLICY_NAME.match(policy)):
            raise invalid_request(f"audience must be {TARGET_FORMS.removeprefix('audience=')}")
        return cls(project=project, policy=policy or None)


def check_issuer_url(url: str) -> str:
    """An issuer must be https (plain http only on loopback, for development and tests)."""
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname or parts.query:
        raise ValueError("issuer must be an https URL without query")
    if parts.scheme == "http":
        try:
            loopback = ipaddress.ip_address(parts.hostname).is_loopback
        except ValueError:
            loopback = parts.hostname == "localhost"
        if not loopback:
            raise ValueError("issuer must use https (http is allowed on loopback only)")
    return url


def _has_control_characters(value: Any) -> bool:
    """Whether any string in ``value`` (keys included, at any depth) has a control character."""
    if isinstance(value, str):
        return _CONTROL.search(value) is not None
    if isinstance(value, dict):
        return any(
            _has_control_characters(k) or _has_control_characters(v) for k, v in value.items()
        )
    if isinstance(value, list):
        return any(_has_control_characters(v) for v in value)
    return False


def claim_matches(value: Any, pattern: str) -> bool:
    if isinstance(value, bool) or not isinstance(value, str | int):
        return False
    return fnmatch.fnmatchcase(str(value), pattern)


@dataclass(slots=True)
class _Keys:
    keys: KeySet
    kids: frozenset[str]
    fetched: float


class IdentityVerifier:
    def __init__(
        self,
        store: SessionStore,
        *,
        cache_ttl: float = 600.0,
        refetch_interval: float = 10.0,
        leeway: int = 30,
        timeout: float = 5.0,
    ) -> None:
        self.store = store
        self.cache_ttl = cache_ttl
        self.refetch_interval = refetch_interval
        self.leeway = leeway
        self.timeout = timeout
        self._keys: dict[str, _Keys] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.fetches = 0

    async def verify(
        self, id_token: str, now: datetime, audience: str | None
    ) -> tuple[TrustPolicy, dict[str, Any]]:
        """The matching trust policy of the project named by ``audience`` (see
        :class:`Target`) and the verified claims, or ``invalid_request`` / ``invalid_grant``."""
        if len(id_token) > MAX_ID_TOKEN_BYTES or id_token.count(".") != 2:
            raise invalid_grant("the identity token is not a compact JWT")
        try:
            unverified = jws.extract_compact(id_token.encode())
            header = dict(unverified.protected)
            claims = json.loads(unverified.payload)
        except (JoseError, ValueError, TypeError):
            raise invalid_grant("the identity token is not a compact JWT") from None
        if not isinstance(claims, dict) or not isinstance(claims.get("iss"), str):
            raise invalid_grant("the identity token has no issuer")
        if _has_control_characters(claims):
            raise invalid_grant("the identity token has control characters in its claims")
        if header.get("alg") not in ALGORITHMS:
            raise invalid_grant("the identity token must be signed with an asymmetric algorithm")
        target = Target.parse(audience)
        issuer: str = claims["iss"]
        policies = await self.store.trust_policies(
            issuer=issuer,
            project_name=target.project,
            name=target.policy,
            policy_id=target.policy_id,
        )
        if not policies:
            # The same answer whether the project exists or not: nothing about another
            # tenant is revealed.
            raise invalid_grant(
                "no trust policy of this project accepts identity tokens of this issuer"
            )
        keys = await self._keyset(issuer, header.get("kid"))
        try:
            jws.deserialize_compact(id_token.encode(), keys, algorithms=list(ALGORITHMS))
        except (JoseError, ValueError, TypeError):
            raise invalid_grant("the identity token's signature does not verify") from None
        self._check_times(claims, now)
        audiences = claims.get("aud")
        if isinstance(audiences, str):
            audiences = [audiences]
        if not isinstance(audiences, list):
            raise invalid_grant("the identity token has no audience")
        matching = [
            p
            for p in policies
            if p.audience in audiences
            and all(claim_matches(claims.get(k), v) for k, v in p.claims.items())
        ]
        if not matching:
            raise invalid_grant("no trust policy matches this identity (audience or claims)")
        if len(matching) > 1:  # all of one project: its admin's own ambiguity
            raise invalid_grant(
                "several trust policies of this project match this identity; name one with "
                f"audience={matching[0].project}/<trust policy>"
            )
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti:
            raise invalid_grant("the identity token has no jti")
        key = hashlib.sha256(f"{issuer}\x00{jti}".encode()).hexdigest()
        expires = datetime.fromtimestamp(float(claims["exp"]), now.tzinfo) + timedelta(
            seconds=self.leeway
        )
        if not await self.store.remember_jti(key, expires):
            raise invalid_grant("the identity token was already used")
        return matching[0], claims

    def _check_times(self, claims: dict[str, Any], now: datetime) -> None:
        t = now.timestamp()

        def number(name: str) -> float | None:
            value = claims.get(name)
            if value is None:
                return None
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise invalid_grant(f"the identity token's {name} is not a number")
            return float(value)

        exp = number("exp")
        if exp is None:
            raise invalid_grant("the identity token has no expiry (exp)")
        if exp > _LATEST:
            raise invalid_grant("the identity token's exp is out of range")
        if exp <= t - self.leeway:
            raise invalid_grant("the identity token has expired")
        nbf = number("nbf")
        if nbf is not None and nbf > t + self.leeway:
            raise invalid_grant("the identity token is not valid yet (nbf)")
        iat = number("iat")
        if iat is not None and iat > t + self.leeway:
            raise invalid_grant("the identity token was issued in the future (iat)")

    async def _keyset(self, issuer: str, kid: Any) -> KeySet:
        cached = self._keys.get(issuer)
        if cached is not None and self._fresh(cached, kid):
            return cached.keys
        lock = self._locks.setdefault(issuer, asyncio.Lock())
        async with lock:
            cached = self._keys.get(issuer)
            if cached is not None and self._fresh(cached, kid):
                return cached.keys
            if cached is not None and time.monotonic() - cached.fetched < self.refetch_interval:
                return cached.keys  # unknown kid, but we just fetched: do not hammer the issuer
            fetched = await self._fetch(issuer)
            self._keys[issuer] = fetched
            return fetched.keys

    def _fresh(self, cached: _Keys, kid: Any) -> bool:
        young = time.monotonic() - cached.fetched < self.cache_ttl
        return young and (kid is None or kid in cached.kids)

    async def _fetch(self, issuer: str) -> _Keys:
        self.fetches += 1
        try:
            async with httpx.AsyncClient(timeout=self.timeout, follow_redirects=False) as http:
                discovery = await http.get(issuer.rstrip("/") + "/.well-known/openid-configuration")
                discovery.raise_for_status()
                config = discovery.json()
                if config.get("issuer") != issuer or not isinstance(config.get("jwks_uri"), str):
                    raise ValueError("discovery document does not match the issuer")
                response = await http.get(config["jwks_uri"])
                response.raise_for_status()
                keys = KeySet.import_key_set(response.json())
        except (httpx.HTTPError, ValueError, TypeError, KeyError, JoseError) as exc:
            raise Unavailable(
                "issuer_unavailable", "the identity token's issuer keys could not be fetched"
            ) from exc
        kids = frozenset(str(k.kid) for k in keys.keys if k.kid)
        return _Keys(keys, kids, time.monotonic())
