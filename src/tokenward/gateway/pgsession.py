"""One client connection of the PostgreSQL gateway: startup, the token as the password, the
decision, the upstream login, then the relay with its audit (see
:mod:`~tokenward.gateway.postgres` for the whole flow)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import struct
import time
from collections import deque
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import structlog

from tokenward.audit.durable import Waitable, collect_events, stop_collecting
from tokenward.events import AccessEvent, new_request_id
from tokenward.gateway import pgwire as w
from tokenward.gateway.config import PostgresListener
from tokenward.gateway.enforce import Outcome
from tokenward.gateway.pgsql import leaves_read_only, redact, verb
from tokenward.gateway.pgupstream import Upstream, UpstreamRefused, login
from tokenward.tokens.model import Reason, TokenRecord
from tokenward.verify import Decision

if TYPE_CHECKING:
    from tokenward.gateway.postgres import PostgresGateway

log = structlog.get_logger("tokenward.gateway.postgres")

#: seconds a client has from connecting to being logged in
LOGIN_TIMEOUT = 15.0
#: a server message larger than this streams through without being held whole
HOLD_SERVER_MESSAGE = 256 * 1024
#: audit events of one session submitted and not yet settled, before the relay waits
AUDIT_IN_FLIGHT = 128
#: prepared statements and portals remembered per session (for the audit text)
STATEMENTS_KEPT = 4096
_INT32 = struct.Struct("!i")


class _Awaited:
    """The subscribers that had to be awaited for one event, as a batch of its own."""

    __slots__ = ("future",)

    def __init__(self, future: asyncio.Future[None]) -> None:
        self.future = future

    async def wait(self) -> None:
        await asyncio.shield(self.future)

    def error_for(self, item: Any) -> BaseException | None:
        return self.future.exception()


async def _in_order(coroutines: list[Coroutine[Any, Any, None]]) -> None:
    left = list(reversed(coroutines))
    try:
        while left:
            await left.pop()
    finally:
        for coroutine in left:  # never awaited once one failed: closed, not leaked
            coroutine.close()


_LENGTH = struct.Struct("!i")
#: message types whose content the relay reads (the rest pass by their length only)
_NOTED_CLIENT = frozenset(b"QPBESFX")
_NOTED_SERVER = frozenset(b"CEZIsSV")
_PAIR = struct.Struct("!ii")
#: startup parameters a client may pass on to the upstream (lower-case names)
_PASSED_PARAMS = frozenset(
    {
        "application_name",
        "client_encoding",
        "datestyle",
        "timezone",
        "extra_float_digits",
        "intervalstyle",
        "search_path",
        "bytea_output",
    }
)
_CLIENT_TYPES = frozenset(b"QPBEDCHSXFdcf")
_ROW_TAGS = frozenset({"SELECT", "INSERT", "UPDATE", "DELETE", "COPY", "FETCH", "MOVE", "MERGE"})
_SQLSTATE: dict[Reason, str] = {
    Reason.RATE_LIMITED: "53300",
    Reason.TOO_MANY_FAILURES: "53300",
    Reason.UNAVAILABLE: "57P03",
    Reason.INSUFFICIENT_SCOPE: "28000",
    Reason.IP_NOT_ALLOWED: "28000",
    Reason.IP_BLOCKED: "28000",
    Reason.WRONG_PROJECT: "28000",
    Reason.WRONG_ENVIRONMENT: "28000",
}
_LIMITS = {
    "connections_per_token": "for this token (max_connections_per_token)",
    "connections": "on this listener (max_connections)",
}
_REFUSED_SQL = (
    "DO $tokenward$BEGIN RAISE EXCEPTION USING ERRCODE = '25006', MESSAGE = "
    "'tokenward: this token may only read; it cannot make the session or a transaction "
    "read-write'; END$tokenward$"
)


def is_loopback(ip: str | None) -> bool:
    try:
        address = ipaddress.ip_address(ip or "")
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


@dataclass(slots=True)
class _Query:
    """One query in flight: a simple ``Query``, an ``Execute``, a ``FunctionCall``, or a
    ``Sync`` boundary (``protocol`` ``sync``: every ``ReadyForQuery`` settles up to one)."""

    protocol: str  # simple | extended | fastpath | sync
    statement: _Statement | None = None
    started: float = 0.0
    refused: bool = False
    tag: str = ""
    rows: int = 0
    sqlstate: str | None = None


@dataclass(slots=True)
class _Statement:
    text: str | None  # the audit text (redacted, full or None)
    verb: str
    refused: bool = False


class _Terminate(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(eq=False, slots=True)
class Session:
    """One client connection and, once it is allowed, its upstream connection."""

    gateway: PostgresGateway
    listener: PostgresListener
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    client_ip: str | None
    request_id: str = field(default_factory=new_request_id)
    tls: bool = False
    user: str = ""
    database: str = ""
    application_name: str | None = None
    credential: str | None = field(default=None, repr=False)
    decision: Decision | None = None
    scope: str | None = None
    read_only: bool = True
    upstream: Upstream | None = None
    client_pid: int = 0
    client_key: int = 0
    queries: deque[_Query] = field(default_factory=deque)
    statements: dict[str, _Statement] = field(default_factory=dict)
    portals: dict[str, _Statement] = field(default_factory=dict)
    last_activity: float = field(default_factory=time.monotonic)
    busy_since: float | None = None
    cancel_sent: bool = False
    #: DataRow messages since the last command completion (for a suspended portal's rows)
    data_rows: int = 0
    #: bytes of a large server message still to stream before the client is at a boundary
    streaming: int = 0
    closing: bool = False
    #: a re-check found the token no longer good and is ending the session
    ending: bool = False
    #: the client sent Terminate
    client_terminated: bool = False
    #: what the session's query events wait on (their batches' futures), distinct
    audits: set[asyncio.Future[None]] = field(default_factory=set)
    #: query events not yet settled (back-pressure counts these)
    unsettled: int = 0
    done: asyncio.Future[None] | None = None
    client_transport: asyncio.Transport | None = None
    upstream_transport: asyncio.Transport | None = None
    _client_buffer: bytearray = field(default_factory=bytearray)
    _server_buffer: bytearray = field(default_factory=bytearray)
    _upstream_paused: set[str] = field(default_factory=set)
    _skip_to_sync: bool = False

    @property
    def token(self) -> TokenRecord | None:
        return self.decision.token if self.decision else None

    # -- startup ----------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            async with asyncio.timeout(LOGIN_TIMEOUT):
                ready = await self._startup()
        except TimeoutError:
            self._send_error("08006", "tokenward: the login did not complete in time")
            return
        except (asyncio.IncompleteReadError, OSError):  # gone, or a failed TLS handshake
            return
        except w.ProtocolError as exc:
            await self._connection_event(Decision(False, Reason.MALFORMED), {"error": str(exc)})
            self._send_error("08P01", f"tokenward: {exc}")
            return
        if ready:
            await self._relay()

    async def _startup(self) -> bool:
        params: dict[str, str] | None = None
        minor = 0
        while params is None:
            length = _INT32.unpack(await self.reader.readexactly(4))[0]
            if not 8 <= length <= 10_000:
                raise w.ProtocolError("invalid startup packet")
            body = await self.reader.readexactly(length - 4)
            code = _INT32.unpack_from(body)[0]
            if code == w.SSL_REQUEST and length == 8 and not self.tls:
                context = self.gateway.ssl_context
                if context is None:
                    self.writer.write(b"N")
                    continue
                self.writer.write(b"S")
                await self.writer.drain()
                await self.writer.start_tls(context)
                self.tls = True
            elif code == w.GSSENC_REQUEST and length == 8:
                self.writer.write(b"N")
            elif code == w.CANCEL_REQUEST and length == 16:
                pid, key = _PAIR.unpack_from(body, 4)
                await self.gateway.cancel(pid, key)
                return False
            elif code >> 16 == 3:
                minor = code & 0xFFFF
                params = w.parse_startup(body[4:])
            else:
                raise w.ProtocolError("unsupported frontend protocol or request")
        self.user = params.get("user", "")
        self.database = params.get("database") or self.user
        self.application_name = params.get("application_name")
        listener = self.listener
        if not self.tls and not self.gateway.plain_allowed(self.client_ip):
            reason = "TLS is required (connect with sslmode=require)"
            if self.gateway.ssl_context is None:
                reason += "; TLS is not configured for tokenward"
            await self._connection_event(
                Decision(False, Reason.MISSING_CREDENTIAL), {"refused": "tls_required"}
            )
            self._send_error("28000", f"tokenward asks for a token only over TLS: {reason}")
            return False
        if "replication" in params:
            raise w.ProtocolError("replication connections are not served")
        if self.database not in (listener.upstream_database, listener.name):
            await self._connection_event(
                Decision(False, Reason.NO_ROUTE), {"refused": "unknown_database"}
            )
            self._send_error(
                "3D000",
                f'tokenward: database "{self.database}" is not served here; this listener '
                f'serves "{listener.upstream_database}"',
            )
            return False
        unknown = [k for k in params if k.startswith("_pq_.")]
        if minor or unknown:
            self.writer.write(w.negotiate_protocol(0, unknown))
        # The password is the token: asked in clear, inside TLS or on loopback only.
        self.writer.write(w.auth_request(w.AUTH_CLEARTEXT))
        await self.writer.drain()
        header = await self.reader.readexactly(5)
        length = _INT32.unpack_from(header, 1)[0]
        if header[:1] != b"p" or not 5 <= length <= 4096:
            raise w.ProtocolError("expected a password message")
        body = await self.reader.readexactly(length - 4)
        self.credential = body.rstrip(b"\x00").decode(errors="replace").strip()
        started = time.perf_counter()
        decision = await self._decide(self.credential)
        self.decision = decision
        if not decision.allowed:
            await self._connection_event(decision, {}, started)
            self._send_error(*self._denial(decision))
            return False
        refused = self.gateway.reserve(self)
        if refused is not None:
            denied = Decision(False, Reason.RATE_LIMITED, decision.token)
            await self._connection_event(denied, {"limit": refused}, started)
            self._send_error("53300", f"tokenward: too many connections {_LIMITS[refused]}")
            return False
        try:
            self.upstream = await asyncio.wait_for(
                login(
                    listener,
                    self.gateway.passwords[listener.name],
                    self._upstream_params(params),
                    self.gateway.salted.setdefault(listener.name, {}),
                    self.gateway.upstream_tls,
                ),
                listener.connect_timeout,
            )
        except (OSError, TimeoutError, asyncio.IncompleteReadError, w.ProtocolError) as exc:
            problem = str(exc) or type(exc).__name__
        except UpstreamRefused as exc:
            problem = exc.fields.get("M", "refused")
        else:
            problem = ""
        if problem:
            self.gateway.release(self)
            log.warning("postgres_upstream_failed", listener=listener.name, error=problem)
            await self._connection_event(decision, {"upstream_error": problem[:200]}, started)
            self._send_error("08006", "tokenward could not log in to the database upstream")
            return False
        upstream = self.upstream
        assert upstream is not None
        if self.closing:  # a re-check ended it during the login (its event says why)
            upstream.writer.close()
            return False
        self.gateway.register(self)
        await self._connection_event(decision, {}, started)
        self.writer.write(
            w.auth_request(w.AUTH_OK)
            + upstream.parameters
            + w.backend_key_data(self.client_pid, self.client_key)
            + w.ready_for_query(upstream.status)
        )
        await self.writer.drain()
        return True

    async def _decide(self, credential: str) -> Decision:
        enforcement = self.gateway.enforcement
        ip = self.client_ip
        if ip and (blocked := enforcement.blocked(ip)) is not None:
            return Decision(False, Reason.TOO_MANY_FAILURES, ratelimit=blocked)
        if not credential:
            return Decision(False, Reason.MISSING_CREDENTIAL)
        listener = self.listener
        scopes = [s for s in (listener.write_scope, listener.read_scope) if s]
        decision = Decision(False, Reason.INSUFFICIENT_SCOPE)
        for scope in scopes:
            # The scope is checked before any limit is counted: a token without the write
            # scope is counted once, by the read attempt.
            decision = await enforcement.verifier.verify(
                credential,
                scope=scope,
                ip=ip,
                project=listener.project,
                environment=listener.environment,
                route_limit=listener.limit,
            )
            self.scope = scope
            if decision.reason is not Reason.INSUFFICIENT_SCOPE:
                break
        self.read_only = self.scope != listener.write_scope
        return decision  # a failed credential counts through its access event

    def _denial(self, decision: Decision) -> tuple[str, str]:
        reason = decision.reason
        code = _SQLSTATE.get(reason, "28P01")
        if reason is Reason.INSUFFICIENT_SCOPE:
            listener = self.listener
            wanted = " or ".join(s for s in (listener.read_scope, listener.write_scope) if s)
            text = f"the token lacks the scope this database needs ({wanted})"
        elif reason is Reason.MISSING_CREDENTIAL:
            text = "send a tokenward token as the password"
        else:
            text = Outcome(decision).message
        return code, f"tokenward: {text} ({reason.value})"

    def _upstream_params(self, params: dict[str, str]) -> dict[str, str]:
        out = {k: v for k, v in params.items() if k.lower() in _PASSED_PARAMS}
        if self.read_only:
            out["default_transaction_read_only"] = "on"
        if self.listener.statement_timeout:
            out["statement_timeout"] = str(int(self.listener.statement_timeout * 1000))
        return out

    # -- audit ------------------------------------------------------------------------------

    def _event(
        self,
        decision: Decision,
        method: str,
        path: str | None,
        detail: dict[str, Any],
        latency_ms: float,
        scope: str | None = None,
    ) -> AccessEvent:
        enforcement = self.gateway.enforcement
        fingerprint = None
        if decision.token is None and self.credential:
            fingerprint = enforcement.hasher.fingerprint(self.credential)
        detail["listener"] = self.listener.name
        return AccessEvent(
            at=enforcement.verifier.clock(),
            source="postgres",
            decision=decision,
            request_id=self.request_id,
            client_ip=self.client_ip,
            user_agent=self.application_name,
            method=method,
            path=path,
            scope=scope or self.scope or self.listener.read_scope,
            latency_ms=latency_ms,
            fingerprint=fingerprint,
            detail=detail,
        )

    async def _connection_event(
        self, decision: Decision, detail: dict[str, Any], started: float | None = None
    ) -> None:
        """The connection's event; written (in sync mode) before the client is answered."""
        detail.update(database=self.database, user=self.user[:64], tls=self.tls)
        if decision.allowed:
            detail["session"] = "read_only" if self.read_only else "read_write"
        latency = (time.perf_counter() - started) * 1000 if started is not None else 0.0
        path = f"{self.listener.name}/{self.database}"[:512]
        await self.gateway.enforcement.events.access(
            self._event(decision, "CONNECT", path, detail, latency)
        )

    def _query_event(self, query: _Query) -> None:
        assert self.decision is not None
        statement = query.statement
        decision = self.decision
        scope = None
        if query.refused:
            decision = Decision(False, Reason.INSUFFICIENT_SCOPE, decision.token)
            scope = self.listener.write_scope
        detail: dict[str, Any] = {"protocol": query.protocol, "tag": query.tag, "rows": query.rows}
        if query.sqlstate:
            detail["sqlstate"] = query.sqlstate
        text = statement.text if statement else None
        method = statement.verb if statement else "QUERY"
        event = self._event(
            decision,
            method,
            text,
            detail,
            (time.perf_counter() - query.started) * 1000,
            scope,
        )
        # No task per query: the event joins the audit writer's current batch (and the
        # detectors' batch) at once; the session watches the batches' futures.
        waits, collecting = collect_events()
        try:
            rest = self.gateway.enforcement.events.publish(event)
        finally:
            stop_collecting(collecting)
        if rest:  # a subscriber that must be awaited (rare: a failure to count, a full queue)
            waits.append((_Awaited(asyncio.ensure_future(_in_order(rest))), None))
        for batch, item in waits:
            self._watch(batch, item)
        if self.unsettled >= AUDIT_IN_FLIGHT:  # back-pressure: stop reading, never drop
            self._pause_upstream("audit")

    def _watch(self, batch: Waitable, item: Any) -> None:
        future = batch.future
        if future.done():
            self._audited(batch, item)
            return
        self.unsettled += 1
        self.audits.add(future)
        future.add_done_callback(lambda _: self._audited(batch, item, counted=True))

    def _audited(self, batch: Waitable, item: Any, *, counted: bool = False) -> None:
        self.audits.discard(batch.future)
        if counted:
            self.unsettled -= 1
        error = None if batch.future.cancelled() else batch.error_for(item)
        if error is not None:
            log.error("postgres_audit_failed", error=str(error))
            self.terminate("57P01", "tokenward: the audit log is unavailable; session closed")
        elif self.unsettled <= AUDIT_IN_FLIGHT // 2:
            self._resume_upstream("audit")

    # -- relay ------------------------------------------------------------------------------
    #
    # Once logged in, both sockets are read by protocol callbacks (no stream, no task per
    # read): a chunk from one side is parsed into whole messages and written to the other in
    # one call. A side whose socket cannot take more pauses reading from the other side.

    async def _relay(self) -> None:
        upstream = self.upstream
        assert upstream is not None
        loop = asyncio.get_running_loop()
        self.done = loop.create_future()
        # a socket's transport reads as well as writes (StreamWriter types it write-only)
        client = cast(asyncio.Transport, self.writer.transport)
        server = cast(asyncio.Transport, upstream.writer.transport)
        self.client_transport, self.upstream_transport = client, server
        # What the streams read already and nobody consumed (normally nothing: the client
        # waits for ReadyForQuery, and the server sends nothing unasked).
        early_client = bytes(getattr(self.reader, "_buffer", b""))
        early_server = bytes(getattr(upstream.reader, "_buffer", b""))
        client.set_protocol(_Side(self, client=True))
        server.set_protocol(_Side(self, client=False))
        if early_server:
            self._on_server(early_server)
        if early_client:
            self._on_client(early_client)
        try:
            await self.done
        finally:
            self.close()
            if self.audits:
                await asyncio.gather(*list(self.audits), return_exceptions=True)

    def _pause_upstream(self, reason: str) -> None:
        if not self._upstream_paused and self.upstream_transport is not None:
            self.upstream_transport.pause_reading()
        self._upstream_paused.add(reason)

    def _resume_upstream(self, reason: str) -> None:
        if reason in self._upstream_paused:
            self._upstream_paused.discard(reason)
            transport = self.upstream_transport
            if not self._upstream_paused and transport is not None and not transport.is_closing():
                transport.resume_reading()

    def _statement(self, text: str, *, refused: bool) -> _Statement:
        mode = self.listener.audit_statements
        lexed = redact(text)
        shown = None if mode == "none" else (text if mode == "full" else lexed)
        return _Statement(shown, verb(lexed), refused)

    def _on_client(self, data: bytes) -> None:
        if self.closing:
            return
        out = self.upstream_transport
        assert out is not None
        self.last_activity = time.monotonic()
        limit = self.listener.max_message_bytes
        buffer: bytes | bytearray = data
        if self._client_buffer:  # appended in place: a large message costs no quadratic copy
            self._client_buffer += data
            buffer = self._client_buffer
        pieces: list[bytes | bytearray] = []
        pos, start, n = 0, 0, len(buffer)
        try:
            while n - pos >= 5:
                kind = buffer[pos]
                length = _LENGTH.unpack_from(buffer, pos + 1)[0]
                if kind not in _CLIENT_TYPES or length < 4:
                    raise _Terminate("08P01", "tokenward: invalid message from the client")
                if length > limit:
                    raise _Terminate(
                        "54000", f"tokenward: a message is larger than the limit ({limit} bytes)"
                    )
                end = pos + 1 + length
                if end > n:
                    break
                if kind in _NOTED_CLIENT:
                    replacement = self._from_client(kind, buffer, pos + 5, end)
                    if replacement is not None:
                        pieces.append(buffer[start:pos])
                        pieces.append(replacement)
                        start = end
                pos = end
        except (_Terminate, w.ProtocolError) as exc:
            code, message = (
                (exc.code, exc.message) if isinstance(exc, _Terminate) else ("08P01", str(exc))
            )
            self.terminate(code, message)
            return
        if pieces:
            pieces.append(buffer[start:pos])
            out.write(b"".join(pieces))
        elif pos:
            out.write(buffer[:pos] if pos < n else buffer)
        if pos:
            self._client_buffer = bytearray(buffer[pos:]) if pos < n else bytearray()
        elif not self._client_buffer:
            self._client_buffer = bytearray(buffer)

    def _from_client(
        self, kind: int, buffer: bytes | bytearray, start: int, end: int
    ) -> bytes | None:
        """Note one client message; returns what to send instead, if anything."""
        now = time.perf_counter()
        if kind == 0x51:  # Q: simple query
            text = buffer[start : end - 1].decode(errors="replace")
            refused = self.read_only and leaves_read_only(text)
            statement = self._statement(text, refused=refused)
            self._push(_Query("simple", statement, now, refused))
            self._push(_Query("sync"))
            return w.query(_REFUSED_SQL) if refused else None
        if kind == 0x50:  # P: Parse
            name, pos = w.read_cstring(buffer[start:end], 0)
            text, _ = w.read_cstring(buffer[start:end], pos)
            refused = self.read_only and leaves_read_only(text)
            self._remember(self.statements, name, self._statement(text, refused=refused))
            if refused:
                return w.message(b"P", w.cstring(name) + w.cstring(_REFUSED_SQL) + b"\x00\x00")
            return None
        if kind == 0x42:  # B: Bind
            body = buffer[start:end]
            portal, pos = w.read_cstring(body, 0)
            name, _ = w.read_cstring(body, pos)
            bound = self.statements.get(name)
            if bound is not None:
                self._remember(self.portals, portal, bound)
            else:
                self.portals.pop(portal, None)
            return None
        if kind == 0x45:  # E: Execute
            portal, _ = w.read_cstring(buffer[start:end], 0)
            found = self.portals.get(portal)
            self._push(_Query("extended", found, now, found.refused if found else False))
            return None
        if kind == 0x53:  # S: Sync
            self._push(_Query("sync"))
            return None
        if kind == 0x46:  # F: FunctionCall (fast path)
            if self.read_only:
                raise _Terminate(
                    "42501", "tokenward: a read-only session may not call functions by OID"
                )
            self._push(_Query("fastpath", _Statement(None, "FUNCTION"), now))
            self._push(_Query("sync"))
            return None
        self.client_terminated = True  # X: Terminate, forwarded; the server closes next
        return None

    def _push(self, query: _Query) -> None:
        if not self.queries and query.protocol != "sync":
            self.busy_since = time.monotonic()
            self.cancel_sent = False
        self.queries.append(query)

    @staticmethod
    def _remember(table: dict[str, _Statement], name: str, statement: _Statement) -> None:
        if name not in table and len(table) >= STATEMENTS_KEPT:
            table.pop(next(iter(table)))
        table[name] = statement

    def _on_server(self, data: bytes) -> None:
        if self.closing:
            return
        out = self.client_transport
        assert out is not None
        if self.streaming:  # the rest of a large message: pass it on as it comes
            take = min(self.streaming, len(data))
            out.write(data[:take])
            self.streaming -= take
            data = data[take:]
            if not data:
                return
        buffer: bytes | bytearray = data
        if self._server_buffer:
            self._server_buffer += data
            buffer = self._server_buffer
        pos, n = 0, len(buffer)
        settled: list[_Query] = []
        try:
            while n - pos >= 5:
                kind = buffer[pos]
                length = _LENGTH.unpack_from(buffer, pos + 1)[0]
                end = pos + 1 + length
                if end > n:
                    if length > HOLD_SERVER_MESSAGE and kind not in _NOTED_SERVER:
                        # stream it: a large row is never held whole; what came before it
                        # and its beginning go out below, the rest as it arrives
                        self.data_rows += kind == 0x44
                        self.streaming = end - n
                        pos = n
                    break
                if kind == 0x44:  # DataRow
                    self.data_rows += 1
                elif kind in _NOTED_SERVER:
                    self._from_server(kind, buffer, pos + 5, end, settled)
                pos = end
        except (_Terminate, w.ProtocolError) as exc:
            code, message = (
                (exc.code, exc.message) if isinstance(exc, _Terminate) else ("08P01", str(exc))
            )
            if pos:
                out.write(buffer[:pos])  # what came before it, then the error at a boundary
            self.terminate(code, message)
            return
        if pos:
            # A buffer handed to write() is never changed afterwards: the kept rest is a copy.
            out.write(buffer[:pos] if pos < n else buffer)
            self._server_buffer = bytearray(buffer[pos:]) if pos < n else bytearray()
        elif not self._server_buffer:
            self._server_buffer = bytearray(buffer)
        for query in settled:
            self._query_event(query)

    def _from_server(
        self,
        kind: int,
        buffer: bytes | bytearray,
        start: int,
        end: int,
        settled: list[_Query],
    ) -> None:
        queries = self.queries
        head = queries[0] if queries else None
        if kind == 0x43 or kind == 0x49 or kind == 0x73 or kind == 0x56:  # C, I, s, V
            if head is None or head.protocol == "sync":
                return
            if kind == 0x43:
                tag = buffer[start : end - 1].decode(errors="replace")
                head.tag = tag
                word, _, count = tag.rpartition(" ")
                if count.isdigit() and word.split(" ", 1)[0] in _ROW_TAGS:
                    head.rows += int(count)
            elif kind == 0x73:  # PortalSuspended: no tag, the rows sent so far
                head.rows += self.data_rows
            self.data_rows = 0
            if head.protocol != "simple":
                self._settle(settled)
        elif kind == 0x45:  # E: ErrorResponse
            fields = w.error_fields(buffer[start:end])
            if head is None or head.protocol == "sync":
                return
            head.sqlstate = fields.get("C")
            if head.protocol != "simple":
                self._settle(settled)
                self._skip_to_sync = True
        elif kind == 0x5A:  # Z: ReadyForQuery settles everything up to a Sync
            while queries:
                query = queries.popleft()
                if query.protocol == "sync":
                    break
                if query.protocol == "simple" or not self._skip_to_sync:
                    settled.append(query)
            self._skip_to_sync = False
            if not queries:
                self.busy_since = None
        elif kind == 0x53 and self.read_only:  # S: ParameterStatus
            body = buffer[start:end]
            name, pos = w.read_cstring(body, 0)
            value, _ = w.read_cstring(body, pos)
            if name == "default_transaction_read_only" and value != "on":
                raise _Terminate(
                    "25006",
                    "tokenward: this token may only read; the session was made read-write "
                    "and is closed",
                )

    def _settle(self, settled: list[_Query]) -> None:
        settled.append(self.queries.popleft())

    # -- ending -----------------------------------------------------------------------------

    def _send_error(self, code: str, message: str) -> None:
        with contextlib.suppress(Exception):
            self.writer.write(w.error_response(code, message))

    def terminate(self, code: str, message: str) -> None:
        """End the session: an ErrorResponse to the client (when it is between messages),
        Terminate to the upstream, both sockets closed."""
        if not self.closing and not self.streaming:
            self._send_error(code, message)
        self.close()

    def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        with contextlib.suppress(Exception):
            self.writer.close()
        if self.upstream is not None:
            with contextlib.suppress(Exception):
                self.upstream.writer.write(w.message(b"X"))
                self.upstream.writer.close()
        if self.done is not None and not self.done.done():
            self.done.set_result(None)

    def side_lost(self, client: bool) -> None:
        if client or self.client_terminated:
            self.close()
        else:
            self.terminate("57P01", "tokenward: the database server closed the connection")


class _Side(asyncio.Protocol):
    """One socket of a relayed session: what it receives goes to the session, and when it
    cannot take more writes, the other socket stops being read."""

    def __init__(self, session: Session, *, client: bool) -> None:
        self.session = session
        self.client = client

    def data_received(self, data: bytes) -> None:
        if self.client:
            self.session._on_client(data)
        else:
            self.session._on_server(data)

    def eof_received(self) -> bool:
        return False  # the transport closes itself; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.session.side_lost(self.client)

    def pause_writing(self) -> None:
        session = self.session
        if self.client:  # the client is slow to read: stop reading the server
            session._pause_upstream("client")
        elif session.client_transport is not None:  # the server is slow: stop the client
            session.client_transport.pause_reading()

    def resume_writing(self) -> None:
        session = self.session
        if self.client:
            session._resume_upstream("client")
        elif session.client_transport is not None and not session.client_transport.is_closing():
            session.client_transport.resume_reading()
