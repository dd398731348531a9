"""``/metrics`` and the per-request access log (structured, with the request id)."""

from __future__ import annotations

import time

import structlog
from fastapi import APIRouter, Request, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenward.errors import NotFound
from tokenward.events import current_request

router = APIRouter()
log = structlog.get_logger("tokenward.access")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    services = request.app.state.services
    if services.metrics is None:
        raise NotFound("not_found", "metrics are disabled (TOKENWARD_METRICS_ENABLED)")
    return Response(services.metrics.render(), media_type=CONTENT_TYPE)


class AccessLogMiddleware:
    """One JSON log line per request; every line logged meanwhile carries the request id.

    Only the path is logged, never the query string or a header value: a credential is
    never read from a URL, and this keeps a mistaken client's secret out of the logs too.
    """

    def __init__(self, app: ASGIApp, enabled: bool = True) -> None:
        self.app = app
        self.enabled = enabled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        ctx = current_request.get()
        request_id = ctx.request_id if ctx else None
        tokens = structlog.contextvars.bind_contextvars(request_id=request_id)
        started = time.perf_counter()
        status = 500

        async def capture(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            if self.enabled and scope.get("path") not in ("/metrics", "/healthz"):
                log.info(
                    "request",
                    method=scope.get("method"),
                    path=str(scope.get("path", ""))[:256],
                    status=status,
                    duration_ms=round((time.perf_counter() - started) * 1000, 2),
                    client_ip=ctx.client_ip if ctx else None,
                )
            structlog.contextvars.reset_contextvars(**tokens)
