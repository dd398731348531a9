"""MCP servers behind the gateway: each JSON-RPC message decided by its own scope.

A route with ``mcp = "<server>"`` fronts a Model Context Protocol server over the Streamable
HTTP transport (one endpoint: ``POST`` for client messages, ``GET`` for the server's stream,
``DELETE`` to end a session; ``Mcp-Session-Id`` passes through both ways). The HTTP request
itself is decided as on any route, with the route's base scope ``mcp:<server>:connect``
(the token's state, IP allowlist, rate limits and uses). Then each JSON-RPC request in a
``POST`` (one message or a batch) needs the scope of what it does:

===========================================  ===========================================
``tools/call`` of ``search``                 ``mcp:<server>:tools/call:search``
``resources/read`` (and ``/subscribe``) of   ``mcp:<server>:resources/read:<uri>``
``prompts/get`` of ``summary``               ``mcp:<server>:prompts/get:summary``
lifecycle and listing (``initialize``,       the base scope alone
``ping``, ``notifications/*``, ``*/list``)
any other method ``m``                       ``mcp:<server>:m``
===========================================  ===========================================

A name or URI that cannot be one scope segment (a URI with ``:``, more than 64 characters)
needs the family's wildcard (``mcp:<server>:resources/read:*``): only a token that may do all
of them may do that one. A denied request never reaches the server: it is answered with a
JSON-RPC error of the same id (code :data:`DENIED`), and audited (source ``mcp``, method,
the tool's name as the resource, the scope, reason ``insufficient_scope``), so the scope
probing detector counts it. An allowed call is audited when its answer arrives, with the call's
duration. ``tools/list``, ``prompts/list`` and ``resources/list`` answers, JSON or
server-sent events, are filtered to what the token may call. Server-sent events stream
through event by event; nothing is held but the event being read.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from multidict import CIMultiDict

from tokenward.events import AccessEvent
from tokenward.gateway.enforce import Enforcement, Outcome
from tokenward.tokens.model import Reason, TokenRecord
from tokenward.tokens.scopes import ScopeError, parse_scope, scopes_allow
from tokenward.verify import Decision

#: The JSON-RPC error code of a denied request (implementation-defined server error range).
DENIED = -32003
#: Messages in one batch at most (a larger batch is refused as an invalid request).
MAX_BATCH = 64
#: Methods that need only the base scope (``notifications/*`` too).
_BASE_METHODS = frozenset(
    {
        "initialize",
        "ping",
        "tools/list",
        "prompts/list",
        "resources/list",
        "resources/templates/list",
        "completion/complete",
        "logging/setLevel",
    }
)
#: method → (the scope's family, the parameter naming what it acts on)
_ITEM_METHODS: dict[str, tuple[str, str]] = {
    "tools/call": ("tools/call", "name"),
    "resources/read": ("resources/read", "uri"),
    "resources/subscribe": ("resources/read", "uri"),
    "resources/unsubscribe": ("resources/read", "uri"),
    "prompts/get": ("prompts/get", "name"),
}
#: list method → (the method that uses a listed item, the result's list)
_LISTS: dict[str, tuple[str, str]] = {
    "tools/list": ("tools/call", "tools"),
    "prompts/list": ("prompts/get", "prompts"),
    "resources/list": ("resources/read", "resources"),
}
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_LINE = re.compile(rb"\r\n|\n|\r")


def base_scope(server: str) -> str:
    return f"mcp:{server}:connect"


def required_scope(server: str, method: str, params: object) -> str:
    """The scope a JSON-RPC request of ``method`` with ``params`` needs on ``server``."""
    if method in _BASE_METHODS or method.startswith("notifications/"):
        return base_scope(server)
    item = _ITEM_METHODS.get(method)
    if item is None:
        return _scope_or(f"mcp:{server}:{method}", f"mcp:{server}:*")
    family, key = item
    value = params.get(key) if isinstance(params, dict) else None
    wildcard = f"mcp:{server}:{family}:*"
    if not isinstance(value, str) or value == "*":
        return wildcard
    return _scope_or(f"{wildcard[:-1]}{value}", wildcard)


def _scope_or(scope: str, fallback: str) -> str:
    try:
        parse_scope(scope)
    except ScopeError:
        return fallback
    return scope


@dataclass(slots=True)
class _Call:
    """An allowed request whose answer is awaited (to audit it, or to filter a list)."""

    method: str
    target: str
    scope: str
    started: float


@dataclass(slots=True)
class Exchange:
    """One ``POST`` of JSON-RPC messages: what goes upstream, and what comes back."""

    enforcement: Enforcement
    server: str
    token: TokenRecord
    request_id: str
    client_ip: str | None
    user_agent: str | None
    #: the body for the upstream (``None``: send nothing, answer with :attr:`answer`)
    body: bytes | None = None
    answer: web.Response | None = None
    #: JSON id (as JSON text) → awaited item call; id → list method
    calls: dict[str, _Call] = field(default_factory=dict)
    lists: dict[str, str] = field(default_factory=dict)
    #: error answers of the denied requests, to merge into the upstream's answer
    errors: list[dict[str, Any]] = field(default_factory=list)
    batch: bool = False
    _mode: str = ""  # "sse", "json" or "" (passed as it is)
    _carry: bytes = b""
    _errors_sent: bool = False

    # -- the request ---------------------------------------------------------------------

    async def decide(self, raw: bytes) -> None:
        """Decide each message of ``raw``; set :attr:`body` or :attr:`answer`."""
        try:
            parsed = json.loads(raw, object_pairs_hook=_unique_keys)
        except (ValueError, UnicodeDecodeError):
            self.answer = _jsonrpc_answer(400, _error_message(None, -32700, "parse error"))
            return
        self.batch = isinstance(parsed, list)
        messages = parsed if self.batch else [parsed]
        if not messages or len(messages) > MAX_BATCH:
            problem = "empty batch" if not messages else f"a batch holds at most {MAX_BATCH}"
            self.answer = _jsonrpc_answer(400, _error_message(None, -32600, problem))
            return
        forward: list[object] = []
        now = time.perf_counter()
        for message in messages:
            method = message.get("method") if isinstance(message, dict) else None
            if not isinstance(method, str):
                forward.append(message)  # a response to the server, or invalid: its business
                continue
            assert isinstance(message, dict)
            params = message.get("params")
            scope = required_scope(self.server, method, params)
            has_id = "id" in message
            key = json.dumps(message.get("id"))
            target = _target(method, params)
            if not scopes_allow(self.token.scopes, scope):
                await self._audit(method, target, scope, allowed=False, latency_ms=0.0)
                if has_id:
                    self.errors.append(_denied(message.get("id"), scope))
                continue
            forward.append(message)
            if has_id and method in _ITEM_METHODS:
                self.calls[key] = _Call(method, target, scope, now)
            elif has_id and method in _LISTS:
                self.lists[key] = method
        if not forward:
            answer = self.errors if self.batch else (self.errors[0] if self.errors else None)
            self.answer = _jsonrpc_answer(200, answer) if answer else web.Response(status=202)
        elif len(forward) == len(messages):
            self.body = raw  # nothing removed: the bytes as sent
        else:
            self.body = json.dumps(forward, separators=(",", ":")).encode()

    # -- the answer (the gateway's body filter) ------------------------------------------

    def start(self, status: int, headers: CIMultiDict[str]) -> int:
        """Look at the upstream's status and headers; the status to answer with."""
        kind = headers.get("Content-Type", "").partition(";")[0].strip().lower()
        if kind == "text/event-stream":
            self._mode = "sse"
        elif kind == "application/json":
            self._mode = "json"
        if self.errors and status == 202:
            # the allowed messages needed no answer, the denied ones do
            headers["Content-Type"] = "application/json"
            self._mode = "json"
            return 200
        return status

    async def feed(self, chunk: bytes) -> bytes:
        if self._mode == "json":
            self._carry += chunk  # one JSON answer, bounded by max_response_bytes
            return b""
        out = b""
        if self._mode == "sse" and self.errors and not self._errors_sent:
            self._errors_sent = True
            out = b"".join(_sse_event(e) for e in self.errors)
        if self._mode != "sse" or not (self.calls or self.lists):
            return out + self._take_carry() + chunk  # nothing awaited: passed as it comes
        data = self._carry + chunk
        ends = list(_EVENT_END.finditer(data))
        if not ends:
            self._carry = data
            return out
        last = ends[-1].end()
        self._carry = data[last:]
        start = 0
        parts = [out]
        for end in ends:
            parts.append(await self._event(data[start : end.end()]))
            start = end.end()
        return b"".join(parts)

    async def end(self) -> bytes:
        if self._mode == "json":
            raw, self._carry = self._carry, b""
            return await self._json_answer(raw)
        out = self._take_carry()
        if self.errors and not self._errors_sent:
            self._errors_sent = True
            out += b"".join(_sse_event(e) for e in self.errors)
        await self.finish()
        return out

    async def finish(self) -> None:
        """Audit the allowed calls whose answer never came (the exchange failed)."""
        calls, self.calls = self.calls, {}
        for call in calls.values():
            await self._answered(call)

    def _take_carry(self) -> bytes:
        carry, self._carry = self._carry, b""
        return carry

    async def _event(self, event: bytes) -> bytes:
        lines = _LINE.split(event.rstrip(b"\r\n"))
        data = [line[5:].removeprefix(b" ") for line in lines if line.startswith(b"data:")]
        if not data:
            return event
        try:
            message = json.loads(b"\n".join(data))
        except (ValueError, UnicodeDecodeError):
            return event
        changed = await self._answer(message)
        if not changed:
            return event
        kept = [line for line in lines if not line.startswith(b"data:")]
        body = json.dumps(message, separators=(",", ":")).encode()
        return b"\n".join([*kept, b"data: " + body]) + b"\n\n"

    async def _json_answer(self, raw: bytes) -> bytes:
        try:
            parsed = json.loads(raw) if raw.strip() else None
        except (ValueError, UnicodeDecodeError):
            await self.finish()
            return raw
        changed = False
        for message in parsed if isinstance(parsed, list) else [parsed]:
            changed = await self._answer(message) or changed
        await self.finish()
        if self.errors:
            if parsed is None:
                parsed = self.errors if self.batch else self.errors[0]
            else:
                parsed = [*(parsed if isinstance(parsed, list) else [parsed]), *self.errors]
            changed = True
        return json.dumps(parsed, separators=(",", ":")).encode() if changed else raw

    async def _answer(self, message: object) -> bool:
        """Audit or filter one answer from the server; whether it was changed."""
        if not isinstance(message, dict) or "id" not in message or "method" in message:
            return False
        key = json.dumps(message["id"])
        call = self.calls.pop(key, None)
        if call is not None:
            await self._answered(call)
            return False
        method = self.lists.pop(key, None)
        result = message.get("result")
        if method is None or not isinstance(result, dict):
            return False
        use, items = _LISTS[method]
        listed = result.get(items)
        if not isinstance(listed, list):
            return False
        result[items] = [
            item
            for item in listed
            if isinstance(item, dict)
            and scopes_allow(self.token.scopes, required_scope(self.server, use, item))
        ]
        return len(result[items]) != len(listed)

    async def _answered(self, call: _Call) -> None:
        latency = (time.perf_counter() - call.started) * 1000
        await self._audit(call.method, call.target, call.scope, allowed=True, latency_ms=latency)

    async def _audit(
        self, method: str, target: str, scope: str, *, allowed: bool, latency_ms: float
    ) -> None:
        enforcement = self.enforcement
        reason = Reason.OK if allowed else Reason.INSUFFICIENT_SCOPE
        await enforcement.events.access(
            AccessEvent(
                at=enforcement.verifier.clock(),
                source="mcp",
                decision=Decision(allowed, reason, self.token),
                request_id=self.request_id,
                client_ip=self.client_ip,
                user_agent=self.user_agent,
                method=method[:16],
                path=target[:2048],
                scope=scope,
                latency_ms=latency_ms,
            )
        )


