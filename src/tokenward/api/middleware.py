"""Small ASGI middleware: request id, security headers and access log; request size bound."""

from __future__ import annotations

import re
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenward.api.errors import INVALID_REQUEST_CHALLENGE
from tokenward.asgi import send_json
from tokenward.events import RequestContext, current_request, new_request_id
from tokenward.logs import access_log
from tokenward.tokens.format import redact_tokens

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


class BodyLimitMiddleware:
    """Reject bodies larger than ``max_bytes`` with 413, whether announced or streamed."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    too_big = int(value) > self.max_bytes
                except ValueError:
                    too_big = True
                if too_big:
                    await _reject(send, self.max_bytes)
                    return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _TooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _TooLarge:
            if not started:
                await _reject(send, self.max_bytes)


class _TooLarge(Exception):
    pass


async def _reject(send: Send, max_bytes: int) -> None:
    message = f"the body exceeds {max_bytes} bytes"
    await send_json(send, 413, {"error": "payload_too_large", "message": message})


SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]


class RequestContextMiddleware:
    """Give every request an id (``X-Request-ID``, kept if sane), record who asks, add the
    security headers to every answer, and write its access log line (one JSON line per
    request, with that id).

    The outermost layer: the line has the status the client got, whichever layer answered.
    Only the path is logged, never the query string or a header value: a credential is
    never read from a URL, and this keeps a mistaken client's secret out of the logs too.
    The log is written once logging is set up (``tokenward serve``, or an app that configured
    it) and ``log_requests`` is on; ``/metrics`` and ``/healthz`` are left out.
    """

    def __init__(self, app: ASGIApp, log_requests: bool = True) -> None:
        self.app = app
        self.log_requests = log_requests

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        context, credentials = request_context_for(scope)
        request_id = context.request_id
        scope.setdefault("state", {})["request_id"] = request_id
        token = current_request.set(context)
        status = 0  # no answer yet

        async def with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [
                    *message.get("headers", []),
                    *SECURITY_HEADERS,
                    (b"x-request-id", request_id.encode()),
                ]
            await send(message)

        try:
            if credentials > 1 and not scope["path"].startswith("/authz"):
                # Which one would count? Servers and proxies differ (first, last, joined):
                # a request that names two credentials is refused, not guessed at. (/authz
                # answers for itself: a proxy turns a 400 from it into a 500.)
                body = {"error": "invalid_request", "message": _TWO_CREDENTIALS}
                challenge = [(b"www-authenticate", INVALID_REQUEST_CHALLENGE.encode())]
                await send_json(with_id, 400, body, challenge)
            else:
                await self.app(scope, receive, with_id)
        except Exception:
            if not status:
                raise
            # Answered already (the framework answers an exception its handlers did not
            # take, then raises it again for the server to log): the answer stands, and the
            # error was logged in one line where it was answered. Raised further, it would
            # put a traceback in the server's log and end a connection that is still good.
        finally:
            current_request.reset(token)
            path = scope["path"]
            if self.log_requests and access_log.enabled and path not in _UNLOGGED:
                access_log.request(
                    request_id=request_id,
                    method=scope["method"],
                    path=redact_tokens(path)[:256],
                    status=status or 500,
                    duration_ms=round((time.perf_counter() - started) * 1000, 2),
                    client_ip=context.client_ip,
                )


_UNLOGGED = frozenset({"/metrics", "/healthz"})


_TWO_CREDENTIALS = "the request has more than one Authorization header"


def request_context_for(scope: Scope) -> tuple[RequestContext, int]:
    """Request id (``X-Request-ID`` kept if sane, else a new one), peer IP and user agent;
    and how many ``Authorization`` headers the request has."""
    given = user_agent = None
    credentials = 0
    for name, value in scope["headers"]:
        if name == b"authorization":
            credentials += 1
        elif name == b"x-request-id":
            given = value.decode("latin-1")
        elif name == b"user-agent":
            user_agent = value.decode("latin-1")[:256]
    request_id = given if given and _REQUEST_ID.match(given) else new_request_id()
    client = scope.get("client")
    return RequestContext(request_id, client[0] if client else None, user_agent), credentials
