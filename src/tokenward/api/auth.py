"""Admin credentials are tokens too: this checks one and the scope a call needs."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Request

from tokenward.api.access import record_access
from tokenward.errors import Forbidden, TooManyRequests, Unauthorized, Unavailable
from tokenward.tokens.model import Reason, TokenRecord
from tokenward.tokens.scopes import scopes_allow
from tokenward.verify import Verifier


def bearer_token(request: Request) -> str | None:
    """The credential in ``Authorization: Bearer …`` (never read from a URL)."""
    header = request.headers.get("authorization")
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return None
    return value.strip()


def client_ip(request: Request) -> str | None:
    return request.client.host if request.client else None


async def authenticate(request: Request, *any_of: str) -> TokenRecord:
    """Verify the caller's credential and that it holds one of the scopes ``any_of``."""
    services = request.app.state.services
    credential = bearer_token(request)
    dpop = None
    if credential is None or "dpop" in request.headers:
        # ``Authorization: DPoP <token>`` with a ``DPoP`` proof (RFC 9449)
        from tokenward.api.dpop import dpop_context

        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        credential = value.strip() or None if scheme.lower() in ("dpop", "bearer") else None
        dpop = dpop_context(request)
    if credential is None:
        raise Unauthorized(
            "missing_credential", "send a credential as 'Authorization: Bearer <token>'"
        )
    verifier: Verifier = services.verifier
    started = time.perf_counter()
    decision = await verifier.verify(credential, ip=client_ip(request), dpop=dpop)
    await record_access(request, "admin_auth", decision, started, credential=credential)
    if not decision.allowed:
        if decision.reason == Reason.UNAVAILABLE:
            raise Unavailable("unavailable", "a dependency is unavailable; access denied")
        if decision.reason == Reason.RATE_LIMITED:
            raise TooManyRequests("rate_limited", "the credential's rate limit is exhausted")
        if decision.reason == Reason.IP_NOT_ALLOWED:
            raise Forbidden("ip_not_allowed", "the credential may not be used from this address")
        if decision.reason in (Reason.DPOP_REQUIRED, Reason.INVALID_DPOP_PROOF):
            raise Unauthorized(decision.reason.value, "the credential needs a valid DPoP proof")
        raise Unauthorized("invalid_credential", f"the credential is not valid: {decision.reason}")
    record = decision.token
    assert record is not None
    if not any(scopes_allow(record.scopes, scope) for scope in any_of):
        raise Forbidden("insufficient_scope", f"this call needs the scope {' or '.join(any_of)}")
    request.state.actor = record
    return record


def require(*any_of: str) -> Callable[[Request], Awaitable[TokenRecord]]:
    async def dependency(request: Request) -> TokenRecord:
        return await authenticate(request, *any_of)

    return dependency


AdminRead = Annotated[TokenRecord, Depends(require("admin:read"))]
AdminWrite = Annotated[TokenRecord, Depends(require("admin:write"))]
Verifying = Annotated[TokenRecord, Depends(require("verify", "admin:read"))]
