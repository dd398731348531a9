"""OpenTelemetry traces: one span per request, set up by the standard ``OTEL_*`` variables.

Off unless asked for, and then free: with no exporter named (``OTEL_TRACES_EXPORTER`` unset
or ``none``, no OTLP endpoint given, or ``OTEL_SDK_DISABLED=true``) no tracing layer is built
at all, and the gateway's one check per request is ``is None``. On, the SDK does what it
does for every OTel user, read from the same variables:

* exporters by name (``console``, ``otlp``, any registered one; ``otlp`` speaks gRPC or
  HTTP as ``OTEL_EXPORTER_OTLP_PROTOCOL`` says, and needs ``pip install 'tokenward[otel]'``),
  their endpoints, headers and timeouts (``OTEL_EXPORTER_OTLP_*``);
* the sampler (``OTEL_TRACES_SAMPLER``, ``OTEL_TRACES_SAMPLER_ARG``), the resource
  (``OTEL_SERVICE_NAME``, default ``tokenward``; ``OTEL_RESOURCE_ATTRIBUTES``), batching
  (``OTEL_BSP_*``) and the propagators (``OTEL_PROPAGATORS``, W3C trace context by default).

One deliberate difference: the SDK's default exporter is ``otlp``; here, an install that never
asked for traces sends none (``OTEL_TRACES_EXPORTER`` unset means off, unless an OTLP endpoint
is set, which names the exporter by itself).

Each request of the API (uvicorn) and of the gateway (aiohttp) is one ``SERVER`` span,
a child of the client's ``traceparent`` when it sent one, named ``METHOD route``, with the
HTTP attributes of the semantic conventions and tokenward's own: ``tokenward.decision``,
``tokenward.reason``, ``tokenward.token.id`` (the public id, never the token),
``tokenward.project``, ``tokenward.source``, ``tokenward.route`` and ``tokenward.upstream``
(gateway), ``tokenward.audit.wait_ms`` and ``tokenward.upstream.latency_ms``. The decision's
attributes come from the access event (:class:`DecisionAttributes`, an event sink), so every
entry point that decides gets them without code of its own. The gateway sends the upstream
its own span as the parent (``traceparent``); the client's ``traceparent`` is forwarded
unchanged only when tracing is off.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from contextvars import ContextVar
from typing import Any

import structlog
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenward import __version__
from tokenward.events import AccessEvent, AdminEvent, SecurityEvent
from tokenward.tokens.format import redact_tokens

log = structlog.get_logger("tokenward.tracing")

#: The tracer of this process: ``None`` while tracing is off (see :func:`tracer`).
_tracer: Tracer | None = None
_configured = False


def tracer() -> Tracer | None:
    """The process's tracer, set up from the environment on first use; ``None`` when off."""
    if not _configured:
        configure()
    return _tracer


def configure(provider: TracerProvider | None = None) -> Tracer | None:
    """Turn tracing on with ``provider`` (tests, embedding), or as the environment says.

    Call it before the application is built: the tracing layers are put in place then (or
    not at all). A provider made from the environment becomes OTel's global one as well, so
    other instrumented libraries report into the same traces.
    """
    global _tracer, _configured
    _configured = True
    if provider is None:
        try:
            provider = provider_from_environment()
        except TracingUnavailable as exc:
            # Traces are for looking, not a control: the server runs without, and says so.
            log.error("tracing_unavailable", reason=str(exc))
            provider = None
        if provider is not None:
            trace.set_tracer_provider(provider)
    _tracer = provider.get_tracer("tokenward", __version__) if provider is not None else None
    return _tracer


def reset() -> None:
    """Tracing off; the environment is read again on the next :func:`tracer` call."""
    global _tracer, _configured
    _tracer, _configured = None, False


class TracingUnavailable(Exception):
    """The environment asks for an exporter that cannot be loaded."""


