"""The built-in gateway: decide, then stream the request to its upstream and back.

For an allowed request the method, raw path, query, headers and body go to the route's
upstream over a pooled keep-alive connection; the response streams back. ``Authorization``,
hop-by-hop headers and every client-sent ``X-Tokenward-*`` header are removed, then the
identity headers are added, so an upstream can trust them. Bodies are never buffered: the
request and response are bounded by ``max_request_bytes``/``max_response_bytes`` while they
stream. An upstream that refuses or drops the connection gives 502, one that is slow 504.
"""

from __future__ import annotations

import json
import time
from typing import Any

import aiohttp
from multidict import CIMultiDict
from starlette.types import Message, Receive, Scope, Send
from yarl import URL

from tokenward.events import new_request_id
from tokenward.gateway.config import Upstream
from tokenward.gateway.enforce import Enforcement

_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
_HOP_BY_HOP_STR = frozenset(h.decode() for h in _HOP_BY_HOP)
_SKIP_AUTO = frozenset({"User-Agent", "Accept", "Accept-Encoding"})
_REQUEST_ID_OK = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._:-")


class _BodyTooLarge(Exception):
    pass


class _ClientGone(Exception):
    pass


class _RequestBody:
    """The request body as it arrives, bounded; never held whole in memory.

    The HTTP client wraps errors raised while it sends, so what went wrong is also kept here.
    """

    __slots__ = ("failure", "limit", "receive")

    def __init__(self, receive: Receive, limit: int) -> None:
        self.receive = receive
        self.limit = limit
        self.failure: Exception | None = None

    async def chunks(self) -> Any:
        received = 0
        while True:
            message: Message = await self.receive()
            if message["type"] == "http.disconnect":
                self.failure = _ClientGone()
                raise self.failure
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > self.limit:
                self.failure = _BodyTooLarge()
                raise self.failure
            if chunk:
                yield chunk
            if not message.get("more_body", False):
                return


