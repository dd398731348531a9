"""The hot routes, each served by one ASGI layer in front of everything else.

``POST /v1/verify`` and ``/authz`` (``/authz/…``) are what every protected request costs, so
they skip the layered stack the other routes go through (request context → body bound →
audit durability → framework) and get the same guarantees from one layer with one send:

* a request id (``X-Request-ID`` kept if sane and free of tokens), the caller's address and
  user agent, set as the request context for the audit events;
* for ``/v1/verify``: one pass over the headers, the body bound (``413``) and the JSON depth
  bound (``400 json_too_deep``) while reading it, a request with two ``Authorization``
  headers refused; ``/authz`` reads no body and answers for itself (a proxy turns a 400
  from it into a 500);
* the answer starts only once the request's audit events are durable, or becomes a 503
  ``audit_unavailable`` (fail closed);
* the security headers and ``X-Request-ID`` on the answer (pre-encoded), and one access log
  line with the status the client got.

``GET /healthz`` is answered by :class:`FastPath` inside the stack (it is the "bare route,
same middleware" every benchmark compares with). The handlers are the functions the
documented FastAPI routes call, so behaviour is one.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenward.api.errors import (
    INVALID_REQUEST_CHALLENGE,
    RETRY_AFTER_SECONDS,
    UNAVAILABLE_MESSAGE,
    challenge,
    is_unavailable_error,
    log,
    redact,
)
from tokenward.api.middleware import (
    _TWO_CREDENTIALS,
    SECURITY_HEADERS,
    json_nests_deeper,
    too_deep_body,
)
from tokenward.api.verification import handle_verify
from tokenward.asgi import send_json
from tokenward.audit.durable import (
    UNAVAILABLE_BODY,
    collect_events,
    settle,
    settle_leftovers,
    stop_collecting,
)
from tokenward.clientip import scope_client_ip
from tokenward.errors import TokenwardError, TooManyRequests
from tokenward.events import RequestContext, current_request, recorded_header, request_id_from
from tokenward.gateway.authz import PREFIX, authz
from tokenward.logs import access_log
from tokenward.tokens.format import redact_tokens

_HEALTH = b'{"status":"ok"}'
_INVALID_REQUEST = (b"www-authenticate", INVALID_REQUEST_CHALLENGE.encode())

Handler = Callable[[Scope, Receive, Send, "_Request"], Awaitable[None]]


def _fault(path: str, exc: Exception) -> tuple[int, dict[str, str], list[tuple[bytes, bytes]]]:
    """The answer to an exception a hot route did not handle: 503 when the database cannot
    answer, the JSON 500 otherwise; one log line with the error's type."""
    if is_unavailable_error(exc):
        log.warning("database_unavailable", path=path[:256], error_type=type(exc).__name__)
        retry = [(b"retry-after", str(RETRY_AFTER_SECONDS).encode())]
        return 503, {"error": "unavailable", "message": UNAVAILABLE_MESSAGE}, retry
    log.error("unhandled_error", path=path[:256], error_type=type(exc).__name__)
    return 500, {"error": "internal_error", "message": "an unexpected error occurred"}, []


