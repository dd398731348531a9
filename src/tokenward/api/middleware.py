"""Small ASGI middleware: request id, security headers and access log; request body bounds."""

from __future__ import annotations

import re
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenward.api.errors import INVALID_REQUEST_CHALLENGE
from tokenward.asgi import send_json
from tokenward.events import RequestContext, current_request, recorded_header, request_id_from
from tokenward.logs import access_log
from tokenward.tokens.format import redact_tokens

#: How deeply a JSON request body may nest (objects and arrays), unless set otherwise.
MAX_JSON_DEPTH = 32
_FORM_TYPES = frozenset({b"application/x-www-form-urlencoded", b"multipart/form-data"})


class BodyLimitMiddleware:
    """Bound what a request body may be, before any route reads it: at most ``max_bytes``
    (413 ``payload_too_large``, whether announced or streamed), and, unless it is a form,
    JSON nested at most ``max_depth`` levels (400 ``json_too_deep``).

    The body is read whole here (it is bounded) and handed on unchanged, so every parser
    behind this layer, the framework's, the fast path's and a route's own, only ever sees
    a body within both bounds: a deeply nested document cannot reach a recursive parser
    (the standard library's gives up with ``RecursionError`` near 1,000 levels). A form is
    not JSON: its brackets are data; nor is a body ``/authz`` is sent, which it never reads.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, max_depth: int = MAX_JSON_DEPTH) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_depth = max_depth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        form = False
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    too_big = int(value) > self.max_bytes
                except ValueError:
                    too_big = True
                if too_big:
                    await _reject(send, self.max_bytes)
                    return
            elif name == b"content-type":
                form = value.split(b";", 1)[0].strip().lower() in _FORM_TYPES
        chunks: list[bytes] = []
        received = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left: pass that on
                await self.app(scope, _replay(message, receive), send)
                return
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > self.max_bytes:
                await _reject(send, self.max_bytes)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        if not form and json_nests_deeper(body, self.max_depth) and not _unparsed(scope):
            await send_json(send, 400, too_deep_body(self.max_depth))
            return
        whole: Message = {"type": "http.request", "body": body, "more_body": False}
        await self.app(scope, _replay(whole, receive), send)


_STRUCTURE = re.compile(rb'[\[\]{}"\\]')


def _unparsed(scope: Scope) -> bool:
    """``/authz`` never reads a body: one a proxy sends along (Envoy's ``with_request_body``)
    is the upstream's to judge, and a 400 from /authz is a 500 to the proxy's client."""
    path: str = scope["path"]
    return path == "/authz" or path.startswith("/authz/")


def json_nests_deeper(body: bytes, limit: int) -> bool:
    """Whether ``body``, read as JSON, opens more than ``limit`` arrays or objects inside
    each other. One pass over its brackets and quotes; brackets inside strings do not count.
    Not a validator: a body that is not JSON is left to its parser to refuse."""
    if body.count(b"[") + body.count(b"{") <= limit:  # the common case: cannot be deeper
        return False
    depth = 0
    in_string = False
    escaped = -1  # the position a backslash in a string escapes
    for match in _STRUCTURE.finditer(body):
        position = match.start()
        if position == escaped:
            continue
        char = body[position]
        if in_string:
            if char == 0x5C:  # backslash
                escaped = position + 1
            elif char == 0x22:
                in_string = False
        elif char == 0x22:
            in_string = True
        elif char in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > limit:
                return True
        elif char in (0x5D, 0x7D):  # ] }
            depth -= 1
    return False


def too_deep_message(limit: int) -> str:
    return f"the JSON body nests deeper than {limit} levels"


def too_deep_body(limit: int) -> dict[str, str]:
    return {"error": "json_too_deep", "message": too_deep_message(limit)}


def _replay(first: Message, receive: Receive) -> Receive:
    """``receive`` that answers ``first`` once, then passes through (to hear a disconnect)."""
    pending: list[Message] = [first]

    async def replayed() -> Message:
        if pending:
            return pending.pop()
        return await receive()

    return replayed


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
    """Request id (``X-Request-ID`` kept if sane and free of tokens, else a new one), peer
    IP and user agent (token-shaped strings cut out);
    and how many ``Authorization`` headers the request has."""
    given = user_agent = None
    credentials = 0
    for name, value in scope["headers"]:
        if name == b"authorization":
            credentials += 1
        elif name == b"x-request-id":
            given = value.decode("latin-1")
        elif name == b"user-agent":
            user_agent = recorded_header(value)
    request_id = request_id_from(given)
    client = scope.get("client")
    return RequestContext(request_id, client[0] if client else None, user_agent), credentials