def exporter_names(environ: Mapping[str, str] = os.environ) -> list[str]:
    """The span exporters the environment names (empty: tracing off)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    names = environ.get("OTEL_TRACES_EXPORTER")
    endpoint = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"
    if names is None and any(environ.get(name) for name in endpoint):
        names = "otlp"
    if not names or names.strip().lower() == "none":
        return []
    return [name.strip() for name in names.split(",") if name.strip() and name.strip() != "none"]


def provider_from_environment() -> TracerProvider | None:
    """A tracer provider as the ``OTEL_*`` variables describe it, or ``None`` (off)."""
    names = exporter_names()
    if not names:
        return None
    # The SDK's own mapping of names to exporters (entry points; otlp → gRPC or HTTP by
    # OTEL_EXPORTER_OTLP_PROTOCOL), as its auto-configuration uses it.
    from opentelemetry.sdk._configuration import (
        _get_exporter_entry_point,
        _import_exporters,
    )

    try:
        chosen = [_get_exporter_entry_point(name, "traces") for name in names]
        exporters, _, _ = _import_exporters(chosen, [], [])
    except RuntimeError as exc:
        hint = " (the OTLP exporter: pip install 'tokenward[otel]')" if "otlp" in str(exc) else ""
        raise TracingUnavailable(f"OTEL_TRACES_EXPORTER={','.join(names)}: {exc}{hint}") from exc
    resource = Resource.create({SERVICE_VERSION: __version__})
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: "tokenward"}))
    provider = TracerProvider(resource=resource)  # sampler: OTEL_TRACES_SAMPLER, by the SDK
    for exporter in exporters.values():
        provider.add_span_processor(BatchSpanProcessor(exporter()))
    return provider


# -- the request being traced ------------------------------------------------------------


class RequestTrace:
    """The span of the request being served, and what its attributes are measured from."""

    __slots__ = ("_tokens", "audit_started", "decided", "decided_at", "method", "span")

    def __init__(self, span: Span, method: str) -> None:
        self.span = span
        self.method = method
        self._tokens: tuple[object, object] | None = None
        self.decided = False
        self.decided_at = 0.0  # perf_counter() when its (first) access event was queued
        self.audit_started = 0.0  # gateway: perf_counter() when recording began

    def audit_waited(self) -> None:
        """The gateway's audit wait: recording its decision, durably, took until now."""
        self.span.set_attribute(
            "tokenward.audit.wait_ms", round((time.perf_counter() - self.audit_started) * 1000, 3)
        )

    def answered(self) -> None:
        """The API's audit wait: from its access event being queued to its answer leaving
        (the wait for a durable audit record, plus the microseconds to write the answer)."""
        if self.decided_at:
            wait = (time.perf_counter() - self.decided_at) * 1000
            self.span.set_attribute("tokenward.audit.wait_ms", round(wait, 3))
            self.decided_at = 0.0


current: ContextVar[RequestTrace | None] = ContextVar("tokenward_trace", default=None)