class FastPath:
    """``GET /healthz`` without routing (inside the stack: same headers, not logged)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/healthz" and scope["method"] == "GET":
            await send_json(send, 200, _HEALTH)
            return
        await self.app(scope, receive, send)


class _Request:
    """What the one header pass of a hot request found."""

    __slots__ = ("authorization", "content_length", "content_type", "context", "credentials")

    def __init__(self, scope: Scope) -> None:
        given = agent = None
        self.authorization: str | None = None
        self.content_type: str | None = None
        self.content_length: bytes | None = None
        self.credentials = 0
        for name, value in scope["headers"]:
            if name == b"authorization":
                self.credentials += 1
                self.authorization = value.decode("latin-1")
            elif name == b"content-type":
                self.content_type = value.decode("latin-1")
            elif name == b"content-length":
                self.content_length = value
            elif name == b"x-request-id":
                given = value.decode("latin-1")
            elif name == b"user-agent":
                agent = value
        client = scope.get("client")
        self.context = RequestContext(
            request_id_from(given), client[0] if client else None, recorded_header(agent)
        )


class HotPath:
    """Serves the hot routes in one layer; everything else goes to ``app`` (the full stack).

    ``api`` is the FastAPI app: its state holds the services.
    """

    def __init__(
        self,
        app: ASGIApp,
        api: Any,
        *,
        max_body_bytes: int,
        max_json_depth: int,
        log_requests: bool = True,
    ) -> None:
        self.app = app
        self.api = api
        self.max_body_bytes = max_body_bytes
        self.max_json_depth = max_json_depth
        self.log_requests = log_requests

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            if path == "/v1/verify" and scope["method"] == "POST":
                await self._serve(scope, receive, send, self._verify)
                return
            if path == PREFIX or (path.startswith(PREFIX) and path[len(PREFIX)] == "/"):
                await self._serve(scope, receive, send, self._authz)
                return
        await self.app(scope, receive, send)

    async def _serve(self, scope: Scope, receive: Receive, send: Send, handler: Handler) -> None:
        started = time.perf_counter()
        request = _Request(scope)
        context = request.context
        tail = [*SECURITY_HEADERS, (b"x-request-id", context.request_id.encode())]
        token = current_request.set(context)
        pending, collecting = collect_events()
        status = 0  # no answer yet
        failed = False

        async def durable_send(message: Message) -> None:
            nonlocal status, failed
            if failed:
                return
            if message["type"] == "http.response.start":
                if pending and not await settle(pending, message["status"]):
                    failed = True
                    status = 503
                    await send_json(send, 503, UNAVAILABLE_BODY, tail)
                    return
                status = message["status"]
                message["headers"] += tail
            await send(message)

        try:
            await handler(scope, receive, durable_send, request)
        except Exception as exc:
            # Answered already: the answer stands (see RequestContextMiddleware). Else the
            # same answer as every other route's for a fault (api/errors.py), never a
            # traceback in the server's log.
            if not status:
                status, body, extra = _fault(scope["path"], exc)
                await send_json(send, status, body, [*extra, *tail])
            else:
                log.error(
                    "unhandled_error", path=scope["path"][:256], error_type=type(exc).__name__
                )
        finally:
            stop_collecting(collecting)
            current_request.reset(token)
            await settle_leftovers(pending)
            if self.log_requests and access_log.enabled:
                access_log.request(
                    request_id=context.request_id,
                    method=scope["method"],
                    path=redact_tokens(scope["path"])[:256],
                    status=status or 500,
                    duration_ms=round((time.perf_counter() - started) * 1000, 2),
                    client_ip=context.client_ip,
                )

    async def _authz(self, scope: Scope, receive: Receive, send: Send, request: _Request) -> None:
        await authz(scope, send, self.api.state.services.enforcement)

    async def _verify(self, scope: Scope, receive: Receive, send: Send, request: _Request) -> None:
        if request.credentials > 1:
            # Which one would count? Servers and proxies differ: refused, not guessed at.
            refusal = {"error": "invalid_request", "message": _TWO_CREDENTIALS}
            await send_json(send, 400, refusal, [_INVALID_REQUEST])
            return
        body = await self._read_body(request, receive)
        if body is None:
            message = f"the body exceeds {self.max_body_bytes} bytes"
            await send_json(send, 413, {"error": "payload_too_large", "message": message})
            return
        if json_nests_deeper(body, self.max_json_depth):
            await send_json(send, 400, too_deep_body(self.max_json_depth))
            return
        try:
            services = self.api.state.services
            caller_ip = scope_client_ip(services.settings.trusted_proxies, scope)
            status, result = await handle_verify(
                services, request.authorization, body, caller_ip, request.content_type
            )
        except TokenwardError as exc:
            extra = []
            value = challenge(exc.status, exc.code, getattr(exc, "scope", None))
            if value is not None:
                extra.append((b"www-authenticate", value.encode()))
            if isinstance(exc, TooManyRequests) and exc.retry_after is not None:
                extra.append((b"retry-after", str(exc.retry_after).encode()))
            await send_json(send, exc.status, redact(exc.body()), extra)
            return
        await send_json(send, status, result)

    async def _read_body(self, request: _Request, receive: Receive) -> bytes | None:
        """The whole body, or ``None`` when it is (announced or found) larger than allowed."""
        limit = self.max_body_bytes
        if request.content_length is not None:
            try:
                if int(request.content_length) > limit:
                    return None
            except ValueError:
                return None
        chunks = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)
