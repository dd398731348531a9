"""Turning a decision made for an HTTP request into exactly one access event."""

from __future__ import annotations

import time
from typing import Any

from starlette.requests import Request

from tokenward.events import AccessEvent, current_request, new_request_id
from tokenward.verify import Decision


async def record_access(
    request: Request,
    source: str,
    decision: Decision,
    started: float,
    *,
    credential: str | None,
    scope: str | None = None,
    method: str | None = None,
    path: str | None = None,
    client_ip: str | None = None,
) -> None:
    """Emit the event for ``decision`` (``started`` is a ``time.perf_counter()`` reading)."""
    await emit_access(
        request.app.state.services,
        source,
        decision,
        started,
        credential=credential,
        scope=scope,
        method=method or request.method,
        path=path or request.url.path,
        client_ip=client_ip,
    )


async def emit_access(
    services: Any,
    source: str,
    decision: Decision,
    started: float,
    *,
    credential: str | None,
    scope: str | None = None,
    method: str | None = None,
    path: str | None = None,
    client_ip: str | None = None,
    actor_id: str | None = None,
    ip_reported_by: str | None = None,
) -> None:
    """The same, for callers that have the services but no Starlette request."""
    ctx = current_request.get()
    fingerprint = None
    if decision.token is None and credential:
        fingerprint = services.hasher.fingerprint(credential)
    await services.events.access(
        AccessEvent(
            at=services.verifier.clock(),
            source=source,
            decision=decision,
            request_id=ctx.request_id if ctx else new_request_id(),
            client_ip=client_ip or (ctx.client_ip if ctx else None),
            user_agent=ctx.user_agent if ctx else None,
            method=method,
            path=path,
            scope=scope,
            latency_ms=(time.perf_counter() - started) * 1000,
            fingerprint=fingerprint,
            actor_id=actor_id,
            ip_reported_by=ip_reported_by,
        )
    )
