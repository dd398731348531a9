"""Liveness and readiness."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from tokenward.verify import bounded

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> JSONResponse:
    """The process is up (no dependency is checked)."""
    return JSONResponse({"status": "ok"})


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    """Ready only when the database (and Redis, where configured) answer."""
    services = request.app.state.services
    # Each check is given as long as a verification waits for the store: a dependency
    # that does not answer within it is reported unavailable (a hung database included).
    limit = services.verifier.store_timeout
    checks: dict[str, str] = {}
    checks["database"] = await _check(services.store.ping(), limit)
    if services.redis is not None:
        checks["redis"] = await _check(services.redis.ping(), limit)
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ok" if ready else "unavailable", "checks": checks}, 200 if ready else 503
    )


async def _check(ping: Awaitable[Any], limit: float | None) -> str:
    try:
        await bounded(ping, limit)
    except Exception:
        return "unavailable"
    return "ok"
