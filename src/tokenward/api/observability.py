"""``/metrics`` and the per-request access log (structured, with the request id)."""

from __future__ import annotations

import time

import structlog
from fastapi import APIRouter, Request, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenward.errors import NotFound
from tokenward.events import current_request
from tokenward.logs import access_log

router = APIRouter()

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    services = request.app.state.services
    if services.metrics is None:
        raise NotFound("not_found", "metrics are disabled (TOKENWARD_METRICS_ENABLED)")
    return Response(services.metrics.render(), media_type=CONTENT_TYPE)


class AccessLogMiddleware:
    """One JSON log line per request, with the request id the response carries.

    It wraps the whole server (the fast path too). Only the path is logged, never the query
    string or a header value: a credential is never read from a URL, and this keeps a
    mistaken client's secret out of the logs too.
    """

    def __init__(self, app: ASGIApp, enabled: bool = True) -> None:
        self.app = app
        self.enabled = enabled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or not self.enabled
            # Only once logging is set up (``tokenward serve``): embedded in someone else's
            # process, this app does not print a line per request on their stdout.
            or not structlog.is_configured()
            or scope.get("path") in ("/metrics", "/healthz")
        ):
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500
        ctx = current_request.get()  # set when the request-id middleware runs outside this one
        request_id = ctx.request_id if ctx is not None else None

        async def capture(message: Message) -> None:
            nonlocal status, request_id
            if message["type"] == "http.response.start":
                status = int(message["status"])
                for name, value in message.get("headers", []):
                    if name == b"x-request-id" and request_id is None:
                        request_id = value.decode("latin-1")
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            client = scope.get("client")
            access_log.request(
                request_id=request_id,
                method=scope.get("method"),
                path=str(scope.get("path", ""))[:256],
                status=status,
                duration_ms=round((time.perf_counter() - started) * 1000, 2),
                client_ip=client[0] if client else None,
            )
