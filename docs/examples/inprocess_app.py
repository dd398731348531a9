"""Verify tokenward tokens inside your own app, without an HTTP hop.

Run it next to a tokenward data dir (same TOKENWARD_* settings as the server):

    TOKENWARD_DATA_DIR=.tokenward .venv/bin/uvicorn --app-dir docs/examples inprocess_app:app

then ``curl -H "Authorization: Bearer $T" http://127.0.0.1:8000/records``.
"""

import contextlib
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, FastAPI
from starlette.authentication import requires
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, Response

from tokenward.app import Services, open_services
from tokenward.integrations import Identity, TokenGuard, TokenwardBackend
from tokenward.settings import Settings


def build_app(services: Services | None = None) -> FastAPI:
    state: dict[str, Services] = {}

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        state["services"] = services or await open_services(Settings.load())
        yield
        if services is None:
            await state["services"].close()

    app = FastAPI(lifespan=lifespan)

    class LazyVerifier:
        """Resolves the verifier once the lifespan has opened the store."""

        def __getattr__(self, name: str) -> object:
            return getattr(state["services"].verifier, name)

    verifier = LazyVerifier()
    guard = TokenGuard(verifier)  # type: ignore[arg-type]

    # FastAPI style: a dependency per route, with the scope it needs.
    @app.get("/records")
    async def records(
        identity: Annotated[Identity, Depends(guard.require("records:read"))],
    ) -> dict[str, object]:
        return {"records": [], "principal": identity.principal, "project": identity.project}

    # Starlette style: AuthenticationMiddleware + @requires (wildcard scopes honoured).
    @requires("functions:invoke")
    async def invoke(request: Request) -> Response:
        return JSONResponse({"invoked": True, "by": request.user.display_name})

    def on_error(_conn: HTTPConnection, exc: Exception) -> Response:
        return JSONResponse(
            {"error": "invalid_token", "message": str(exc)},
            401,
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )

    app.add_route("/functions/invoke", invoke, methods=["POST"])
    app.add_middleware(
        AuthenticationMiddleware,
        backend=TokenwardBackend(verifier),  # type: ignore[arg-type]
        on_error=on_error,
    )
    return app


app = build_app()
