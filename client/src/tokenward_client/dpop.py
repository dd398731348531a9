"""DPoP proofs (RFC 9449) for :class:`~tokenward_client.TokenwardAuth` (``dpop=True``).

A proof is a JWT signed by a key of the client's: signing needs ``joserfc``, which is the
``dpop`` extra (``pip install 'tokenward-client[dpop]'``), not a dependency of the rest.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

NEEDS_JOSERFC = "DPoP needs joserfc: pip install 'tokenward-client[dpop]'"


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


def access_token_hash(token: str) -> str:
    """``ath``: base64url of the SHA-256 of the access token."""
    digest = hashlib.sha256(token.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def new_key() -> Any:
    """A fresh P-256 key (a joserfc ``ECKey``), held in memory only."""
    try:
        from joserfc.jwk import ECKey
    except ImportError:  # pragma: no cover - depends on the extra
        raise RuntimeError(NEEDS_JOSERFC) from None
    return ECKey.generate_key("P-256")


def make_proof(
    key: Any, method: str, url: str, *, access_token: str | None = None, iat: float | None = None
) -> str:
    """Sign a DPoP proof with ``key`` (a joserfc EC, RSA or OKP private key)."""
    try:
        from joserfc import jwt
    except ImportError:  # pragma: no cover - depends on the extra
        raise RuntimeError(NEEDS_JOSERFC) from None

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
    return str(jwt.encode(header, claims, key))
