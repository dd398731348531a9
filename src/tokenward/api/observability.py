"""``/metrics`` (the access log is written by the request-id middleware, api/middleware.py)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from tokenward.errors import NotFound

router = APIRouter()


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Prometheus text exposition, or OpenMetrics for a scraper that asks for it (Accept)."""
    services = request.app.state.services
    if services.metrics is None:
        raise NotFound("not_found", "metrics are disabled (TOKENWARD_METRICS_ENABLED)")
    body, content_type = services.metrics.render(request.headers.get("accept", ""))
    return Response(body, media_type=content_type)
