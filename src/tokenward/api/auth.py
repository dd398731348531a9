"""Admin credentials are tokens too: this checks one and the scope a call needs."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import Depends, Request

from tokenward.api.access import emit_access
from tokenward.clientip import resolver_for
from tokenward.errors import Forbidden, TooManyRequests, Unauthorized, Unavailable
from tokenward.failures import failures_of, too_many_failures
from tokenward.tokens.format import bearer_credential
from tokenward.tokens.model import Reason, TokenRecord
from tokenward.tokens.scopes import scopes_allow
from tokenward.verify import Decision, Verifier


def bearer_token(request: Request) -> str | None:
    """The credential in ``Authorization: Bearer …`` (never read from a URL)."""
    return bearer_credential(request.headers.get("authorization"))


def client_ip(request: Request) -> str | None:
    """The socket peer, or from X-Forwarded-For when the peer is a trusted proxy."""
    peer = request.client.host if request.client else None
    trusted = request.app.state.services.settings.trusted_proxies
    if not trusted:
        return peer
    return resolver_for(trusted).resolve(peer, request.headers.getlist("x-forwarded-for"))


async def refuse_failed_address(
    services: Any, ip: str | None, source: str, *, method: str, path: str
) -> None:
    """``429 too_many_failures`` for an address over the failed-credential limit, before any
    lookup (as at the gateway, see :mod:`tokenward.failures`), with its access event."""
    guard = failures_of(services)
    blocked = guard.blocked_for(ip) if guard is not None else None
    if blocked is None:
        return
    await emit_access(
        services,
        source,
        Decision(False, Reason.TOO_MANY_FAILURES),
        time.perf_counter(),
        credential=None,
        method=method,
        path=path,
        client_ip=ip,
    )
    raise too_many_failures(blocked)


async def authenticate_credential(
    services: Any,
    credential: str | None,
    ip: str | None,
    any_of: tuple[str, ...],
    *,
    method: str,
    path: str,
    audit_allowed: bool = True,
    dpop: Any = None,
) -> TokenRecord:
    """Verify a caller's credential and that it holds one of the scopes ``any_of``.

    Emits one ``admin_auth`` access event (for an allowed caller only when ``audit_allowed``:
    the verify API folds the caller into the event of the verification it asked for).
    """
    if credential is None:
        raise Unauthorized(
            "missing_credential", "send a credential as 'Authorization: Bearer <token>'"
        )
    verifier: Verifier = services.verifier
    started = time.perf_counter()
    await refuse_failed_address(services, ip, "admin_auth", method=method, path=path)
    decision = await verifier.verify(credential, ip=ip, dpop=dpop)
    record = decision.token
    held = record is not None and any(scopes_allow(record.scopes, s) for s in any_of)
    if decision.allowed and not held:
        decision = Decision(False, Reason.INSUFFICIENT_SCOPE, record)
    if audit_allowed or not decision.allowed:
        await emit_access(
            services,
            "admin_auth",
            decision,
            started,
            credential=credential,
            method=method,
            path=path,
            client_ip=ip,
        )
    if decision.allowed and record is not None:
        return record
    if decision.reason == Reason.UNAVAILABLE:
        raise Unavailable("unavailable", "a dependency is unavailable; access denied")
    if decision.reason == Reason.RATE_LIMITED:
        raise TooManyRequests("rate_limited", "the credential's rate limit is exhausted")
    if decision.reason == Reason.IP_NOT_ALLOWED:
        raise Forbidden("ip_not_allowed", "the credential may not be used from this address")
    if decision.reason == Reason.INSUFFICIENT_SCOPE:
        needed = " or ".join(any_of)
        refused = Forbidden("insufficient_scope", f"this call needs the scope {needed}")
        refused.scope = " ".join(any_of)  # the RFC 6750 challenge names it
        refused.caller = record  # authenticated, only short of the scope (see /oauth/revoke)
        raise refused
    if decision.reason in (Reason.DPOP_REQUIRED, Reason.INVALID_DPOP_PROOF):
        raise Unauthorized(decision.reason.value, "the credential needs a valid DPoP proof")
    raise Unauthorized("invalid_credential", f"the credential is not valid: {decision.reason}")


async def authenticate(request: Request, *any_of: str) -> TokenRecord:
    """Verify the request's credential and that it holds one of ``any_of``.

    ``Authorization: Bearer <token>``, or ``Authorization: DPoP <token>`` with a ``DPoP``
    proof header (RFC 9449).
    """
    credential = bearer_token(request)
    dpop = None
    if credential is None or "dpop" in request.headers:
        from tokenward.api.dpop import dpop_context

        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        credential = value.strip() or None if scheme.lower() in ("dpop", "bearer") else None
        dpop = dpop_context(request)
    record = await authenticate_credential(
        request.app.state.services,
        credential,
        client_ip(request),
        any_of,
        method=request.method,
        path=request.url.path,
        dpop=dpop,
    )
    request.state.actor = record
    return record


def require(*any_of: str) -> Callable[[Request], Awaitable[TokenRecord]]:
    async def dependency(request: Request) -> TokenRecord:
        return await authenticate(request, *any_of)

    return dependency


AdminRead = Annotated[TokenRecord, Depends(require("admin:read"))]
AdminWrite = Annotated[TokenRecord, Depends(require("admin:write"))]
Verifying = Annotated[TokenRecord, Depends(require("verify", "admin:read"))]
