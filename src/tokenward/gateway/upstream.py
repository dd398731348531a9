"""Keep-alive HTTP/1.1 connections from the gateway to one upstream, and one exchange on them.

A request goes out as bytes the gateway has already assembled (one write for the head, and
for a small body with it); the response is parsed by llhttp (httptools, the parser uvicorn
serves with) and its body handed over chunk by chunk as it arrives, so nothing is buffered
beyond a bounded read-ahead: reading from the upstream pauses while the client lags.

Why not aiohttp's client, as before: in a loop of pooled GETs to nginx it costs about 75 µs
of CPU per request, these connections about 10. Most of the difference is machinery a proxy
never uses (URL objects, header multidicts built twice, cookies, redirects, tracing hooks);
here a pooled request costs a pool lookup, one write and one parser call.

What a connection promises:

* it is reused only after a complete exchange: the request fully sent, the response fully
  read, both sides willing to keep it alive (HTTP/1.1 without ``Connection: close``); a
  response to ``HEAD`` closes it (llhttp cannot be told a body is absent);
* interim responses (``100 Continue``, ``103 Early Hints``) are skipped; an upgrade, a parse
  error, a head over :data:`MAX_HEAD_BYTES` or a truncated body is an error, never a short
  answer passed on as whole;
* a body without length or chunking ends when the upstream closes the connection;
* every wait on the upstream (its headers once the request is sent, the next chunk, room to
  write) is bounded by the upstream's ``timeout``; acquiring a connection (waiting for the
  pool, connecting, TLS) by its ``connect_timeout``;
* at most ``pool_size`` connections are open; idle ones are closed after
  :data:`KEEPALIVE_SECONDS`.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import ssl
from typing import cast
from urllib.parse import urlsplit

import httptools

from tokenward.gateway.config import Upstream

#: seconds an idle pooled connection is kept open
KEEPALIVE_SECONDS = 30.0
#: response bytes read ahead of the client before reading from the upstream pauses
_READ_AHEAD = 256 * 1024
#: the most bytes an answer's status line and headers (interim answers included) may take
MAX_HEAD_BYTES = 64 * 1024


class UpstreamError(Exception):
    """The upstream could not be reached, or broke the protocol (a 502 for the client)."""


class UpstreamTimeout(UpstreamError):
    """The upstream, or a connection to it, did not come within its timeout (a 504)."""


class Connection(asyncio.Protocol):
    """One connection to the upstream; one exchange at a time.

    The exchange's state is public, read by the gateway: ``status`` and ``headers`` (raw
    bytes, interim responses left out) once :meth:`read_head` returns, ``complete`` once the
    whole body is in ``chunks``.
    """

    __slots__ = (
        "_drain",
        "_head_only",
        "_paused",
        "_waiter",
        "buffered",
        "busy",
        "chunks",
        "closed",
        "complete",
        "error",
        "has_head",
        "head_bytes",
        "headers",
        "idle_since",
        "keep_alive",
        "loop",
        "parser",
        "pending_bytes",
        "pool",
        "received",
        "request_sent",
        "status",
        "timeout",
        "transport",
    )

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool: UpstreamPool | None = pool  # None once it has left the pool
        self.loop = pool.loop
        #: seconds the upstream may stay silent while the gateway waits on it
        self.timeout = pool.timeout
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self.busy = False
        self._paused = False  # reading paused: the client has not taken what was read
        self._drain: asyncio.Future[None] | None = None  # set while writing waits for room
        self._waiter: asyncio.Future[None] | None = None  # set while reading waits for data
        self._reset(head_only=False)

    def _reset(self, head_only: bool) -> None:
        self._head_only = head_only
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.has_head = False
        self.head_bytes = 0  # of the headers parsed so far
        self.pending_bytes = 0  # received while the head is incomplete
        self.complete = False
        self.keep_alive = False
        self.request_sent = False
        self.received = False  # any byte of an answer arrived
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.error: BaseException | None = None

    # -- the exchange (called by the gateway) ---------------------------------------------
    def begin(self, head: bytes, *, head_only: bool, sent: bool) -> None:
        """Start an exchange by writing ``head`` (``sent``: it holds the whole request)."""
        if self.closed or self.transport is None:
            raise UpstreamError("the pooled connection was closed")
        self._reset(head_only)
        if self._paused:
            self._paused = False
            self.transport.resume_reading()
        self.busy = True
        self.transport.write(head)
        self.request_sent = sent

    def write(self, data: bytes) -> None:
        """Write more of the request (the body); see :meth:`drain`."""
        if self.error is not None:
            raise self.error
        if self.closed or self.transport is None:
            raise UpstreamError("the upstream closed the connection")
        self.transport.write(data)

    async def drain(self, timeout: float) -> None:
        """Wait (at most ``timeout`` seconds) until the upstream takes what was written."""
        while self._drain is not None and self.error is None:
            handle = self.loop.call_later(timeout, self._timed_out)
            try:
                await asyncio.shield(self._drain)
            finally:
                handle.cancel()
        if self.error is not None:
            raise self.error

    def fail(self, error: BaseException) -> None:
        """End the exchange with ``error`` (the next read raises it); the connection is
        not reused."""
        if self.error is None:
            self.error = error
        self._wake()
        self._wake_drain()

    def sent(self) -> None:
        """The whole request is written: from now on the upstream's silence is timed."""
        self.request_sent = True
        self._wake()

    async def read_head(self, timeout: float) -> None:
        """Wait until the response's status and headers are in; the wait is timed once the
        request is sent (an upload takes the client's time, the upstream may answer early)."""
        while not self.has_head:
            await self._wait(timeout if self.request_sent else None)

    async def read_all(self, timeout: float) -> None:
        """Wait until the whole answer is in (only for a short one: see ``_READ_AHEAD``)."""
        while not self.complete:
            await self._wait(timeout)

    def take(self) -> bytes | None:
        """The body read so far, without waiting (``None`` at the end of it)."""
        chunks = self.chunks
        if not chunks:
            if self.complete:
                return None
            if self.error is not None:
                raise self.error
            return b""
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self.buffered = 0
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return data

    async def next_chunk(self, timeout: float) -> bytes | None:
        """The next part of the body (``None`` at its end), waiting at most ``timeout``."""
        while True:
            data = self.take()
            if data != b"":
                return data
            await self._wait(timeout)

    @property
    def reusable(self) -> bool:
        return (
            self.complete
            and self.keep_alive
            and self.request_sent
            and self.error is None
            and not self._head_only
            and not self.closed
        )

    async def _wait(self, timeout: float | None) -> None:
        if self.error is not None:
            raise self.error
        waiter = self._waiter = self.loop.create_future()
        handle = self.loop.call_later(timeout, self._timed_out) if timeout is not None else None
        try:
            await waiter
        finally:
            if handle is not None:
                handle.cancel()
            self._waiter = None
        if self.error is not None:
            raise self.error

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake_drain(self) -> None:
        drain, self._drain = self._drain, None
        if drain is not None and not drain.done():
            drain.set_result(None)

    def _timed_out(self) -> None:
        waiter, drain = self._waiter, self._drain
        if (waiter is not None and not waiter.done()) or (drain is not None and not drain.done()):
            self.fail(UpstreamTimeout("the upstream did not answer in time"))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.close()

    # -- asyncio.Protocol -----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if not self.busy or self.complete:
            # Bytes nobody asked for (or after a HEAD answer): the connection is out of step.
            self.close()
            return
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.fail(UpstreamError("the upstream switched protocols"))
            self.close()
            return
        except httptools.HttpParserError:
            self.fail(UpstreamError("the upstream answer is not valid HTTP/1.1"))
            self.close()
            return
        if self.error is not None:
            self.close()
        elif not self.has_head:  # a head still arriving: bounded as it grows
            self.pending_bytes += len(data)
            if self.pending_bytes > MAX_HEAD_BYTES:
                self.fail(UpstreamError("the upstream answer's head is too large"))
                self.close()

    def eof_received(self) -> bool | None:
        return None  # close the transport: connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.busy and not self.complete:
            if self.has_head and _until_close(self.headers):
                self.complete = True  # a body without length ends with the connection
                self.keep_alive = False
                self._wake()
            else:
                self.fail(UpstreamError("the upstream closed the connection"))
        self._wake_drain()
        if self.pool is not None:
            self.pool._lost(self)

    def pause_writing(self) -> None:
        if self._drain is None:
            self._drain = self.loop.create_future()

    def resume_writing(self) -> None:
        self._wake_drain()

    # -- httptools callbacks --------------------------------------------------------------
    # Once the answer is complete, anything after it is out of step: it is ignored, and the
    # connection is not reused.
    def on_message_begin(self) -> None:
        if self.complete:
            self.keep_alive = False

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.complete:
            self.headers.append((name, value))
            self.head_bytes += len(name) + len(value)

    def on_headers_complete(self) -> None:
        if self.complete or self.error is not None:
            return
        if self.head_bytes > MAX_HEAD_BYTES:
            self.fail(UpstreamError("the upstream answer's head is too large"))
            return
        status = self.parser.get_status_code()
        if status < 200:  # an interim answer: the real one follows
            self.headers = []
            return
        self.status = status
        self.has_head = True
        if self._head_only:
            self.complete = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self.complete:
            return
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > _READ_AHEAD and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if not self.has_head or self.complete:
            return  # the end of an interim answer, or of one out of step
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()
        self._wake()