class Gateway:
    """The gateway ASGI app. One pooled client session per upstream, opened on first use."""

    def __init__(self, enforcement: Enforcement) -> None:
        self.enforcement = enforcement
        self.limits = enforcement.policy.limits
        self._sessions: dict[str, aiohttp.ClientSession] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        # websockets are not proxied: uvicorn closes them when the app returns

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def aclose(self) -> None:
        sessions, self._sessions = self._sessions, {}
        for session in sessions.values():
            await session.close()

    def _session(self, upstream: Upstream) -> aiohttp.ClientSession:
        session = self._sessions.get(upstream.name)
        if session is None or session.closed:
            connector = aiohttp.TCPConnector(
                limit=upstream.pool_size, keepalive_timeout=30, ttl_dns_cache=60
            )
            session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(
                    total=None, connect=upstream.connect_timeout, sock_read=upstream.timeout
                ),
                auto_decompress=False,
                skip_auto_headers=_SKIP_AUTO,
                cookie_jar=aiohttp.DummyCookieJar(),
            )
            self._sessions[upstream.name] = session
        return session

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        method: str = scope["method"]
        raw_path = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
        authorization = user_agent = request_id = None
        content_length: int | None = None
        has_body = False
        host = b""
        forwarded_for: list[str] = []
        upstream_headers: list[tuple[str, str]] = []
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value.decode("latin-1")
            elif name.startswith(b"x-tokenward-") or name in _HOP_BY_HOP:
                if name == b"transfer-encoding":
                    has_body = True
            elif name == b"content-length":
                try:
                    content_length = int(value)
                except ValueError:
                    await _error(send, 400, "invalid_request", "Content-Length is not a number")
                    return
                has_body = content_length > 0
            elif name == b"host":
                host = value
            elif name == b"x-forwarded-for":
                forwarded_for.append(value.decode("latin-1"))
            else:
                if name == b"user-agent":
                    user_agent = value.decode("latin-1")[:256]
                elif name == b"x-request-id":
                    if 0 < len(value) <= 64 and all(c in _REQUEST_ID_OK for c in value):
                        request_id = value.decode()
                    continue
                upstream_headers.append((name.decode("latin-1"), value.decode("latin-1")))
        client = scope.get("client")
        peer = client[0] if client else None
        enforcement = self.enforcement
        client_ip = enforcement.resolver.resolve(peer, forwarded_for)
        request_id = request_id or new_request_id()

        outcome = await enforcement.decide(method, raw_path, authorization, client_ip, proxied=True)
        await enforcement.record(
            outcome,
            source="gateway",
            method=method,
            path=raw_path,
            client_ip=client_ip,
            request_id=request_id,
            user_agent=user_agent,
            started=started,
        )
        if not outcome.allowed:
            await _error(
                send,
                outcome.status,
                outcome.error,
                outcome.message,
                outcome.limit_headers(),
                outcome.body(),
            )
            return
        if content_length is not None and content_length > self.limits.max_request_bytes:
            await _error(send, 413, "payload_too_large", self._too_large_message())
            return
        assert outcome.route is not None and outcome.route.upstream is not None
        upstream = outcome.route.upstream

        headers = CIMultiDict(upstream_headers)
        headers.extend(outcome.identity_headers())
        if client_ip:
            headers["X-Tokenward-Client-IP"] = client_ip
        if peer:
            headers["X-Forwarded-For"] = ", ".join([*forwarded_for, peer])
        headers["X-Forwarded-Proto"] = scope.get("scheme", "http")
        if host:
            headers["X-Forwarded-Host"] = host.decode("latin-1")
        headers["X-Request-ID"] = request_id
        if content_length is not None:
            headers["Content-Length"] = str(content_length)
        query = scope.get("query_string", b"")
        target = upstream.origin + upstream.base_path + raw_path
        if query:
            target += "?" + query.decode("latin-1")

        body = _RequestBody(receive, self.limits.max_request_bytes) if has_body else None
        response_started = False
        try:
            async with self._session(upstream).request(
                method,
                URL(target, encoded=True),
                headers=headers,
                data=body.chunks() if body is not None else None,
                allow_redirects=False,
                compress=None,
            ) as response:
                length = response.content_length
                if length is not None and length > self.limits.max_response_bytes:
                    await _error(
                        send, 502, "response_too_large", "the upstream response is too large"
                    )
                    return
                out_headers = [
                    (k, v)
                    for k, v in response.raw_headers
                    if k.lower().decode("latin-1") not in _HOP_BY_HOP_STR
                ]
                out_headers += [(b"x-request-id", request_id.encode())]
                out_headers += [
                    (k.lower().encode(), v.encode("latin-1")) for k, v in outcome.limit_headers()
                ]
                await send(
                    {
                        "type": "http.response.start",
                        "status": response.status,
                        "headers": out_headers,
                    }
                )
                response_started = True
                sent = 0
                async for chunk in response.content.iter_any():
                    sent += len(chunk)
                    if sent > self.limits.max_response_bytes:
                        # Headers are out: the only honest signal left is a cut connection.
                        raise _BodyTooLarge
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b""})
        except _BodyTooLarge:
            if response_started:
                raise
            await _error(send, 413, "payload_too_large", self._too_large_message())
        except _ClientGone:
            return
        except TimeoutError:
            if response_started:
                raise
            await _error(send, 504, "upstream_timeout", "the upstream did not answer in time")
        except aiohttp.ClientError:
            if response_started:
                raise
            failure = body.failure if body is not None else None
            if isinstance(failure, _ClientGone):
                return
            if isinstance(failure, _BodyTooLarge):
                await _error(send, 413, "payload_too_large", self._too_large_message())
                return
            await _error(send, 502, "upstream_unavailable", "the upstream is unavailable")

    def _too_large_message(self) -> str:
        return f"the body exceeds {self.limits.max_request_bytes} bytes"


async def _error(
    send: Send,
    status: int,
    code: str,
    message: str,
    headers: list[tuple[str, str]] | None = None,
    body: dict[str, object] | None = None,
) -> None:
    payload = json.dumps(body or {"error": code, "message": message}).encode()
    raw = [(k.lower().encode(), v.encode("latin-1", "replace")) for k, v in headers or []]
    raw += [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
        (b"cache-control", b"no-store"),
    ]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})
