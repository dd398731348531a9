"""``/docs``: Swagger UI, served from this package under the dashboard's strict CSP.

FastAPI's own ``/docs`` and ``/redoc`` load their scripts from a public CDN with no CSP, on
the origin of the dashboard and its session cookie: a compromised or hijacked CDN could run
script there. Here every byte comes from the ``swagger-ui-py`` package (which ships Swagger
UI 5, Apache-2.0, its LICENSE next to the files) and this module; the page allows script,
style and connections to this origin only, and no frame may hold it. (Decision record:
docs/decisions/0028-api-docs-from-the-package.md.)
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, HTMLResponse, Response
from starlette.exceptions import HTTPException

from tokenward.dashboard.web import CSP

router = APIRouter(include_in_schema=False)

_ASSETS = {
    "swagger-ui.css": "text/css",
    "swagger-ui-bundle.js": "text/javascript",
    "favicon-32x32.png": "image/png",
    "LICENSE": "text/plain",
}

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>tokenward API</title>
<link rel="stylesheet" href="/docs/assets/swagger-ui.css">
<link rel="icon" type="image/png" href="/docs/assets/favicon-32x32.png">
</head>
<body>
<div id="swagger-ui"></div>
<script src="/docs/assets/swagger-ui-bundle.js"></script>
<script src="/docs/assets/docs.js"></script>
</body>
</html>
"""

#: the page's one script of its own (no inline script under the CSP)
_START = """window.addEventListener("load", function () {
  window.ui = SwaggerUIBundle({
    url: "/openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    persistAuthorization: false,
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout"
  });
});
"""

_HEADERS = {"Content-Security-Policy": CSP, "Cache-Control": "no-cache"}


@functools.cache
def _bundle() -> Path:
    """The package's static files, found without importing it (its adapters need nothing)."""
    spec = importlib.util.find_spec("swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("swagger-ui-py is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "static"


@router.get("/docs")
async def docs() -> HTMLResponse:
    return HTMLResponse(_PAGE, headers=_HEADERS)


@router.get("/docs/assets/{name}")
async def docs_asset(name: str) -> Response:
    if name == "docs.js":
        return Response(_START, media_type="text/javascript", headers=_HEADERS)
    if name not in _ASSETS:
        raise HTTPException(404)
    return FileResponse(_bundle() / name, media_type=_ASSETS[name], headers=_HEADERS)