def _until_close(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether a response body is delimited by the connection closing (RFC 9112 §6.3)."""
    for name, value in headers:
        lowered = name.lower()
        if lowered == b"content-length":
            return False
        if lowered == b"transfer-encoding" and value.lower().rstrip().endswith(b"chunked"):
            return False
    return True


class UpstreamPool:
    """The keep-alive connections to one upstream (at most ``pool_size`` open)."""

    def __init__(self, upstream: Upstream) -> None:
        self.loop = asyncio.get_running_loop()
        parts = urlsplit(upstream.url)
        secure = parts.scheme == "https"
        host = parts.hostname or ""
        self.host = host
        self.port = parts.port or (443 if secure else 80)
        self.ssl: ssl.SSLContext | None = ssl.create_default_context() if secure else None
        try:
            authority = host.encode("idna").decode("ascii")
        except UnicodeError:
            authority = host
        if ":" in authority:
            authority = f"[{authority}]"
        if parts.port is not None and parts.port != (443 if secure else 80):
            authority += f":{parts.port}"
        #: the ``Host`` header line for requests to this upstream
        self.host_line = b"Host: " + authority.encode("ascii") + b"\r\n"
        #: the upstream URL's base path: a request path is appended to it
        self.base_path = parts.path.rstrip("/").encode("utf-8", "surrogateescape")
        self.size = upstream.pool_size
        self.connect_timeout = upstream.connect_timeout
        self.timeout = upstream.timeout
        self._idle: list[Connection] = []
        self._open = 0  # open or opening
        self._waiters: collections.deque[asyncio.Future[Connection | None]] = collections.deque()
        self._expiry: asyncio.TimerHandle | None = None
        self._closed = False

    async def acquire(self, *, fresh: bool = False) -> tuple[Connection, bool]:
        """A connection, and whether it was used before (``fresh``: never a used one)."""
        if not fresh:
            idle = self._idle
            while idle:
                conn = idle.pop()
                if not conn.closed:
                    return conn, True
                self._drop(conn)
        try:
            async with asyncio.timeout(self.connect_timeout):
                return await self._acquire_slow(fresh)
        except TimeoutError:
            raise UpstreamTimeout("no connection to the upstream in time") from None

    async def _acquire_slow(self, fresh: bool) -> tuple[Connection, bool]:
        while True:
            if self._closed:
                raise UpstreamError("the gateway is shutting down")
            if not fresh:
                while self._idle:
                    conn = self._idle.pop()
                    if not conn.closed:
                        return conn, True
                    self._drop(conn)
            elif self._open >= self.size and self._idle:
                self._drop(self._idle.pop())  # make room for the new one
            if self._open < self.size:
                return await self._connect(), False
            waiter: asyncio.Future[Connection | None] = self.loop.create_future()
            self._waiters.append(waiter)
            try:
                handed = await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    given = waiter.result()
                    if given is not None:
                        self.release(given)
                else:
                    waiter.cancel()
                raise
            if handed is not None:
                if not handed.closed and not fresh:
                    return handed, True
                self._drop(handed)  # its place is taken by a new connection

    async def _connect(self) -> Connection:
        self._open += 1
        try:
            _, conn = await self.loop.create_connection(
                lambda: Connection(self),
                self.host,
                self.port,
                ssl=self.ssl,
                server_hostname=self.host if self.ssl is not None else None,
            )
        except BaseException:
            self._open -= 1
            self._hand_over(None)
            raise
        return conn

    def release(self, conn: Connection) -> None:
        """Take ``conn`` back after an exchange: kept if it can serve another, else closed."""
        conn.busy = False
        if not conn.reusable or self._closed:
            self._drop(conn)
            return
        conn.chunks.clear()
        conn.idle_since = self.loop.time()
        if not self._hand_over(conn):
            self._idle.append(conn)
            if self._expiry is None:
                self._expiry = self.loop.call_later(KEEPALIVE_SECONDS, self._expire)

    def _drop(self, conn: Connection) -> None:
        if conn.pool is self:
            conn.pool = None
            self._open -= 1
            conn.close()
            self._hand_over(None)

    def _lost(self, conn: Connection) -> None:
        """The connection closed (either side): it leaves the pool."""
        if not conn.busy and conn in self._idle:
            self._idle.remove(conn)
        if not conn.busy:
            self._drop(conn)

    def _hand_over(self, conn: Connection | None) -> bool:
        """Give ``conn`` (or, with ``None``, the right to connect) to the first waiter."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return True
        return False

    def _expire(self) -> None:
        self._expiry = None
        deadline = self.loop.time() - KEEPALIVE_SECONDS
        keep = []
        for conn in self._idle:
            if conn.idle_since <= deadline:
                self._drop(conn)
            else:
                keep.append(conn)
        self._idle = keep
        if keep:
            delay = keep[0].idle_since + KEEPALIVE_SECONDS - self.loop.time()
            self._expiry = self.loop.call_later(max(delay, 0.1), self._expire)

    async def close(self) -> None:
        """Close the idle connections; busy ones close when their exchange ends."""
        self._closed = True
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None
        idle, self._idle = self._idle, []
        for conn in idle:
            self._drop(conn)
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
