"""PostgreSQL through tokenward: a wire-protocol listener in front of a real server.

A client connects with any driver, the tokenward token as its password. One connection:

1. startup: ``SSLRequest`` (TLS with the API's certificate, or ``N``), ``GSSENCRequest``
   (``N``), ``CancelRequest`` (relayed to the upstream backend of the session whose key it
   names), then the startup packet;
2. a cleartext password is asked only inside TLS or from a loopback address; the password
   is the token (docs/decisions/0026-postgres-gateway-authentication.md);
3. :meth:`Verifier.verify` decides, with the listener's ``write_scope`` first, then its
   ``read_scope`` (the scope check comes before any counting, so one connection counts once);
   then the per-token connection limit;
4. tokenward logs in to the upstream as its own role (SCRAM-SHA-256, MD5 or cleartext, with
   the password of ``password_file``/``password_env``); a read-only session starts with
   ``default_transaction_read_only=on`` in the startup packet, so ``RESET``/``DISCARD ALL``
   return to read-only too;
5. the connection's access event is written (allow or deny, with the reason), then the
   client gets ``AuthenticationOk``, the server's parameters, a ``BackendKeyData`` of
   tokenward's own and ``ReadyForQuery`` — or an ``ErrorResponse`` that says why;
6. messages are relayed whole in both directions; each query (``Query``, or ``Execute`` of
   the extended protocol) gives one access event with its redacted text, command tag, rows,
   SQLSTATE and duration. A read-only session's attempts to turn read-write are refused,
   and a server report that its ``default_transaction_read_only`` went off ends the session.

Sessions are re-checked when the verifier invalidates their token (revoke, rotation,
quarantine: locally or through the fan-out), at their token's expiry and every
``recheck_interval``; a session whose token is no longer good ends with ``57P01``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import secrets
import ssl
import struct
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, cast

import structlog

from tokenward.events import AccessEvent, new_request_id
from tokenward.gateway import pgwire as w
from tokenward.gateway.config import PostgresListener
from tokenward.gateway.enforce import FAILURE_REASONS, Enforcement, Outcome
from tokenward.gateway.pgsql import leaves_read_only, redact, verb
from tokenward.tokens.model import Reason, TokenRecord
from tokenward.verify import Decision

log = structlog.get_logger("tokenward.gateway.postgres")

#: seconds a client has from connecting to being logged in
LOGIN_TIMEOUT = 15.0
#: connections that may be logging in at once on a listener, besides its max_connections
PENDING_LOGINS = 16
#: the sweeper's period (idle and statement timeouts, expiry)
SWEEP_SECONDS = 0.5
#: a server message larger than this streams through without being held whole
HOLD_SERVER_MESSAGE = 256 * 1024
#: audit events of one session submitted and not yet settled, before the relay waits
AUDIT_IN_FLIGHT = 128
#: prepared statements and portals remembered per session (for the audit text)
STATEMENTS_KEPT = 4096
_INT32 = struct.Struct("!i")
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


class UpstreamRefused(Exception):
    """The upstream server refused tokenward's login (its ErrorResponse fields)."""

    def __init__(self, fields: dict[str, str]) -> None:
        super().__init__(fields.get("M", "refused"))
        self.fields = fields


@dataclass(slots=True)
class Upstream:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    pid: int
    key: int
    status: bytes
    #: the server's ParameterStatus messages, as sent
    parameters: bytes


