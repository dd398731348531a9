"""The hot HTTP routes, served straight from ASGI in front of the framework.

``POST /v1/verify`` and ``GET /healthz`` are answered here without routing, dependency
injection or the middleware stack; everything else falls through to the FastAPI app. The
handlers are the same functions the documented FastAPI routes call, so behaviour is one.
What the middleware would add (request id, body bound, security headers) is done inline.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send

from tokenward.api.errors import redact
from tokenward.api.middleware import SECURITY_HEADERS, request_context_for
from tokenward.api.verification import handle_verify
from tokenward.clientip import scope_client_ip
from tokenward.errors import TokenwardError
from tokenward.events import current_request

_JSON = (b"content-type", b"application/json")
_NO_STORE = (b"cache-control", b"no-store")
_HEALTH = b'{"status":"ok"}'


class FastPath:
    def __init__(self, app: ASGIApp, api: Any, max_body_bytes: int) -> None:
        self.app = app
        self.api = api  # the FastAPI app: its state holds the services
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path, method = scope["path"], scope["method"]
            if path == "/v1/verify" and method == "POST":
                await self._verify(scope, receive, send)
                return
            if path == "/healthz" and method == "GET":
                await _respond(send, 200, _HEALTH, [])
                return
        await self.app(scope, receive, send)

    async def _verify(self, scope: Scope, receive: Receive, send: Send) -> None:
        context = request_context_for(scope)
        token = current_request.set(context)
        extra = [(b"x-request-id", context.request_id.encode())]
        try:
            authorization = None
            for name, value in scope["headers"]:
                if name == b"authorization":
                    authorization = value.decode("latin-1")
            body = await _read_body(receive, self.max_body_bytes)
            if body is None:
                await _error(
                    send,
                    413,
                    "payload_too_large",
                    f"the body exceeds {self.max_body_bytes} bytes",
                    extra,
                )
                return
            try:
                services = self.api.state.services
                caller_ip = scope_client_ip(services.settings.trusted_proxies, scope)
                status, result = await handle_verify(services, authorization, body, caller_ip)
            except TokenwardError as exc:
                if exc.status == 401:
                    extra.append((b"www-authenticate", b'Bearer realm="tokenward"'))
                await _respond(send, exc.status, orjson.dumps(redact(exc.body())), extra)
                return
            await _respond(send, status, orjson.dumps(result), extra)
        finally:
            current_request.reset(token)


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    chunks = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


async def _respond(send: Send, status: int, body: bytes, extra: list[tuple[bytes, bytes]]) -> None:
    headers = [
        _JSON,
        _NO_STORE,
        (b"content-length", str(len(body)).encode()),
        *SECURITY_HEADERS,
        *extra,
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _error(
    send: Send, status: int, code: str, message: str, extra: list[tuple[bytes, bytes]]
) -> None:
    await _respond(send, status, orjson.dumps({"error": code, "message": message}), extra)
