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

Modules: this one holds the listeners, the sessions by token and by cancel key, and the
re-checks; :mod:`~tokenward.gateway.pgsession` one client connection (steps 1-6);
:mod:`~tokenward.gateway.pgupstream` the upstream login; :mod:`~tokenward.gateway.pgwire` the
message framing and SCRAM; :mod:`~tokenward.gateway.pgsql` the statement lexer.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import secrets
import ssl
import struct
import time
from collections.abc import Iterable
from typing import Any

import structlog

from tokenward.gateway import pgwire as w
from tokenward.gateway.config import PostgresListener
from tokenward.gateway.enforce import Enforcement, Outcome
from tokenward.gateway.pgsession import Session, is_loopback
from tokenward.gateway.pgupstream import UpstreamRefused, open_upstream
from tokenward.tokens.model import Reason

log = structlog.get_logger("tokenward.gateway.postgres")

#: connections that may be logging in at once on a listener, besides its max_connections
PENDING_LOGINS = 16
#: the sweeper's period (idle and statement timeouts, expiry)
SWEEP_SECONDS = 0.5
_INT32 = struct.Struct("!i")

__all__ = ["PENDING_LOGINS", "PostgresGateway", "Session"]


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
                _, writer = await open_upstream(session.listener, self.upstream_tls)
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
