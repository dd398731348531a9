"""``/metrics`` (the access log is written by the request-id middleware, api/middleware.py)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from tokenward.errors import NotFound

router = APIRouter()

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    services = request.app.state.services
    if services.metrics is None:
        raise NotFound("not_found", "metrics are disabled (TOKENWARD_METRICS_ENABLED)")
    return Response(services.metrics.render(), media_type=CONTENT_TYPE)
