"""What happened: access decisions and admin actions, fanned out to subscribers.

Call sites (the verify API, introspection, admin authentication, ``/authz``, the gateways)
build one :class:`AccessEvent` per decision, the one record of it that the audit row, the
metrics and the detectors are all made from, and ``await`` :meth:`EventBus.access`.
Subscribers (the audit writer, metrics, anomaly detectors, the failed-credential count) see
it in turn, so a subscriber that must make an event durable before the request is
acknowledged can do so.

A subscriber may also take an event without a coroutine: ``access_nowait(event)`` returns
``True`` when it has taken it (queued, counted, joined a batch; what the request must wait
for is in its waits, :mod:`tokenward.audit.durable`), ``False`` when the event needs
``await access(event)`` after all. That is the common case on the hot paths, where a
coroutine per subscriber per decision was a measurable part of a decision's cost.
"""

from __future__ import annotations

import itertools
import os
import re
import secrets
from collections.abc import Callable, Coroutine
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from tokenward.tokens.format import holds_token, redact_tokens
from tokenward.verify import Decision


@dataclass(slots=True)
class AccessEvent:
    """One access decision, allow or deny. Never holds the presented secret."""

    at: datetime
    source: str  # verify_api | introspect | admin_auth | authz | gateway | postgres
    decision: Decision
    request_id: str
    client_ip: str | None = None
    user_agent: str | None = None
    method: str | None = None
    path: str | None = None
    scope: str | None = None
    latency_ms: float = 0.0
    #: keyed fingerprint of the presented credential when it matched no token
    fingerprint: str | None = None
    #: who asked for the decision, when not the token's holder (the verify API's caller)
    actor_id: str | None = None
    #: the project whose caller reported ``client_ip`` (the verify API's ``ip`` from a
    #: project-bound caller): that word counts, and may block, in that project only
    ip_reported_by: str | None = None
    #: what else the audit record keeps (merged into its ``detail``; JSON values only), e.g.
    #: a PostgreSQL query's command tag, row count and SQLSTATE
    detail: dict[str, Any] | None = None


@dataclass(slots=True)
class AdminEvent:
    """One admin action (create, rotate, revoke, …)."""

    at: datetime
    action: str
    actor_id: str | None
    project_id: str | None = None
    token_id: str | None = None
    request_id: str | None = None
    client_ip: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class SecurityEvent:
    """Something suspicious seen outside the access path (e.g. a refresh token reused).

    Anomaly handling turns these, like suspicious access events, into alerts and responses.
    """

    at: datetime
    kind: str  # e.g. refresh_token_reuse
    severity: str  # info | warning | critical
    project_id: str | None = None
    token_id: str | None = None
    client_ip: str | None = None
    evidence: dict[str, Any] = field(default_factory=dict)


class EventSink(Protocol):
    async def access(self, event: AccessEvent) -> None: ...

    async def admin(self, event: AdminEvent) -> None: ...

    async def security(self, event: SecurityEvent) -> None: ...


class EventBus:
    """Fans events out to every subscriber, in subscription order."""

    def __init__(self) -> None:
        self.subscribers: list[EventSink] = []

    def subscribe(self, sink: EventSink) -> None:
        self.subscribers.append(sink)

    async def access(self, event: AccessEvent) -> None:
        for sink in self.subscribers:
            nowait = getattr(sink, "access_nowait", None)
            if nowait is None or not nowait(event):
                await sink.access(event)

    def publish(self, event: AccessEvent) -> list[Coroutine[Any, Any, None]]:
        """Hand ``event`` to every subscriber that takes it without waiting; the coroutines
        of the others, to be awaited in order (usually none)."""
        rest: list[Coroutine[Any, Any, None]] = []
        for sink in self.subscribers:
            nowait: Callable[[AccessEvent], bool] | None = getattr(sink, "access_nowait", None)
            if rest or nowait is None or not nowait(event):
                rest.append(sink.access(event))
        return rest

    async def admin(self, event: AdminEvent) -> None:
        for sink in self.subscribers:
            await sink.admin(event)

    async def security(self, event: SecurityEvent) -> None:
        for sink in self.subscribers:
            await sink.security(event)


class IdSource:
    """Unique ids without a system call each: a random per-process prefix and a counter.

    Ids name things (requests, events); they are not secrets. A forked child draws a new
    prefix, so two processes never hand out the same id.
    """

    def __init__(self, tag: str, prefix_bytes: int) -> None:
        self.tag = tag
        self.prefix_bytes = prefix_bytes
        self.reseed()
        os.register_at_fork(after_in_child=self.reseed)

    def reseed(self) -> None:
        self.prefix = self.tag + secrets.token_hex(self.prefix_bytes)
        self.counter = itertools.count(1)


_REQUEST_IDS = IdSource("req_", 8)


def new_request_id() -> str:
    """``req_``, 16 random hex digits per process, and a counter (8 hex digits or more)."""
    return f"{_REQUEST_IDS.prefix}{next(_REQUEST_IDS.counter):08x}"


_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


def request_id_from(sent: str | None) -> str:
    """The request id a client sent (``X-Request-ID``), if it is sane and holds no token
    (it is logged, audited and echoed); else a new one."""
    if sent and _SANE_REQUEST_ID.fullmatch(sent) and not holds_token(sent):
        return sent
    return new_request_id()


def recorded_header(value: bytes | str | None, size: int = 256) -> str | None:
    """A header's value as tokenward records it (user agent, …): at most ``size``
    characters, with every token-shaped string cut out before it is cut to size."""
    if value is None:
        return None
    text = value[: 4 * size]
    if isinstance(text, bytes):
        text = text.decode("latin-1")
    return redact_tokens(text)[:size]


@dataclass(frozen=True, slots=True)
class RequestContext:
    """Who is asking, set once per HTTP request by the request-id middleware."""

    request_id: str
    client_ip: str | None = None
    user_agent: str | None = None


current_request: ContextVar[RequestContext | None] = ContextVar("current_request", default=None)
