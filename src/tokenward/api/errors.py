"""Turn every failure into ``{"error": code, "message": text}`` with the right status.

Validation messages name the field and the rule, never the value given (it may be a secret).

Input is checked where it enters (schemas, query parameters, forms). As a safety net, a
database *data* error (SQLSTATE class 22: a character the database cannot store, a number
out of its range), which only a value from the request can cause, is answered 400
``invalid_request`` instead of 500; it is logged as one line without the statement or its
parameters (the engine hides parameters anyway).
"""

from __future__ import annotations

import re
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sqlalchemy.exc import DataError, StatementError
from starlette.exceptions import HTTPException as StarletteHTTPException

from tokenward.errors import TokenwardError

log = structlog.get_logger("tokenward.api")

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
}


#: Anything that looks like a token, even a damaged one, is cut out of error bodies
#: (a field *name* may be a pasted secret, and field names are echoed).
_TOKEN_LIKE = re.compile(r"tw_(?:live|test)_[0-9A-Za-z]*", re.IGNORECASE)


def redact(value: Any) -> Any:
    """``value`` with every token-like substring (keys included) cut out."""
    if isinstance(value, str):
        return _TOKEN_LIKE.sub("tw_…", value)
    if isinstance(value, dict):
        return {redact(k): redact(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    return value


def error_response(status: int, code: str, message: str, **extra: object) -> JSONResponse:
    headers = {"Cache-Control": "no-store"}
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="tokenward"'
    body = redact({"error": code, "message": message, **extra})
    return JSONResponse(body, status, headers=headers)


def is_data_error(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it wraps) is a database data error: SQLSTATE class 22, or
    a value the driver could not encode for the database."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, DataError | UnicodeEncodeError):
            return True
        sqlstate = getattr(current, "sqlstate", None)
        if isinstance(sqlstate, str) and sqlstate.startswith("22"):
            return True
        if isinstance(current, StatementError):
            pending.append(current.orig)
        pending.extend((current.__cause__, current.__context__))
    return False


DATA_ERROR_MESSAGE = "a value in the request cannot be stored (a character or number out of range)"


def _describe(errors: list[Any]) -> tuple[str, list[dict[str, str]]]:
    details = []
    for err in errors:
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path")]
        details.append({"field": ".".join(loc) or "body", "problem": str(err.get("msg", ""))})
    summary = "; ".join(f"{d['field']}: {d['problem']}" for d in details[:5])
    return summary, details


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(TokenwardError)
    async def _tokenward(_request: Request, exc: TokenwardError) -> JSONResponse:
        response = error_response(exc.status, exc.code, exc.message, **exc.extra)
        return response

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        if any(e.get("type") == "json_invalid" for e in errors):
            return error_response(400, "invalid_json", "the request body is not valid JSON")
        summary, details = _describe(errors)
        return error_response(422, "invalid_request", summary or "invalid request", details=details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "error")
        message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
        response = error_response(exc.status_code, code, message)
        if exc.headers:
            response.headers.update(exc.headers)
        return response

    @app.exception_handler(StatementError)
    async def _database(request: Request, exc: StatementError) -> Response:
        if not is_data_error(exc):
            raise exc  # a real fault: the generic handler below answers 500
        log.warning("database_data_error", path=request.url.path[:256])
        if request.url.path.startswith("/dashboard/"):
            from tokenward.dashboard.web import render

            return render(
                request, "error.html", 400, title="Not accepted", message=DATA_ERROR_MESSAGE + "."
            )
        return error_response(400, "invalid_request", DATA_ERROR_MESSAGE)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled_error", error_type=type(exc).__name__)
        return error_response(500, "internal_error", "an unexpected error occurred")
