"""Turn every failure into ``{"error": code, "message": text}`` with the right status.

Validation messages name the field and the rule, never the value given (it may be a secret).

Input is checked where it enters (schemas, query parameters, forms). As a safety net, a
database *data* error (SQLSTATE class 22: a character the database cannot store, a number
out of its range), which only a value from the request can cause, is answered 400
``invalid_request`` instead of 500; it is logged as one line without the statement or its
parameters (the engine hides parameters anyway).

A database that cannot answer (refused or lost connection, a statement or pool wait that ran
out, a server shutting down) is answered ``503 unavailable`` with ``Retry-After``, logged as
one line naming the error type only. Any other unexpected error is answered with the JSON
500 by the handler itself: nothing is re-raised to the server (which would log a traceback
and may leave the connection unusable for the client's next request).
"""

from __future__ import annotations

import re
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sqlalchemy.exc import (
    DataError,
    DisconnectionError,
    InterfaceError,
    OperationalError,
    StatementError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from tokenward.errors import TokenwardError, TooManyRequests

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


#: RFC 6750's challenge of a malformed credential request (two Authorization headers: the
#: request layer refuses them, api/middleware.py)
INVALID_REQUEST_CHALLENGE = 'Bearer realm="tokenward", error="invalid_request"'


def challenge(status: int, code: str, scope: str | None = None) -> str | None:
    """The ``WWW-Authenticate`` challenge of an error answer (RFC 6750 §3), if any.

    No credential: the bare challenge (§3.1: no error code when none was presented). A
    credential that does not verify: ``invalid_token``. A valid one short of the scope:
    ``insufficient_scope`` with the scope needed. (A malformed credential request gets
    :data:`INVALID_REQUEST_CHALLENGE`.)
    """
    if status == 401:
        if code == "missing_credential":
            return 'Bearer realm="tokenward"'
        return 'Bearer realm="tokenward", error="invalid_token"'
    if status == 403 and code == "insufficient_scope":
        needed = f', scope="{scope}"' if scope else ""
        return f'Bearer realm="tokenward", error="insufficient_scope"{needed}'
    return None


def error_response(
    status: int, code: str, message: str, *, scope: str | None = None, **extra: object
) -> JSONResponse:
    headers = {"Cache-Control": "no-store"}
    value = challenge(status, code, scope)
    if value is not None:
        headers["WWW-Authenticate"] = value
    body = redact({"error": code, "message": message, **extra})
    return JSONResponse(body, status, headers=headers)


def refusal_in(exc: BaseException) -> TokenwardError | None:
    """The :class:`TokenwardError` a column's type raised while ``exc``'s statement was
    prepared (see ``tokenward.store.tables.TypedText``), if any."""
    for current in _chain(exc):
        if isinstance(current, TokenwardError):
            return current
    return None


def allowed_methods(request: Request) -> str:
    """Every method the routes of the request's path answer (the ``Allow`` of a 405): the
    framework's own 405 names only the methods of the first route of the path it found."""
    allowed = []
    for method in _METHODS:
        probe = {**request.scope, "method": method}
        if any(route.matches(probe)[0] == Match.FULL for route in request.app.router.routes):
            allowed.append(method)
    return ", ".join(allowed)


_METHODS = ("DELETE", "GET", "HEAD", "PATCH", "POST", "PUT")


def is_data_error(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it wraps) is a database data error: SQLSTATE class 22, or
    a value the driver could not encode for the database."""
    for current in _chain(exc):
        if isinstance(current, DataError | UnicodeEncodeError):
            return True
        sqlstate = getattr(current, "sqlstate", None)
        if isinstance(sqlstate, str) and sqlstate.startswith("22"):
            return True
    return False


#: SQLSTATE classes of a database that cannot serve now (not of a bad request): connection
#: exception, transaction rollback (serialization, deadlock), insufficient resources, object
#: not in prerequisite state (a database not accepting connections, a lock not available),
#: operator intervention (shutdown, statement cancelled), system error.
_UNAVAILABLE_SQLSTATES = ("08", "40", "53", "55", "57", "58")
_UNAVAILABLE_TYPES = (
    OperationalError,
    InterfaceError,
    DisconnectionError,
    PoolTimeout,
    TimeoutError,
    OSError,
)


#: SQLite's primary result codes of a database that cannot serve now: busy, locked, out of
#: memory, I/O error, disk full, cannot open, lock protocol. (SQLite reports a missing table
#: or a bad statement as an "operational" error too: those stay 500.)
_UNAVAILABLE_SQLITE_CODES = frozenset({5, 6, 7, 10, 13, 14, 15})


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and everything it wraps (the driver's error, causes, contexts)."""
    seen: set[int] = set()
    out: list[BaseException] = []
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        out.append(current)
        if isinstance(current, StatementError):
            pending.append(current.orig)
        pending.extend((current.__cause__, current.__context__))
    return out


def is_unavailable_error(exc: BaseException) -> bool:
    """Whether ``exc`` (or what it wraps) says the database cannot answer now: unreachable,
    connection lost, a wait that ran out, a server refusing or shutting down."""
    chain = _chain(exc)
    for current in chain:
        code = getattr(current, "sqlite_errorcode", None)
        if isinstance(code, int):  # SQLite says exactly what went wrong
            return code & 0xFF in _UNAVAILABLE_SQLITE_CODES
    for current in chain:
        if isinstance(current, _UNAVAILABLE_TYPES):
            return True
        if getattr(current, "connection_invalidated", False):
            return True
        sqlstate = getattr(current, "sqlstate", None)
        if isinstance(sqlstate, str) and sqlstate[:2] in _UNAVAILABLE_SQLSTATES:
            return True
    return False


#: Seconds a client is asked to wait before retrying after ``503 unavailable``.
RETRY_AFTER_SECONDS = 5
UNAVAILABLE_MESSAGE = "the database is unavailable; try again later"


DATA_ERROR_MESSAGE = "a value in the request cannot be stored (a character or number out of range)"


def _problem(err: Any) -> str:
    """A validation error in words: a pattern is named by its rule, never quoted."""
    if err.get("type") == "string_pattern_mismatch":
        from tokenward.api.schemas import PATTERN_WORDS

        pattern = str((err.get("ctx") or {}).get("pattern"))
        return "must be " + PATTERN_WORDS.get(pattern, "of the form the API documents")
    return str(err.get("msg", ""))


def _describe(errors: list[Any]) -> tuple[str, list[dict[str, str]]]:
    details = []
    for err in errors:
        loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path")]
        details.append({"field": ".".join(loc) or "body", "problem": _problem(err)})
    summary = "; ".join(f"{d['field']}: {d['problem']}" for d in details[:5])
    return summary, details


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(TokenwardError)
    async def _tokenward(request: Request, exc: TokenwardError) -> Response:
        if request.url.path.startswith("/dashboard/") and exc.status < 500:
            # A refusal a dashboard form did not show on its own page (a token in a note)
            from tokenward.dashboard.web import render

            message = exc.message[:1].upper() + exc.message[1:] + "."
            return render(request, "error.html", exc.status, title="Not accepted", message=message)
        response = error_response(
            exc.status, exc.code, exc.message, scope=getattr(exc, "scope", None), **exc.extra
        )
        if exc.status == 503:
            response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
        elif isinstance(exc, TooManyRequests) and exc.retry_after is not None:
            response.headers["Retry-After"] = str(exc.retry_after)
        return response

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        if any(e.get("type") == "json_invalid" for e in errors):
            return error_response(400, "invalid_json", "the request body is not valid JSON")
        summary, details = _describe(errors)
        return error_response(422, "invalid_request", summary or "invalid request", details=details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "error")
        message = exc.detail if isinstance(exc.detail, str) else code.replace("_", " ")
        response = error_response(exc.status_code, code, message)
        if exc.headers:
            response.headers.update(exc.headers)
        if exc.status_code == 405:
            response.headers["Allow"] = allowed_methods(request) or response.headers["Allow"]
        return response

    @app.exception_handler(StatementError)
    async def _database(request: Request, exc: StatementError) -> Response:
        refused = refusal_in(exc)
        if refused is not None:  # a column refused a value (a token in a text field)
            return await _tokenward(request, refused)
        if not is_data_error(exc):
            return _fault(request, exc)
        log.warning("database_data_error", path=request.url.path[:256])
        if request.url.path.startswith("/dashboard/"):
            from tokenward.dashboard.web import render

            return render(
                request, "error.html", 400, title="Not accepted", message=DATA_ERROR_MESSAGE + "."
            )
        return error_response(400, "invalid_request", DATA_ERROR_MESSAGE)

    @app.exception_handler(Exception)  # answered, then raised again: see middleware.py
    async def _unexpected(request: Request, exc: Exception) -> Response:
        return _fault(request, exc)


def _fault(request: Request, exc: BaseException) -> Response:
    """The answer to an exception nobody handled: 503 when the database cannot answer, the
    JSON 500 otherwise. One log line, with the error's type and no SQL."""
    path = request.url.path[:256]
    if is_unavailable_error(exc):
        log.warning("database_unavailable", path=path, error_type=type(exc).__name__)
        if path.startswith("/dashboard/"):
            from tokenward.dashboard.web import render

            page = render(
                request,
                "error.html",
                503,
                title="Unavailable",
                message="The database is unavailable. Try again in a moment.",
            )
            page.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
            return page
        response = error_response(503, "unavailable", UNAVAILABLE_MESSAGE)
        response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
        return response
    log.error("unhandled_error", path=path, error_type=type(exc).__name__)
    return error_response(500, "internal_error", "an unexpected error occurred")
