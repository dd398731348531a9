"""The built-in gateway: decide, then stream the request to its upstream and back.

For an allowed request the method, raw path, query, headers and body go to the route's
upstream over a pooled keep-alive connection; the response streams back. ``Authorization``,
``DPoP``, hop-by-hop headers, ``Forwarded``, ``X-Real-IP``, method overrides and every
client-sent ``X-Tokenward-*`` and ``X-Forwarded-*`` header are removed, in any spelling that
folds ``_`` into ``-`` (CGI and WSGI servers read ``X_Tokenward_Principal`` as
``X-Tokenward-Principal``), then the identity headers and the gateway's own
``X-Forwarded-*`` are added (a client's ``X-Forwarded-For`` chain is kept only from a trusted
proxy), so an upstream can trust them. A request with more than
one ``Authorization`` header is refused (400). Bodies are never buffered
whole: the request and response are bounded by ``max_request_bytes``/``max_response_bytes``
while they stream; only a small answer that has fully arrived (or a short one of known length)
goes back in one write. An upstream that refuses or drops the connection gives 502, one that
is slow 504. Bodies pass through as they are (no decompression on either side).

The gateway is served by aiohttp's low-level HTTP server (no application, router or
middleware layer: every path is proxied) and forwards over its own keep-alive connections
(:mod:`~tokenward.gateway.upstream`; aiohttp's client, chosen first in
docs/decisions/0010-gateway-upstream-client.md, cost more than the whole decision). A proxied
request costs one parse, one pass over its headers, one decision, one write to the upstream
and, for a small answer, one write back.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import time
from typing import TYPE_CHECKING, Protocol

import structlog
from aiohttp import web, web_protocol
from aiohttp.http import HttpVersion11
from aiohttp.http_exceptions import LineTooLong
from multidict import CIMultiDict

from tokenward import tracing
from tokenward.errors import TokenwardError
from tokenward.events import recorded_header, request_id_from
from tokenward.gateway import mcp
from tokenward.gateway.config import Route, Upstream
from tokenward.gateway.enforce import DUPLICATE_AUTHORIZATION, Enforcement, Outcome
from tokenward.gateway.upstream import Connection, UpstreamError, UpstreamPool, UpstreamTimeout

# Roles of request headers the gateway reads or never forwards as sent (by lower-case name).
_DROP, _AUTHORIZATION, _DPOP, _FORWARDED_FOR, _REQUEST_ID, _HOST, _EXPECT, _USER_AGENT = range(8)
_TRACE_CONTEXT = 8
_REQUEST_ROLES: dict[bytes, int] = {
    # hop-by-hop, or set by the gateway itself
    b"connection": _DROP,
    b"keep-alive": _DROP,
    b"proxy-authenticate": _DROP,
    b"proxy-authorization": _DROP,
    b"proxy-connection": _DROP,
    b"te": _DROP,
    b"trailer": _DROP,
    b"transfer-encoding": _DROP,
    b"upgrade": _DROP,
    b"content-length": _DROP,
    b"x-forwarded-proto": _DROP,
    b"x-forwarded-host": _DROP,
    b"forwarded": _DROP,  # the gateway speaks X-Forwarded-*; a client's Forwarded would lie
    b"x-real-ip": _DROP,
    # A method override would have the upstream serve another method than the one the
    # route was decided on (a GET route reaching a DELETE handler): never forwarded.
    b"x-http-method-override": _DROP,
    b"x-http-method": _DROP,
    b"x-method-override": _DROP,
    # read by the gateway, not forwarded as sent
    b"authorization": _AUTHORIZATION,
    b"dpop": _DPOP,  # a proof is for tokenward, like the token it binds
    b"x-forwarded-for": _FORWARDED_FOR,
    b"x-request-id": _REQUEST_ID,
    b"host": _HOST,
    b"expect": _EXPECT,
    # read, and forwarded
    b"user-agent": _USER_AGENT,
    # forwarded as sent while tracing is off; replaced by the gateway's span when it is on
    b"traceparent": _TRACE_CONTEXT,
    b"tracestate": _TRACE_CONTEXT,
    b"baggage": _TRACE_CONTEXT,
}
#: Response headers never passed back as sent (hop-by-hop; the length is the gateway's).
_DROP_RESPONSE = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"content-length",
    }
)
#: Client-sent headers with these prefixes are never forwarded: the gateway sets its own.
_SET_BY_GATEWAY = (b"x-tokenward-", b"x-forwarded-")
#: An answer of known length up to this size is read whole, then sent in one write.
_SMALL_BODY = 64 * 1024
#: Methods a dropped pooled connection may be retried with (idempotent, RFC 9110 §9.2.2).
_RETRYABLE = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
_CRLF = b"\r\n"
_SEP = b": "

if TYPE_CHECKING:
    from tokenward.metrics import Metrics


class _BodyTooLarge(Exception):
    pass


class _Sent:
    """One pass over a request's headers as received: what the decision reads, and the
    header lines that go upstream unchanged."""

    __slots__ = (
        "authorization",
        "authorizations",
        "dpop_proof",
        "expect",
        "forward",
        "forwarded_for",
        "host",
        "request_id",
        "trace_context",
        "user_agent",
    )

    def __init__(self, raw_headers: tuple[tuple[bytes, bytes], ...]) -> None:
        forward: list[bytes] = []
        authorization = dpop_proof = user_agent = None
        authorizations = 0
        request_id = host = expect = None
        forwarded_for: list[bytes] = []
        trace_context: list[bytes] = []
        for name, value in raw_headers:
            lower = name.lower()
            role = _REQUEST_ROLES.get(lower)
            if role is None:
                if b"_" in lower:
                    # CGI/WSGI read "_" as "-": X_Tokenward_Principal must not get through
                    # as X-Tokenward-Principal, nor X_Forwarded_For as X-Forwarded-For.
                    folded = lower.replace(b"_", b"-")
                    if folded in _REQUEST_ROLES or folded.startswith(_SET_BY_GATEWAY):
                        continue
                elif lower.startswith(_SET_BY_GATEWAY):
                    continue
                forward += (name, _SEP, value, _CRLF)
            elif role == _AUTHORIZATION:
                authorizations += 1
                if authorization is None:
                    authorization = value.decode("latin-1")
            elif role == _USER_AGENT:
                forward += (name, _SEP, value, _CRLF)
                if user_agent is None:
                    user_agent = recorded_header(value)
            elif role == _FORWARDED_FOR:
                forwarded_for.append(value)
            elif role == _REQUEST_ID:
                request_id = request_id or value
            elif role == _HOST:
                host = host or value
            elif role == _DPOP:
                if dpop_proof is None:
                    dpop_proof = value.decode("latin-1")
            elif role == _EXPECT:
                expect = value
            elif role == _TRACE_CONTEXT:
                trace_context += (name, _SEP, value, _CRLF)
        self.forward = forward
        self.trace_context = trace_context
        self.authorization: str | None = authorization
        self.authorizations = authorizations
        self.dpop_proof: str | None = dpop_proof
        self.user_agent: str | None = user_agent
        self.forwarded_for = forwarded_for
        self.request_id: bytes | None = request_id
        self.host: bytes | None = host
        self.expect: bytes | None = expect


log = structlog.get_logger("tokenward.gateway")


class _RequestHandler(web_protocol.RequestHandler):
    """aiohttp's connection handler, with its own answers to what it cannot parse changed.

    aiohttp answers a request it cannot parse (a bad header, an oversized line) before the
    gateway sees it: in plain text that quotes the offending line back, an ``Authorization``
    header included, and it logs the same with the exception. Here the answer is JSON like
    every other error, quotes nothing, and the log line names only the status and the kind
    of error: a token never reaches a log or an error body.
    """

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        headers: dict[str, str] = {}
        if isinstance(exc, TokenwardError):
            # A dependency that failed mid-request (the audit log cannot be written, a
            # database that does not answer): its own status, fail closed, as the API does.
            status, body = exc.status, exc.body()
            if status == 503:
                headers["Retry-After"] = "5"
        elif isinstance(exc, LineTooLong):
            status = 431
            body = {
                "error": "headers_too_large",
                "message": "a request line or header is longer than the gateway accepts",
            }
        elif status < 500:
            body = {"error": "bad_request", "message": "the request is not valid HTTP/1.1"}
        else:
            body = {"error": "internal_error", "message": "the gateway failed this request"}
        log.warning("gateway_bad_request", status=status, error=type(exc).__name__)
        if request.writer.output_size > 0:  # an answer has started: nothing more to say
            raise ConnectionError("the response has started; the connection is closed")
        response = web.Response(
            status=status,
            body=json.dumps(body).encode(),
            content_type="application/json",
            headers=headers,
        )
        response.force_close()
        return response


class _Server(web.Server):
    def __call__(self) -> web_protocol.RequestHandler:
        return _RequestHandler(self, loop=self._loop, **self._kwargs)


class _Watched:
    """What a traced or measured request reports: its route, upstream and their timings."""

    __slots__ = ("route", "trace", "upstream", "upstream_seconds", "upstream_status")

    def __init__(self, trace: tracing.RequestTrace | None) -> None:
        self.trace = trace
        self.route: Route | None = None
        self.upstream: str | None = None
        self.upstream_seconds: float | None = None
        self.upstream_status = 0


class Gateway:
    """The gateway: an aiohttp server, one connection pool per upstream.

    With ``metrics``, each request is counted and timed per route and status, its upstream's
    answer too; with tracing on (:mod:`tokenward.tracing`), each is a span.
    """

    def __init__(self, enforcement: Enforcement, metrics: Metrics | None = None) -> None:
        self.enforcement = enforcement
        self.limits = enforcement.policy.limits
        self.metrics = metrics
        self._tracer = tracing.tracer()
        self._pools: dict[str, UpstreamPool] = {}
        self._runner: web.ServerRunner | None = None
        self._scheme = "http"

    def server(self) -> web.Server:
        """The HTTP server: every request, whatever its path, goes to :meth:`handle`.

        Request bodies are passed on as received (``auto_decompress=False``), never inflated.
        """
        return _Server(self.handle, access_log=None, max_field_size=16384, auto_decompress=False)

    async def start(
        self,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None = None,
        sock: socket.socket | None = None,
    ) -> None:
        """Listen on ``host:port``, or on ``sock`` already bound, (in the running event loop)
        until :meth:`aclose`."""
        self._scheme = "https" if ssl_context is not None else "http"
        self._runner = web.ServerRunner(self.server(), handle_signals=False, shutdown_timeout=10)
        await self._runner.setup()
        site: web.BaseSite = (
            web.SockSite(self._runner, sock, ssl_context=ssl_context)
            if sock is not None
            else web.TCPSite(self._runner, host, port, ssl_context=ssl_context)
        )
        await site.start()

    async def aclose(self) -> None:
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
        pools, self._pools = self._pools, {}
        for pool in pools.values():
            await pool.close()

    def _pool(self, upstream: Upstream) -> UpstreamPool:
        pool = self._pools.get(upstream.name)
        if pool is None:
            pool = self._pools[upstream.name] = UpstreamPool(upstream)
        return pool

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        """Decide, record the decision, then forward (or answer the denial)."""
        if self._tracer is None and self.metrics is None:
            return await self._handle(request, None)
        return await self._watched(request)

    async def _watched(self, request: web.BaseRequest) -> web.StreamResponse:
        """:meth:`_handle`, in a span and/or timed for the metrics."""
        started = time.perf_counter()
        trace = None
        if self._tracer is not None:
            peer = request.remote
            trace = tracing.start_request(
                self._tracer,
                request.raw_headers,
                request.method,
                request.raw_path.partition("?")[0],
                {"client.address": peer} if peer else None,
            )
        watched = _Watched(trace)
        status = 0
        error: BaseException | None = None
        try:
            response = await self._handle(request, watched)
            status = response.status
            return response
        except BaseException as exc:
            error = exc
            raise
        finally:
            route = watched.route
            template = route.path if route is not None else "unmatched"
            if self.metrics is not None:
                self.metrics.gateway_request(
                    template,
                    status,
                    time.perf_counter() - started,
                    watched.upstream,
                    watched.upstream_status,
                    watched.upstream_seconds,
                )
            if trace is not None:
                if route is not None:
                    trace.span.set_attribute("tokenward.route", route.name)
                if watched.upstream is not None:
                    trace.span.set_attribute("tokenward.upstream", watched.upstream)
                if watched.upstream_seconds is not None:
                    latency = round(watched.upstream_seconds * 1000, 3)
                    trace.span.set_attribute("tokenward.upstream.latency_ms", latency)
                tracing.end_request(trace, status, template, error)

    async def _handle(
        self, request: web.BaseRequest, watched: _Watched | None
    ) -> web.StreamResponse:
        started = time.perf_counter()
        method = request.method
        raw_path = request.raw_path.partition("?")[0]
        sent = _Sent(request.raw_headers)
        request_id = request_id_from(
            sent.request_id.decode("latin-1") if sent.request_id is not None else None
        )
        enforcement = self.enforcement
        client_ip = enforcement.resolver.resolve(
            request.remote, [v.decode("latin-1") for v in sent.forwarded_for]
        )
        host = sent.host.decode("latin-1") if sent.host is not None else request.host
        if sent.authorizations > 1:
            # Servers disagree on which of several counts (first, last, joined): refuse.
            outcome = Outcome.refused(DUPLICATE_AUTHORIZATION)
        else:
            outcome = await enforcement.decide(
                method,
                raw_path,
                sent.authorization,
                client_ip,
                proxied=True,
                dpop_proof=sent.dpop_proof,
                url=f"{self._scheme}://{host}{raw_path}",
            )
        trace = watched.trace if watched is not None else None
        if watched is not None:
            watched.route = outcome.route
            if trace is not None:
                trace.audit_started = time.perf_counter()
        await enforcement.record(
            outcome,
            source="gateway",
            method=method,
            path=raw_path,
            client_ip=client_ip,
            request_id=request_id,
            user_agent=sent.user_agent or None,
            started=started,
        )
        if trace is not None:
            trace.audit_waited()
        if not outcome.allowed:
            return _error(
                outcome.status, outcome.body(), outcome.limit_headers(), request_id=request_id
            )
        length = request.content_length
        if length is not None and length > self.limits.max_request_bytes:
            return self._too_large(request_id)
        has_body = request.body_exists
        if sent.expect is not None:
            if sent.expect.lower() != b"100-continue":
                return _error(
                    417,
                    {"error": "expectation_failed", "message": "only 100-continue is supported"},
                    request_id=request_id,
                )
            if has_body and request.version >= HttpVersion11:
                # The decision is made: now the client may send the body.
                await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                request.writer.output_size = 0
        route = outcome.route
        assert route is not None and route.upstream is not None
        # Upstream secrets (credentials.py) and MCP servers (mcp.py): a body decided message
        # by message, and filters on the answer.
        body: bytes | None = None
        filters: list[_BodyFilter] = []
        exchange = None
        if route.mcp is not None and method == "POST":
            whole = await _read_whole(request, self.limits.max_request_bytes)
            if whole is None:
                return self._too_large(request_id)
            exchange = mcp.exchange(
                enforcement,
                outcome,
                request_id=request_id,
                client_ip=client_ip,
                user_agent=sent.user_agent or None,
            )
            await exchange.decide(whole)
            if exchange.answer is not None:
                exchange.answer.headers["X-Request-ID"] = request_id
                return exchange.answer
            body, has_body, length = exchange.body, True, len(exchange.body or b"")
            filters.append(exchange)
        watch = None
        if route.mcp is not None and method == "GET":  # the server's stream: ends with the token
            handler = asyncio.current_task()
            assert handler is not None
            watch = mcp.watch_stream(
                enforcement,
                outcome,
                handler,
                request_id=request_id,
                client_ip=client_ip,
                user_agent=sent.user_agent or None,
            )
        if route.upstream.credential is not None:
            filters.append(route.upstream.credential.answer_mask())
        pool = self._pool(route.upstream)
        head = self._head(
            request, sent, pool, outcome, client_ip, request_id, has_body, length, trace
        )
        if watched is not None:
            watched.upstream = route.upstream.name
        try:
            return await self._forward(
                request, outcome, pool, head, has_body, length, request_id, body, filters, watched
            )
        finally:
            if exchange is not None:
                await exchange.finish()
            if watch is not None:
                watch.cancel()

    def _head(
        self,
        request: web.BaseRequest,
        sent: _Sent,
        pool: UpstreamPool,
        outcome: Outcome,
        client_ip: str | None,
        request_id: str,
        has_body: bool,
        length: int | None,
        trace: tracing.RequestTrace | None = None,
    ) -> bytes:
        """The request line and headers for the upstream, as one piece of bytes.

        Traced, the upstream's parent is the gateway's span (``traceparent``); else the
        client's trace context goes on as it was sent."""
        target = request.raw_path.encode("utf-8", "surrogateescape")
        forward = sent.forward
        upstream = outcome.route.upstream if outcome.route is not None else None
        credential = upstream.credential if upstream is not None else None
        if credential is not None:  # the provider's key, never the client's (credentials.py)
            forward, target = credential.apply(forward, target)
        head = [
            request.method.encode("ascii"),
            b" ",
            pool.base_path,
            target,
            b" HTTP/1.1\r\n",
            pool.host_line,
            *forward,
            self.enforcement.identity_lines(outcome),
            *(sent.trace_context if trace is None else tracing.inject_headers(trace)),
        ]
        if client_ip:
            head += (b"X-Tokenward-Client-IP: ", client_ip.encode(), _CRLF)
        peer = request.remote
        if peer:
            # The client's own X-Forwarded-For is passed on only when a trusted proxy sent
            # it; from anyone else it is a claim, and the upstream sees just the peer.
            hops = sent.forwarded_for if self.enforcement.resolver.trusts(peer) else []
            head += (b"X-Forwarded-For: ", b", ".join([*hops, peer.encode()]), _CRLF)
        head += (b"X-Forwarded-Proto: ", self._scheme.encode(), _CRLF)
        if sent.host is not None:
            head += (b"X-Forwarded-Host: ", sent.host, _CRLF)
        head += (b"X-Request-ID: ", request_id.encode(), _CRLF)
        if not has_body:
            head.append(_CRLF)
        elif length is not None:
            head += (b"Content-Length: ", str(length).encode(), _CRLF, _CRLF)
        else:
            head.append(b"Transfer-Encoding: chunked\r\n\r\n")
        return b"".join(head)

    async def _forward(
        self,
        request: web.BaseRequest,
        outcome: Outcome,
        pool: UpstreamPool,
        head: bytes,
        has_body: bool,
        length: int | None,
        request_id: str,
        body: bytes | None = None,
        filters: list[_BodyFilter] | None = None,
        watched: _Watched | None = None,
    ) -> web.StreamResponse:
        retry = not has_body and request.method in _RETRYABLE
        fresh = False
        while True:
            try:
                conn, reused = await pool.acquire(fresh=fresh)
            except UpstreamTimeout:
                return _upstream_timeout(request_id)
            except (UpstreamError, OSError):
                return _upstream_unavailable(request_id)
            try:
                return await self._exchange(
                    request,
                    outcome,
                    conn,
                    head,
                    has_body,
                    length,
                    request_id,
                    body,
                    filters,
                    watched,
                )
            except UpstreamTimeout:
                return _upstream_timeout(request_id)
            except (UpstreamError, OSError):
                # A pooled connection the upstream closed meanwhile: once more on a new one.
                if retry and reused and not conn.received:
                    retry, fresh = False, True
                    continue
                return _upstream_unavailable(request_id)
            except _BodyTooLarge:
                return self._too_large(request_id)
            finally:
                pool.release(conn)

    async def _exchange(
        self,
        request: web.BaseRequest,
        outcome: Outcome,
        conn: Connection,
        head: bytes,
        has_body: bool,
        length: int | None,
        request_id: str,
        body: bytes | None = None,
        filters: list[_BodyFilter] | None = None,
        watched: _Watched | None = None,
    ) -> web.StreamResponse:
        """One request and its answer on ``conn``; the caller releases the connection.
        ``body``: the request body as already read (else it streams from the client).
        ``watched``: told how long the upstream took to answer (to its status line)."""
        timeout = conn.timeout
        begun = time.perf_counter() if watched is not None else 0.0
        head_only = request.method == "HEAD"
        sender: asyncio.Task[None] | None = None
        if not has_body or body is not None:
            conn.begin(head + (body or b""), head_only=head_only, sent=True)
        else:
            first = request.content.read_nowait()
            whole = length is not None and len(first) == length
            conn.begin(head + (first if whole else b""), head_only=head_only, sent=whole)
            if not whole:
                # The rest streams while the answer is awaited (it may come early).
                sender = asyncio.ensure_future(self._send_body(request, conn, first, length))
        try:
            await conn.read_head(timeout)
            if watched is not None:
                watched.upstream_seconds = time.perf_counter() - begun
                watched.upstream_status = conn.status
            return await self._respond(request, outcome, conn, request_id, filters)
        finally:
            if sender is not None and not sender.done():
                sender.cancel()

    async def _send_body(
        self, request: web.BaseRequest, conn: Connection, first: bytes, length: int | None
    ) -> None:
        """Stream the rest of the request body to the upstream, bounded; a failure ends the
        exchange (a body over the bound as :class:`_BodyTooLarge`)."""
        limit = self.limits.max_request_bytes
        timeout = conn.timeout
        chunked = length is None
        received = 0
        content = request.content
        data = first
        try:
            while True:
                if data:
                    received += len(data)
                    if received > limit:
                        raise _BodyTooLarge
                    conn.write(b"%x\r\n%b\r\n" % (len(data), data) if chunked else data)
                    await conn.drain(timeout)
                data = await content.readany()
                if not data:
                    break
            if chunked:
                conn.write(b"0\r\n\r\n")
            conn.sent()
        except asyncio.CancelledError:
            raise
        except _BodyTooLarge as exc:
            conn.fail(exc)
        except UpstreamError as exc:
            conn.fail(exc)
        except Exception:  # the client went away mid-body, or its body was malformed
            conn.fail(UpstreamError("the request body could not be read"))

    async def _respond(
        self,
        request: web.BaseRequest,
        outcome: Outcome,
        conn: Connection,
        request_id: str,
        filters: list[_BodyFilter] | None = None,
    ) -> web.StreamResponse:
        limit = self.limits.max_response_bytes
        headers: CIMultiDict[str] = CIMultiDict()
        length = None
        for name, value in conn.headers:
            lower = name.lower()
            if lower in _DROP_RESPONSE:
                if lower == b"content-length":
                    length = int(value)
                continue
            headers.add(
                name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape")
            )
        if length is not None and length > limit:
            return _error(
                502,
                {"error": "response_too_large", "message": "the upstream response is too large"},
                request_id=request_id,
            )
        for name_text, value_text in outcome.limit_headers():
            headers[name_text] = value_text
        headers["X-Request-ID"] = request_id
        timeout = conn.timeout
        status = conn.status
        for each in filters or ():
            status = each.start(status, headers)
        if not conn.complete and length is not None and length <= _SMALL_BODY:
            await conn.read_all(timeout)  # a short answer of known length: read it whole
        if conn.complete:
            # The whole answer is here: status, headers and body in one write.
            body = conn.take() or b""
            if filters:
                body = await _through(filters, body, end=True)
                length = None  # the filters may have changed it
            if len(body) > limit:
                return _error(
                    502,
                    {
                        "error": "response_too_large",
                        "message": "the upstream response is too large",
                    },
                    request_id=request_id,
                )
            if length is not None and not body:
                headers["Content-Length"] = str(length)  # HEAD, 304: the length of the entity
            return web.Response(status=status, body=body, headers=headers)
        response = web.StreamResponse(status=status, headers=headers)
        if length is not None and not filters:
            response.content_length = length
        await response.prepare(request)
        sent = 0
        try:
            while (chunk := await conn.next_chunk(timeout)) is not None:
                sent += len(chunk)
                if sent > limit:
                    # The status is out: the only honest signal left is a cut connection.
                    raise _BodyTooLarge
                if filters:
                    chunk = await _through(filters, chunk)
                    if not chunk:
                        continue
                await response.write(chunk)
            if filters:
                rest = await _through(filters, b"", end=True)
                if rest:
                    await response.write(rest)
            await response.write_eof()
        except (UpstreamError, _BodyTooLarge):
            conn.fail(UpstreamError("the answer was cut"))
            _cut(request)
        except ConnectionError:  # the client went away
            conn.fail(UpstreamError("the client went away"))
        return response

    def _too_large(self, request_id: str) -> web.Response:
        message = f"the body exceeds {self.limits.max_request_bytes} bytes"
        response = _error(
            413, {"error": "payload_too_large", "message": message}, request_id=request_id
        )
        response.force_close()  # the rest of the body is not read
        return response


