"""The built-in gateway: decide, then stream the request to its upstream and back.

For an allowed request the method, raw path, query, headers and body go to the route's
upstream over a pooled keep-alive connection; the response streams back. ``Authorization``,
hop-by-hop headers and every client-sent ``X-Tokenward-*`` header are removed, then the
identity headers are added, so an upstream can trust them. Bodies are never buffered: the
request and response are bounded by ``max_request_bytes``/``max_response_bytes`` while they
stream. An upstream that refuses or drops the connection gives 502, one that is slow 504.

The gateway is served by aiohttp's HTTP server and forwards with aiohttp's client: a
proxied request costs one parse, one decision and one pooled upstream call, with no ASGI
layer in between (docs/decisions/0010-gateway-upstream-client.md).
"""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from tokenward.events import new_request_id
from tokenward.gateway.config import Upstream
from tokenward.gateway.enforce import Enforcement, Outcome

#: Request headers never forwarded as sent: hop-by-hop ones, the credential, the headers the
#: gateway sets itself. Client-sent ``X-Tokenward-*`` are dropped by prefix.
_DROP_REQUEST = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "expect",
        "authorization",
        "dpop",  # a proof is for tokenward, like the token it binds
        "host",
        "content-length",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-request-id",
    }
)
_DROP_RESPONSE = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "content-length",
    }
)
_SKIP_AUTO = frozenset({"User-Agent", "Accept", "Accept-Encoding"})
_REQUEST_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._:-")


class _BodyTooLarge(Exception):
    pass


class _RequestBody:
    """The request body as it arrives, bounded; never held whole in memory.

    The HTTP client wraps errors raised while it sends, so what went wrong is also kept here.
    """

    __slots__ = ("content", "failure", "limit")

    def __init__(self, content: aiohttp.StreamReader, limit: int) -> None:
        self.content = content
        self.limit = limit
        self.failure: Exception | None = None

    async def chunks(self) -> AsyncIterator[bytes]:
        received = 0
        async for chunk in self.content.iter_any():
            received += len(chunk)
            if received > self.limit:
                self.failure = _BodyTooLarge()
                raise self.failure
            yield chunk


