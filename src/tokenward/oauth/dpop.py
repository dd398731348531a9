"""Sender-constrained tokens: DPoP proofs (RFC 9449).

A DPoP-bound access token carries the RFC 7638 thumbprint of the client's public key
(``cnf.jkt``, stored as ``dpop_jkt``). Each request that presents it must carry a fresh proof:
a JWT signed by that key, with ``typ: dpop+jwt``, the public key in its header, and the claims
``htm`` (method), ``htu`` (URL without query), ``iat`` (within a skew bound), ``jti`` (used
once) and ``ath`` (hash of the access token). A stolen token without the private key is useless.

For callers of the verifier (verify API, ``/authz``, the gateway) the one function to use is
:func:`dpop_request`: it reads the credential and the proof from the request headers and
returns what :meth:`tokenward.verify.Verifier.verify` takes as ``dpop=``.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwk import JWKRegistry

from tokenward.errors import Unavailable

#: asymmetric algorithms only: a proof must be verifiable with the public key it carries
ALGORITHMS = ("ES256", "ES384", "ES512", "RS256", "RS384", "RS512", "PS256", "EdDSA")
MAX_PROOF_BYTES = 8192
DPOP_REQUIRED = "dpop_required"
INVALID_PROOF = "invalid_dpop_proof"


class DPoPError(Exception):
    """A proof is missing (``dpop_required``) or does not hold (``invalid_dpop_proof``)."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True, slots=True)
class DPoPRequest:
    """What a proof must match: the ``DPoP`` header of the request, its method and URL."""

    proof: str | None
    method: str
    url: str


def dpop_request(
    headers: Mapping[str, str], method: str, url: str
) -> tuple[str | None, DPoPRequest | None]:
    """The credential and DPoP context of a request (``Authorization: DPoP|Bearer …``).

    Returns ``(credential, context)``; ``context`` is ``None`` when the request carries no
    ``DPoP`` header and used the Bearer scheme. Pass both to ``Verifier.verify``.
    """
    header = headers.get("authorization") or ""
    scheme, _, value = header.partition(" ")
    credential = value.strip() or None
    proof = headers.get("dpop")
    if scheme.lower() not in ("bearer", "dpop"):
        credential = None
    if scheme.lower() == "dpop" or proof is not None:
        return credential, DPoPRequest(proof, method, url)
    return credential, None


def normalize_htu(url: str) -> str:
    """The URL as compared in ``htu``: no query or fragment, lower-case scheme and host."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    port = parts.port
    default = {"http": 80, "https": 443}.get(parts.scheme.lower())
    netloc = host if port in (None, default) else f"{host}:{port}"
    return urlunsplit((parts.scheme.lower(), netloc, parts.path or "/", "", ""))


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def access_token_hash(token: str) -> str:
    """``ath``: base64url of the SHA-256 of the access token."""
    return b64url(hashlib.sha256(token.encode()).digest())


class ReplayCache(Protocol):
    async def first_use(self, key: str, ttl: int) -> bool:
        """Record ``key`` for ``ttl`` seconds; whether it was not seen before."""


class MemoryReplayCache:
    """One process's replay cache (the embedded default)."""

    def __init__(self, max_entries: int = 200_000) -> None:
        self._seen: dict[str, float] = {}
        self.max_entries = max_entries

    async def first_use(self, key: str, ttl: int) -> bool:
        now = time.monotonic()
        if len(self._seen) >= self.max_entries:
            self._seen = {k: t for k, t in self._seen.items() if t > now}
            if len(self._seen) >= self.max_entries:
                # Full of live entries: refuse rather than forget (fail closed).
                raise Unavailable("replay_cache_full", "the DPoP replay cache is full")
        expires = self._seen.get(key)
        if expires is not None and expires > now:
            return False
        self._seen[key] = now + ttl
        return True


class RedisReplayCache:
    """Replay cache shared by every replica (``SET key NX EX ttl``)."""

    def __init__(self, redis: Any, prefix: str = "tokenward:dpop:") -> None:
        self.redis = redis
        self.prefix = prefix

    async def first_use(self, key: str, ttl: int) -> bool:
        try:
            return bool(await self.redis.set(self.prefix + key, b"1", nx=True, ex=ttl))
        except Exception as exc:  # connection lost, timeout: fail closed
            raise Unavailable("replay_cache_unavailable", "the DPoP replay cache is down") from exc


