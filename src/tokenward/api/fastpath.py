"""The hot HTTP routes, served straight from ASGI in front of the framework.

``POST /v1/verify`` and ``GET /healthz`` are answered here without routing or dependency
injection; everything else falls through to the FastAPI app. The handlers are the same
functions the documented FastAPI routes call, so behaviour is one. The pure-ASGI middleware
around it (request id, access log, audit durability, security headers, body bound) is shared
with every other route: see :func:`tokenward.app.create_asgi`.
"""

from __future__ import annotations

from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from tokenward.api.errors import challenge, redact
from tokenward.api.verification import handle_verify
from tokenward.asgi import send_json
from tokenward.clientip import scope_client_ip
from tokenward.errors import TokenwardError

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
                await send_json(send, 200, _HEALTH)
                return
        await self.app(scope, receive, send)

    async def _verify(self, scope: Scope, receive: Receive, send: Send) -> None:
        authorization = content_type = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value.decode("latin-1")
            elif name == b"content-type":
                content_type = value.decode("latin-1")
        body = await _read_body(receive, self.max_body_bytes)
        if body is None:
            message = f"the body exceeds {self.max_body_bytes} bytes"
            await send_json(send, 413, {"error": "payload_too_large", "message": message})
            return
        try:
            services = self.api.state.services
            caller_ip = scope_client_ip(services.settings.trusted_proxies, scope)
            status, result = await handle_verify(
                services, authorization, body, caller_ip, content_type
            )
        except TokenwardError as exc:
            extra = []
            value = challenge(exc.status, exc.code, getattr(exc, "scope", None))
            if value is not None:
                extra.append((b"www-authenticate", value.encode()))
            await send_json(send, exc.status, redact(exc.body()), extra)
            return
        await send_json(send, status, result)


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