class Gateway:
    """The gateway: an aiohttp application, one pooled client session per upstream."""

    def __init__(self, enforcement: Enforcement) -> None:
        self.enforcement = enforcement
        self.limits = enforcement.policy.limits
        self._sessions: dict[str, aiohttp.ClientSession] = {}
        self._runner: web.AppRunner | None = None

    def application(self) -> web.Application:
        app = web.Application(handler_args={"max_field_size": 16384})
        app.router.add_route("*", "/{tail:.*}", self.handle)
        app.on_cleanup.append(self._cleanup)
        return app

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> None:
        """Listen on ``host:port`` (in the running event loop) until :meth:`aclose`."""
        self._runner = web.AppRunner(
            self.application(), access_log=None, handle_signals=False, shutdown_timeout=10
        )
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port, ssl_context=ssl_context).start()

    async def aclose(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
        await self._cleanup()

    async def _cleanup(self, _app: web.Application | None = None) -> None:
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

    async def handle(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        method = request.method
        raw_path, _, query = request.raw_path.partition("?")
        headers = request.headers
        forwarded_for = headers.getall("X-Forwarded-For", [])
        given_id = headers.get("X-Request-ID", "")
        request_id = (
            given_id
            if 0 < len(given_id) <= 64 and all(c in _REQUEST_ID_CHARS for c in given_id)
            else new_request_id()
        )
        peer = request.remote
        enforcement = self.enforcement
        client_ip = enforcement.resolver.resolve(peer, forwarded_for)

        outcome = await enforcement.decide(
            method,
            raw_path,
            headers.get("Authorization"),
            client_ip,
            proxied=True,
            dpop_proof=headers.get("DPoP"),
            url=f"{request.scheme}://{request.host}{raw_path}",
        )
        await enforcement.record(
            outcome,
            source="gateway",
            method=method,
            path=raw_path,
            client_ip=client_ip,
            request_id=request_id,
            user_agent=headers.get("User-Agent", "")[:256] or None,
            started=started,
        )
        if not outcome.allowed:
            return _error(
                outcome.status, outcome.body(), outcome.limit_headers(), request_id=request_id
            )
        length = request.content_length
        if length is not None and length > self.limits.max_request_bytes:
            return self._too_large(request_id)
        assert outcome.route is not None and outcome.route.upstream is not None
        upstream = outcome.route.upstream
        target = upstream.prefix + raw_path
        if query:
            target += "?" + query
        return await self._forward(request, outcome, upstream, target, client_ip, request_id)

    async def _forward(
        self,
        request: web.Request,
        outcome: Outcome,
        upstream: Upstream,
        target: str,
        client_ip: str | None,
        request_id: str,
    ) -> web.StreamResponse:
        out: list[tuple[str, str]] = []
        for name, value in request.headers.items():
            lower = name.lower()
            if lower not in _DROP_REQUEST and not lower.startswith("x-tokenward-"):
                out.append((name, value))
        out += outcome.identity_headers()
        if client_ip:
            out.append(("X-Tokenward-Client-IP", client_ip))
        peer = request.remote
        forwarded_for = request.headers.getall("X-Forwarded-For", [])
        if peer:
            out.append(("X-Forwarded-For", ", ".join([*forwarded_for, peer])))
        out.append(("X-Forwarded-Proto", request.scheme))
        if request.host:
            out.append(("X-Forwarded-Host", request.host))
        out.append(("X-Request-ID", request_id))
        if request.content_length is not None:
            out.append(("Content-Length", str(request.content_length)))
        body = (
            _RequestBody(request.content, self.limits.max_request_bytes)
            if request.body_exists
            else None
        )
        response: web.StreamResponse | None = None
        try:
            async with self._session(upstream).request(
                request.method,
                URL(target, encoded=True),
                headers=out,
                data=body.chunks() if body is not None else None,
                allow_redirects=False,
            ) as upstream_response:
                length = upstream_response.content_length
                if length is not None and length > self.limits.max_response_bytes:
                    return _error(
                        502,
                        {
                            "error": "response_too_large",
                            "message": "the upstream response is too large",
                        },
                        request_id=request_id,
                    )
                response = web.StreamResponse(
                    status=upstream_response.status,
                    headers=CIMultiDict(
                        (name, value)
                        for name, value in upstream_response.headers.items()
                        if name.lower() not in _DROP_RESPONSE
                    ),
                )
                if length is not None:
                    response.content_length = length
                for name, value in outcome.limit_headers():
                    response.headers[name] = value
                response.headers["X-Request-ID"] = request_id
                await response.prepare(request)
                sent = 0
                limit = self.limits.max_response_bytes
                async for chunk in upstream_response.content.iter_any():
                    sent += len(chunk)
                    if sent > limit:
                        # The status is out: the only honest signal left is a cut connection.
                        raise _BodyTooLarge
                    await response.write(chunk)
                await response.write_eof()
                return response
        except _BodyTooLarge:
            if response is None:
                return self._too_large(request_id)
            _cut(request)
            return response
        except TimeoutError:
            if response is not None:
                _cut(request)
                return response
            return _error(
                504,
                {"error": "upstream_timeout", "message": "the upstream did not answer in time"},
                request_id=request_id,
            )
        except (aiohttp.ClientError, ConnectionError):
            if response is not None:
                _cut(request)
                return response
            if body is not None and isinstance(body.failure, _BodyTooLarge):
                return self._too_large(request_id)
            return _error(
                502,
                {"error": "upstream_unavailable", "message": "the upstream is unavailable"},
                request_id=request_id,
            )

    def _too_large(self, request_id: str) -> web.Response:
        message = f"the body exceeds {self.limits.max_request_bytes} bytes"
        response = _error(
            413, {"error": "payload_too_large", "message": message}, request_id=request_id
        )
        response.force_close()  # the rest of the body is not read
        return response


def _cut(request: web.Request) -> None:
    if request.transport is not None:
        request.transport.abort()


def _error(
    status: int,
    body: dict[str, object],
    headers: list[tuple[str, str]] | None = None,
    *,
    request_id: str,
) -> web.Response:
    response = web.Response(
        status=status, body=json.dumps(body).encode(), content_type="application/json"
    )
    for name, value in headers or []:
        response.headers[name] = value
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Request-ID"] = request_id
    return response