class DPoPChecker:
    """Checks proofs: signature by the embedded key, claims, freshness, single use."""

    def __init__(
        self, replay: ReplayCache | None = None, *, max_age: int = 60, skew: int = 5
    ) -> None:
        self.replay: ReplayCache = replay or MemoryReplayCache()
        self.max_age = max_age
        self.skew = skew

    async def check(
        self,
        request: DPoPRequest | None,
        *,
        now: datetime,
        access_token: str | None = None,
        expected_jkt: str | None = None,
    ) -> str:
        """The thumbprint of the proof's key; raises :class:`DPoPError` when it does not hold.

        ``access_token`` (when a token is presented with the proof) must match ``ath``;
        ``expected_jkt`` (the token's binding) must match the proof's key.
        """
        if request is None or not request.proof:
            raise DPoPError(DPOP_REQUIRED, "this token is DPoP-bound: send a DPoP proof")
        proof = request.proof
        if len(proof) > MAX_PROOF_BYTES or proof.count(".") != 2:
            raise DPoPError(INVALID_PROOF, "the DPoP proof is not a compact JWS")
        header, claims, jkt = _verify_signature(proof)
        if header.get("typ") != "dpop+jwt":
            raise DPoPError(INVALID_PROOF, "the DPoP proof's typ must be dpop+jwt")
        if expected_jkt is not None and jkt != expected_jkt:
            raise DPoPError(INVALID_PROOF, "the DPoP proof is signed by another key")
        jti = claims.get("jti")
        if not isinstance(jti, str) or not 8 <= len(jti) <= 256:
            raise DPoPError(INVALID_PROOF, "the DPoP proof needs a jti of 8 to 256 characters")
        if claims.get("htm") != request.method.upper():
            raise DPoPError(INVALID_PROOF, "the DPoP proof is for another HTTP method")
        htu = claims.get("htu")
        if not isinstance(htu, str) or normalize_htu(htu) != normalize_htu(request.url):
            raise DPoPError(INVALID_PROOF, "the DPoP proof is for another URL")
        iat = claims.get("iat")
        if not isinstance(iat, int | float) or isinstance(iat, bool):
            raise DPoPError(INVALID_PROOF, "the DPoP proof needs a numeric iat")
        age = now.timestamp() - float(iat)
        if age > self.max_age + self.skew or age < -self.skew:
            raise DPoPError(INVALID_PROOF, "the DPoP proof is not fresh (iat out of bounds)")
        if access_token is not None and claims.get("ath") != access_token_hash(access_token):
            raise DPoPError(INVALID_PROOF, "the DPoP proof's ath does not match the token")
        key = hashlib.sha256(f"{jkt}\x00{jti}".encode()).hexdigest()
        if not await self.replay.first_use(key, self.max_age + 2 * self.skew):
            raise DPoPError(INVALID_PROOF, "the DPoP proof was already used (replay)")
        return jkt


def _verify_signature(proof: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    try:
        obj = jws.extract_compact(proof.encode())
        header = dict(obj.protected)
        if header.get("alg") not in ALGORITHMS:
            raise DPoPError(INVALID_PROOF, "the DPoP proof must use an asymmetric algorithm")
        jwk = header.get("jwk")
        if not isinstance(jwk, dict) or "d" in jwk or jwk.get("kty") == "oct":
            raise DPoPError(INVALID_PROOF, "the DPoP proof needs a public jwk in its header")
        key, jkt = _public_key(json.dumps(jwk, sort_keys=True))
        jws.deserialize_compact(proof.encode(), key, algorithms=list(ALGORITHMS))
        claims = json.loads(obj.payload)
        if not isinstance(claims, dict):
            raise ValueError("claims are not an object")
        return header, claims, jkt
    except DPoPError:
        raise
    except (JoseError, ValueError, TypeError, KeyError):
        raise DPoPError(INVALID_PROOF, "the DPoP proof's signature does not verify") from None


@functools.lru_cache(maxsize=4096)
def _public_key(jwk_json: str) -> tuple[Any, str]:
    """A client's key and its thumbprint, parsed once (clients reuse one key for many proofs)."""
    key = JWKRegistry.import_key(json.loads(jwk_json))
    return key, key.thumbprint()


def make_proof(
    key: Any, method: str, url: str, *, access_token: str | None = None, iat: float | None = None
) -> str:
    """Sign a DPoP proof with ``key`` (a joserfc EC/RSA/OKP private key). Used by the SDK."""
    import secrets

    from joserfc import jwt

    claims: dict[str, Any] = {
        "jti": secrets.token_urlsafe(16),
        "htm": method.upper(),
        "htu": normalize_htu(url),
        "iat": int(time.time() if iat is None else iat),
    }
    if access_token is not None:
        claims["ath"] = access_token_hash(access_token)
    alg = {"EC": "ES256", "RSA": "PS256", "OKP": "EdDSA"}[key.key_type]
    header = {"typ": "dpop+jwt", "alg": alg, "jwk": key.as_dict(private=False)}
    return jwt.encode(header, claims, key)