class _BodyFilter(Protocol):
    """Sees an upstream answer on its way back (an MCP exchange, a credential mask)."""

    def start(self, status: int, headers: CIMultiDict[str]) -> int: ...

    async def feed(self, chunk: bytes) -> bytes: ...

    async def end(self) -> bytes: ...


async def _through(filters: list[_BodyFilter], data: bytes, *, end: bool = False) -> bytes:
    """``data`` through each filter in turn (``end``: and what each still holds)."""
    for each in filters:
        data = await each.feed(data) if data else b""
        if end:
            data += await each.end()
    return data


async def _read_whole(request: web.BaseRequest, limit: int) -> bytes | None:
    """The request body, whole, if it has at most ``limit`` bytes (else ``None``)."""
    parts: list[bytes] = []
    size = 0
    async for data in request.content.iter_any():
        size += len(data)
        if size > limit:
            return None
        parts.append(data)
    return b"".join(parts)


def _cut(request: web.BaseRequest) -> None:
    if request.transport is not None:
        request.transport.abort()


def _upstream_timeout(request_id: str) -> web.Response:
    return _error(
        504,
        {"error": "upstream_timeout", "message": "the upstream did not answer in time"},
        request_id=request_id,
    )


def _upstream_unavailable(request_id: str) -> web.Response:
    return _error(
        502,
        {"error": "upstream_unavailable", "message": "the upstream is unavailable"},
        request_id=request_id,
    )


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