def exchange(
    enforcement: Enforcement,
    outcome: Outcome,
    *,
    request_id: str,
    client_ip: str | None,
    user_agent: str | None,
) -> Exchange:
    """The exchange of an allowed ``POST`` to an MCP route."""
    route, token = outcome.route, outcome.decision.token
    assert route is not None and route.mcp is not None and token is not None
    return Exchange(enforcement, route.mcp, token, request_id, client_ip, user_agent)


#: Seconds between the checks of a token holding a server stream open (``GET``).
STREAM_RECHECK = 1.0


def watch_stream(
    enforcement: Enforcement,
    outcome: Outcome,
    handler: asyncio.Task[Any],
    *,
    request_id: str,
    client_ip: str | None,
    user_agent: str | None,
) -> asyncio.Task[None]:
    """Check the token of an open server stream every :data:`STREAM_RECHECK` seconds; once
    it is revoked, expired, quarantined or out of uses, audit that and end the stream (by
    cancelling ``handler``, the request's task). Cancel the returned task when it ends."""
    route, token, credential = outcome.route, outcome.decision.token, outcome.credential
    assert route is not None and token is not None and credential is not None

    async def check() -> None:
        verifier = enforcement.verifier
        while True:
            await asyncio.sleep(STREAM_RECHECK)
            decision = await verifier.verify(
                credential,
                scope=outcome.scope,
                ip=client_ip,
                project=route.project,
                environment=route.environment,
                consume=False,  # a check, not a use: no rate-limit hit, no use spent
            )
            if not decision.allowed:
                await enforcement.events.access(
                    AccessEvent(
                        at=verifier.clock(),
                        source="mcp",
                        decision=Decision(False, decision.reason, decision.token or token),
                        request_id=request_id,
                        client_ip=client_ip,
                        user_agent=user_agent,
                        method="GET",
                        path=route.path,
                        scope=outcome.scope,
                    )
                )
                handler.cancel()
                return

    return asyncio.ensure_future(check())


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object without repeated keys: parsers disagree on which one counts (the first,
    the last), so ``{"name": "search", "name": "delete_records"}`` is refused, not read."""
    found = dict(pairs)
    if len(found) != len(pairs):
        raise ValueError("a key is repeated")
    return found


def _target(method: str, params: object) -> str:
    """What a request acts on, for the audit trail: the tool, prompt or URI, else the method."""
    item = _ITEM_METHODS.get(method)
    if item is not None and isinstance(params, dict):
        value = params.get(item[1])
        if isinstance(value, str):
            return value
    return method


def _denied(request_id: object, scope: str) -> dict[str, Any]:
    return _error_message(
        request_id,
        DENIED,
        f"forbidden: the token lacks the scope {scope}",
        {"error": "insufficient_scope", "scope": scope},
    )


def _error_message(
    request_id: object, code: int, message: str, data: object = None
) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return {"jsonrpc": "2.0", "id": request_id, "error": error}


def _jsonrpc_answer(status: int, body: object) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps(body, separators=(",", ":")).encode(),
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


def _sse_event(message: dict[str, Any]) -> bytes:
    return b"event: message\ndata: " + json.dumps(message, separators=(",", ":")).encode() + b"\n\n"