def _getter_items(headers: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    """The propagation headers of a request (trace context and baggage), for extraction."""
    carrier: dict[str, str] = {}
    for name, value in headers:
        lower = name.lower()
        if lower in _PROPAGATION_HEADERS:
            carrier[lower.decode("latin-1")] = value.decode("latin-1")
    return carrier


_PROPAGATION_HEADERS = frozenset({b"traceparent", b"tracestate", b"baggage"})


def start_request(
    tr: Tracer,
    headers: Iterable[tuple[bytes, bytes]],
    method: str,
    path: str,
    attributes: dict[str, Any] | None = None,
) -> RequestTrace:
    """Start the ``SERVER`` span of a request (a child of the client's trace context, if it
    sent one) and make it current until :func:`end_request`."""
    parent = propagate.extract(_getter_items(headers))
    span = tr.start_span(
        method,
        context=parent,
        kind=SpanKind.SERVER,
        attributes={
            "http.request.method": method,
            "url.path": redact_tokens(path)[:256],
            **(attributes or {}),
        },
    )
    request = RequestTrace(span, method)
    attached = otel_context.attach(trace.set_span_in_context(span, parent))
    request._tokens = (attached, current.set(request))
    return request


def end_request(
    request: RequestTrace,
    status: int,
    route: str,
    error: BaseException | None = None,
) -> None:
    """End the request's span with its route and status (a 5xx or an exception: an error)."""
    span = request.span
    if request._tokens is not None:
        context_token, trace_token = request._tokens
        request._tokens = None
        current.reset(trace_token)  # type: ignore[arg-type]
        otel_context.detach(context_token)  # type: ignore[arg-type]
    span.update_name(f"{request.method} {route}")
    span.set_attribute("http.route", route)
    if status:
        span.set_attribute("http.response.status_code", status)
    if error is not None:
        span.record_exception(error)
        span.set_status(Status(StatusCode.ERROR, type(error).__name__))
    elif status >= 500 or not status:
        span.set_status(Status(StatusCode.ERROR))
    span.end()


def inject_headers(request: RequestTrace) -> list[bytes]:
    """The header lines (``traceparent``, ``tracestate``) that carry ``request``'s span on
    to an upstream: its span is their parent."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(request.span))
    lines: list[bytes] = []
    for name, value in carrier.items():
        lines += (name.encode("latin-1"), b": ", value.encode("latin-1"), b"\r\n")
    return lines


# -- the API: one ASGI layer ---------------------------------------------------------------


def api_route(scope: Scope) -> str:
    """The route a request of the API matched, as its template (bounded: never the path)."""
    route = scope.get("route")
    template = getattr(route, "path", None)
    if isinstance(template, str):
        return template
    path: str = scope.get("path", "")
    if path == "/v1/verify" or path == "/healthz":
        return path
    if path == "/authz" or path.startswith("/authz/"):
        return "/authz"
    return "unmatched"


class TracedApp:
    """Every HTTP request of ``app`` in a span of its own (the layer outside all others)."""

    def __init__(self, app: ASGIApp, tracer: Tracer) -> None:
        self.app = app
        self.tracer = tracer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        request = start_request(
            self.tracer,
            scope["headers"],
            scope["method"],
            scope["path"],
            {"client.address": client[0]} if client else None,
        )
        status = 0

        async def traced_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                request.answered()
            await send(message)

        error: BaseException | None = None
        try:
            await self.app(scope, receive, traced_send)
        except BaseException as exc:
            error = exc
            raise
        finally:
            end_request(request, status, api_route(scope), error)


def traced(app: ASGIApp) -> ASGIApp:
    """``app`` with a span per request when tracing is on; ``app`` itself when it is off."""
    tr = tracer()
    return app if tr is None else TracedApp(app, tr)


# -- decisions: attributes from the access events ----------------------------------------


class DecisionAttributes:
    """An event sink: the decision of the request being traced, as attributes of its span.

    The first access event of a request is its decision (``tokenward.decision``, …); later
    ones (an MCP request's messages, each decided by its own scope) become span events.
    Subscribed only while tracing is on.
    """

    async def access(self, event: AccessEvent) -> None:
        request = current.get()
        if request is None:
            return
        decision = event.decision
        token = decision.token
        attributes: dict[str, Any] = {
            "tokenward.decision": "allow" if decision.allowed else "deny",
            "tokenward.reason": decision.reason.value,
            "tokenward.source": event.source,
        }
        if token is not None:
            attributes["tokenward.token.id"] = token.id
            if token.project:
                attributes["tokenward.project"] = token.project
        if event.scope:
            attributes["tokenward.scope"] = event.scope
        if request.decided:
            request.span.add_event("tokenward.decision", attributes)
            return
        request.decided = True
        request.decided_at = time.perf_counter()
        request.span.set_attributes(attributes)

    async def admin(self, event: AdminEvent) -> None:
        return None

    async def security(self, event: SecurityEvent) -> None:
        return None