async def _open(
    listener: PostgresListener, context: ssl.SSLContext | None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(listener.upstream_host, listener.upstream_port)
    if listener.upstream_sslmode != "disable":
        writer.write(_INT32.pack(8) + _INT32.pack(w.SSL_REQUEST))
        answer = await reader.readexactly(1)
        if answer != b"S":
            writer.close()
            raise UpstreamRefused({"M": "the upstream server does not accept TLS"})
        assert context is not None
        await writer.start_tls(context, server_hostname=listener.upstream_host)
    return reader, writer


async def login(
    listener: PostgresListener,
    password: str | None,
    params: dict[str, str],
    salted: dict[tuple[str, int], bytes],
    context: ssl.SSLContext | None,
) -> Upstream:
    """Connect and log in to the listener's upstream as tokenward's own role."""
    reader, writer = await _open(listener, context)
    try:
        startup = {"user": listener.upstream_user, "database": listener.upstream_database}
        writer.write(w.startup_packet({**startup, **params}))
        scram: w.ScramClient | None = None
        parameters: list[bytes] = []
        pid = key = 0
        while True:
            header = await reader.readexactly(5)
            kind, length = header[:1], _INT32.unpack_from(header, 1)[0]
            if not 4 <= length <= 1 << 20:
                raise w.ProtocolError("the upstream sent a malformed message")
            body = await reader.readexactly(length - 4)
            if kind == b"R":
                code = _INT32.unpack_from(body)[0]
                if code == w.AUTH_OK:
                    continue
                if password is None:
                    raise UpstreamRefused(
                        {"M": "the upstream asks for a password: set password_file or password_env"}
                    )
                if code == w.AUTH_CLEARTEXT:
                    writer.write(w.password_message(w.cstring(password)))
                elif code == w.AUTH_MD5:
                    salt = body[4:8]
                    writer.write(
                        w.password_message(w.md5_password(listener.upstream_user, password, salt))
                    )
                elif code == w.AUTH_SASL:
                    if w.SCRAM.encode() not in body[4:].split(b"\x00"):
                        raise UpstreamRefused({"M": "the upstream offers no SCRAM-SHA-256"})
                    scram = w.ScramClient(password, salted)
                    writer.write(w.password_message(scram.first()))
                elif code == w.AUTH_SASL_CONTINUE and scram is not None:
                    writer.write(w.password_message(scram.final(body[4:].decode())))
                elif code == w.AUTH_SASL_FINAL and scram is not None:
                    scram.verify(body[4:].decode())
                else:
                    raise UpstreamRefused({"M": f"unsupported upstream authentication {code}"})
            elif kind == b"E":
                raise UpstreamRefused(w.error_fields(body))
            elif kind == b"S":
                parameters.append(header + body)
            elif kind == b"K":
                pid, key = _PAIR.unpack_from(body)
            elif kind == b"Z":
                return Upstream(reader, writer, pid, key, body[:1], b"".join(parameters))
            # NoticeResponse, NegotiateProtocolVersion: nothing to do
    except BaseException:
        writer.close()
        raise


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
    audits: set[asyncio.Future[None]] = field(default_factory=set)
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
        except (asyncio.IncompleteReadError, ConnectionError):
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
        self.gateway.register(self)
        await self._connection_event(decision, {}, started)
        upstream = self.upstream
        assert upstream is not None
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
        if decision.reason in FAILURE_REASONS and ip:
            await enforcement.count_failure(ip)
        return decision

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
        future = asyncio.ensure_future(self.gateway.enforcement.events.access(event))
        self.audits.add(future)
        future.add_done_callback(self._audited)
        if len(self.audits) >= AUDIT_IN_FLIGHT:  # back-pressure: stop reading, never drop
            self._pause_upstream("audit")

    def _audited(self, future: asyncio.Future[None]) -> None:
        self.audits.discard(future)
        if not future.cancelled() and (exc := future.exception()) is not None:
            log.error("postgres_audit_failed", error=str(exc))
            self.terminate("57P01", "tokenward: the audit log is unavailable; session closed")
        elif len(self.audits) <= AUDIT_IN_FLIGHT // 2:
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
        return None  # X: Terminate, forwarded

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
        if client:
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


class PostgresGateway:
    """The ``[[postgres]]`` listeners of a policy, sharing the gateway's enforcement."""

    def __init__(
        self,
        enforcement: Enforcement,
        listeners: Iterable[PostgresListener],
        ssl_context: ssl.SSLContext | None = None,
        *,
        allow_insecure: bool = False,
        recheck_interval: float | None = None,
        reuse_port: bool = False,
    ) -> None:
        self.enforcement = enforcement
        self.listeners = list(listeners)
        self.ssl_context = ssl_context
        #: for upstreams with sslmode=require (no verification) or verify-full
        self.upstream_tls: ssl.SSLContext | None = None
        self.allow_insecure = allow_insecure
        verifier = enforcement.verifier
        self.recheck_interval = recheck_interval or max(1.0, verifier.cache_ttl)
        self.reuse_port = reuse_port
        self.passwords: dict[str, str | None] = {}
        self.salted: dict[str, dict[tuple[str, int], bytes]] = {}
        self.ports: dict[str, int] = {}
        self.sessions: set[Session] = set()
        self._by_token: dict[str, set[Session]] = {}
        self._by_pid: dict[int, Session] = {}
        self._servers: list[asyncio.Server] = []
        self._handlers: set[asyncio.Task[Any]] = set()
        #: connections being served per listener, logged in or not
        self._open: dict[str, int] = {}
        self._checks: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self._pending: set[str] = set()
        self._recheck_all = False

    def plain_allowed(self, client_ip: str | None) -> bool:
        return self.allow_insecure or is_loopback(client_ip)

    async def start(self) -> None:
        """Read the upstream passwords, then listen on every listener's address."""
        for listener in self.listeners:
            self.passwords[listener.name] = listener.upstream_password()
        if any(listener.upstream_sslmode != "disable" for listener in self.listeners):
            self.upstream_tls = ssl.create_default_context()
            if all(x.upstream_sslmode != "verify-full" for x in self.listeners):
                self.upstream_tls.check_hostname = False
                self.upstream_tls.verify_mode = ssl.CERT_NONE
        for listener in self.listeners:

            async def handle(
                reader: asyncio.StreamReader,
                writer: asyncio.StreamWriter,
                listener: PostgresListener = listener,
            ) -> None:
                await self._serve(listener, reader, writer)

            server = await asyncio.start_server(
                handle, listener.host, listener.port, reuse_port=self.reuse_port or None
            )
            self._servers.append(server)
            self.ports[listener.name] = server.sockets[0].getsockname()[1]
        self.enforcement.verifier.invalidation_listeners.append(self._invalidated)
        self._sweeper = asyncio.create_task(self._sweep_forever())

    async def aclose(self) -> None:
        with contextlib.suppress(ValueError):
            self.enforcement.verifier.invalidation_listeners.remove(self._invalidated)
        for server in self._servers:
            server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for session in list(self.sessions):
            session.terminate("57P01", "tokenward is shutting down")
        for task in (*self._handlers, *self._checks):
            task.cancel()
        await asyncio.gather(*self._handlers, *self._checks, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()

    async def _serve(
        self, listener: PostgresListener, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        peer = writer.get_extra_info("peername")
        session = Session(self, listener, reader, writer, peer[0] if peer else None)
        open_now = self._open.get(listener.name, 0)
        if open_now >= listener.max_connections + PENDING_LOGINS:
            # logged-in sessions and logins in progress together: a flood of connections
            # that never log in cannot take every socket
            session.terminate("53300", "tokenward: too many connections on this listener")
            return
        self._open[listener.name] = open_now + 1
        self._handlers.add(task)
        try:
            await session.run()
        except asyncio.CancelledError:
            pass
        except Exception as exc:  # a fault in one session never reaches another
            log.error("postgres_session_failed", error=repr(exc))
            session.terminate("XX000", "tokenward: internal error; session closed")
        finally:
            self.release(session)
            session.close()
            self._handlers.discard(task)
            self._open[listener.name] -= 1

    # -- sessions by token; cancel keys -----------------------------------------------------

    def reserve(self, session: Session) -> str | None:
        """Take a connection slot for the session's token; else the limit that refuses it."""
        token = session.token
        assert token is not None
        held = self._by_token.setdefault(token.id, set())
        listener = session.listener
        same = sum(1 for s in held if s.listener is listener)
        refused = None
        if same >= listener.max_connections_per_token:
            refused = "connections_per_token"
        elif sum(1 for s in self.sessions if s.listener is listener) >= listener.max_connections:
            refused = "connections"
        if refused is not None:
            if not held:
                del self._by_token[token.id]
            return refused
        held.add(session)
        self.sessions.add(session)
        return None

    def register(self, session: Session) -> None:
        while True:
            pid = secrets.randbelow((1 << 31) - 2) + 1
            if pid not in self._by_pid:
                break
        session.client_pid, session.client_key = pid, secrets.randbits(32) - (1 << 31)
        self._by_pid[pid] = session

    def release(self, session: Session) -> None:
        self.sessions.discard(session)
        token = session.token
        if token is not None:
            held = self._by_token.get(token.id)
            if held is not None:
                held.discard(session)
                if not held:
                    del self._by_token[token.id]
        if self._by_pid.get(session.client_pid) is session:
            del self._by_pid[session.client_pid]

    async def cancel(self, pid: int, key: int) -> None:
        """Relay a CancelRequest to the upstream backend of the session it names (only when
        the key matches: a guessed pid cancels nothing)."""
        session = self._by_pid.get(pid)
        if session is None or session.upstream is None:
            return
        if not hmac.compare_digest(_INT32.pack(key), _INT32.pack(session.client_key)):
            return
        await self._cancel_upstream(session)

    async def _cancel_upstream(self, session: Session) -> None:
        upstream = session.upstream
        assert upstream is not None
        try:
            async with asyncio.timeout(session.listener.connect_timeout):
                _, writer = await _open(session.listener, self.upstream_tls)
                writer.write(w.cancel_packet(upstream.pid, upstream.key))
                await writer.drain()
                writer.close()
        except (OSError, TimeoutError, UpstreamRefused) as exc:
            log.warning("postgres_cancel_failed", error=str(exc))

    # -- re-checks: invalidation, expiry, timeouts ------------------------------------------

    def _invalidated(self, token_id: str | None, project_id: str | None) -> None:
        if token_id is not None:
            if token_id in self._by_token:
                self._pending.add(token_id)
        elif project_id is not None:
            self._pending.update(
                t
                for t, held in self._by_token.items()
                if any(s.token is not None and s.token.project_id == project_id for s in held)
            )
        else:
            self._recheck_all = True
        if self._pending or self._recheck_all:
            task = asyncio.get_running_loop().create_task(self._recheck_pending())
            self._checks.add(task)
            task.add_done_callback(self._checks.discard)

    async def _recheck_pending(self) -> None:
        await asyncio.sleep(0)  # coalesce the invalidations of one change
        if self._recheck_all:
            self._recheck_all = False
            self._pending.clear()
            sessions = list(self.sessions)
        else:
            tokens, self._pending = self._pending, set()
            sessions = [s for t in tokens for s in self._by_token.get(t, ())]
        await self.recheck(sessions)

    async def recheck(self, sessions: Iterable[Session]) -> None:
        """Verify each session's token again (no use spent, nothing counted); end those
        whose token is no longer good. A store that cannot answer ends nothing: the next
        re-check asks again."""
        verifier = self.enforcement.verifier
        for session in sessions:
            if session.closing or session.ending or session.credential is None:
                continue
            listener = session.listener
            decision = await verifier.verify(
                session.credential,
                scope=session.scope,
                ip=session.client_ip,
                project=listener.project,
                environment=listener.environment,
                consume=False,
            )
            if decision.allowed or decision.reason in (Reason.USES_EXHAUSTED, Reason.UNAVAILABLE):
                if decision.token is not None and session.decision is not None:
                    session.decision.token = decision.token
                continue
            if session.closing or session.ending:
                continue  # another re-check got there first: one event per termination
            session.ending = True
            await session._connection_event(decision, {"terminated": True})
            session.terminate(
                "57P01",
                f"tokenward: terminating connection: {Outcome(decision).message} "
                f"({decision.reason.value})",
            )

    async def _sweep_forever(self) -> None:
        last_full = time.monotonic()
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            try:
                await self._sweep(last_full)
                if time.monotonic() - last_full >= self.recheck_interval:
                    last_full = time.monotonic()
                    await self.recheck(list(self.sessions))
            except Exception as exc:  # pragma: no cover - the sweeper must keep running
                log.error("postgres_sweep_failed", error=repr(exc))

    async def _sweep(self, _last_full: float) -> None:
        now = time.monotonic()
        wall = self.enforcement.verifier.clock()
        expired: list[Session] = []
        for session in list(self.sessions):
            listener = session.listener
            token = session.token
            if token is not None and (
                (token.expires_at is not None and token.expires_at <= wall)
                or (token.grace_until is not None and token.grace_until <= wall)
            ):
                expired.append(session)
                continue
            if session.busy_since is None:
                if listener.idle_timeout and now - session.last_activity > listener.idle_timeout:
                    session.terminate(
                        "57P05", "tokenward: terminating connection due to idle timeout"
                    )
            elif (
                listener.statement_timeout
                and not session.cancel_sent
                and now - session.busy_since > listener.statement_timeout + 1.0
                and session.upstream is not None
            ):
                session.cancel_sent = True  # the server's own timeout was lifted: cancel
                await self._cancel_upstream(session)
        if expired:
            await self.recheck(expired)
