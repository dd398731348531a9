"""The admin dashboard: server-rendered pages at ``/dashboard``, with MFA sign-in.

:func:`install` adds its routes, static files and error pages to the app; :func:`attach`
connects it to the open services (event bus, store). Web modules load only when the app is
built, so the CLI stays quick to start.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tokenward.dashboard import tables as tables  # the tables join the shared metadata

if TYPE_CHECKING:
    from fastapi import FastAPI

    from tokenward.dashboard.web import DashboardState

__all__ = ["attach", "install"]


def attach(app: FastAPI, services: Any) -> DashboardState:
    from tokenward.dashboard.web import attach as _attach

    return _attach(app, services)


def install(app: FastAPI) -> None:
    from fastapi import APIRouter, Request
    from fastapi.responses import Response
    from fastapi.staticfiles import StaticFiles

    from tokenward.dashboard import (
        routes_admin,
        routes_alerting,
        routes_auth,
        routes_identities,
        routes_tokens,
        routes_usage,
        routes_webhooks,
    )
    from tokenward.dashboard.web import HERE, PREFIX, PageError, Redirect, redirect, render

    router = APIRouter(prefix=PREFIX, include_in_schema=False)
    router.include_router(routes_auth.router)
    router.include_router(routes_tokens.router)
    router.include_router(routes_identities.router)
    router.include_router(routes_admin.router)
    router.include_router(routes_alerting.router)
    router.include_router(routes_usage.router)
    router.include_router(routes_webhooks.router)
    app.include_router(router)
    app.mount(PREFIX + "/static", StaticFiles(directory=HERE / "static"), name="dashboard-static")

    @app.exception_handler(Redirect)
    async def _redirect(_request: Request, exc: Redirect) -> Response:
        return redirect(exc.location)

    @app.exception_handler(PageError)
    async def _page_error(request: Request, exc: PageError) -> Response:
        return render(request, "error.html", exc.status, title=exc.title, message=exc.message)

    @app.get(PREFIX, include_in_schema=False)
    async def _root() -> Response:
        return redirect(PREFIX + "/")
