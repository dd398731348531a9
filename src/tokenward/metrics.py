"""Prometheus metrics, fed by the event bus and read from the services at scrape time.

Each application gets its own registry (several apps may live in one process: tests,
embedding), with the process and platform collectors of prometheus-client. Names follow
Prometheus' conventions (counters end in ``_total``, durations are ``_seconds``); requests,
decisions and upstream answers are histograms per route and status, as Kong's are. Labels are
bounded sets (server, route template, status, source, outcome, reason, detector, severity,
action, upstream): a token, token id, path or IP address is never a label.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from prometheus_client import (
    GC_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenward.anomaly.store import Alert
from tokenward.events import AccessEvent, AdminEvent, SecurityEvent
from tokenward.tokens.model import Reason
from tokenward.tracing import api_route
from tokenward.verify import Verifier

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class _Durations:
    """One label set's buckets and sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last: above every bound (+Inf)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(self.bounds, seconds)] += 1  # the first bound >= seconds
        self.sum += seconds


class LatencyHistogram(Collector):
    """A Prometheus histogram for the durations observed on every request, exposed at
    scrape time exactly as prometheus-client's (``_bucket{le=…}``, ``_count``, ``_sum``).

    prometheus-client's ``Histogram.observe`` takes a lock for the sum and for a bucket on
    each call; requests are observed on one event loop thread (a worker is a process of its
    own), so a bucket index and two additions do (measured here: 14.8 µs against 2.0 µs on a
    loaded machine, about 7x; see decision 0032).
    """

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], buckets: Sequence[float]
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = list(labelnames)
        self.bounds = tuple(buckets)
        self._children: dict[tuple[str, ...], _Durations] = {}

    def labels(self, *values: str) -> _Durations:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = _Durations(self.bounds)
        return child

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in list(self._children.items()):
            cumulative, buckets = 0, []
            for bound, count in zip((*self.bounds, float("inf")), child.counts, strict=True):
                cumulative += count
                buckets.append(("+Inf" if bound == float("inf") else str(bound), cumulative))
            family.add_metric(list(values), buckets, child.sum)
        yield family


class _CacheCounters(Collector):
    """The verifier's cache hits and misses, counters read at scrape time."""

    def __init__(self) -> None:
        self.verifier: Verifier | None = None

    def collect(self) -> Iterator[Metric]:
        verifier = self.verifier
        hits = CounterMetricFamily("tokenward_cache_hits", "Verifier cache hits since start.")
        misses = CounterMetricFamily("tokenward_cache_misses", "Verifier cache misses since start.")
        hits.add_metric([], verifier.hits if verifier is not None else 0)
        misses.add_metric([], verifier.misses if verifier is not None else 0)
        yield hits
        yield misses


class Metrics:
    """The instruments, and an event sink that counts every decision and admin action."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        r.register(GC_COLLECTOR)
        self._access_children: dict[tuple[str, bool, Reason], tuple[Any, Any]] = {}
        self._request_children: dict[tuple[str, str, int], Any] = {}
        self._upstream_children: dict[tuple[str, str, int], Any] = {}
        self.requests = LatencyHistogram(
            "tokenward_http_request_duration_seconds",
            "HTTP requests by server (api, gateway), route template and status: time to the "
            "last byte of the answer.",
            ["server", "route", "status"],
            LATENCY_BUCKETS,
        )
        self.upstream_latency = LatencyHistogram(
            "tokenward_upstream_latency_seconds",
            "Gateway: from the request sent upstream to its answer's status line, by "
            "upstream, route template and upstream status.",
            ["upstream", "route", "status"],
            LATENCY_BUCKETS,
        )
        r.register(self.requests)
        r.register(self.upstream_latency)
        self.decisions = Counter(
            "tokenward_decisions",
            "Access decisions by where they were made, outcome and reason.",
            ["source", "outcome", "reason"],
            registry=r,
        )
        self.decision_latency = LatencyHistogram(
            "tokenward_decision_latency_seconds",
            "Time from request to decision, by where it was made and the decision's status.",
            ["source", "status"],
            LATENCY_BUCKETS,
        )
        r.register(self.decision_latency)
        self.rate_limited = Counter(
            "tokenward_rate_limit_rejections", "Requests denied by a rate limit.", registry=r
        )
        self.admin_actions = Counter(
            "tokenward_admin_actions", "Admin actions by kind.", ["action"], registry=r
        )
        self.security_events = Counter(
            "tokenward_security_events", "Security events by kind.", ["kind"], registry=r
        )
        self.audit_written = Counter(
            "tokenward_audit_events_written", "Audit events made durable.", registry=r
        )
        self.audit_write_latency = Histogram(
            "tokenward_audit_write_seconds",
            "Duration of one audit group commit.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.audit_batch = Histogram(
            "tokenward_audit_batch_events",
            "Events written per audit group commit.",
            buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000),
            registry=r,
        )
        self.audit_queue = Gauge(
            "tokenward_audit_queue_depth", "Audit events waiting to be written.", registry=r
        )
        self.alerts = Counter(
            "tokenward_alerts",
            "Alerts raised, by detector and severity.",
            ["detector", "severity"],
            registry=r,
        )
        self.webhooks = Counter(
            "tokenward_webhook_deliveries",
            "Alert webhooks by final outcome.",
            ["outcome"],
            registry=r,
        )
        self._cache = _CacheCounters()
        r.register(self._cache)
        self.cache_hit_ratio = Gauge(
            "tokenward_cache_hit_ratio", "Share of lookups answered by the cache.", registry=r
        )

    def watch(self, verifier: Verifier, audit_depth: Callable[[], int] | None) -> None:
        """Counters and gauges read at scrape time."""
        self._cache.verifier = verifier

        def ratio() -> float:
            total = verifier.hits + verifier.misses
            return verifier.hits / total if total else 0.0

        self.cache_hit_ratio.set_function(ratio)
        if audit_depth is not None:
            self.audit_queue.set_function(audit_depth)

    def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition the scraper asked for (``Accept``): Prometheus text by default,
        OpenMetrics when asked; and its content type (prometheus-client's own)."""
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type

    def api_request(self, route: str, status: int, seconds: float) -> None:
        self._request("api", route, status, seconds)

    def gateway_request(
        self,
        route: str,
        status: int,
        seconds: float,
        upstream: str | None,
        upstream_status: int,
        upstream_seconds: float | None,
    ) -> None:
        self._request("gateway", route, status, seconds)
        if upstream is not None and upstream_seconds is not None:
            key = (upstream, route, upstream_status)
            child = self._upstream_children.get(key)
            if child is None:
                child = self.upstream_latency.labels(upstream, route, str(upstream_status))
                self._upstream_children[key] = child
            child.observe(upstream_seconds)

    def _request(self, server: str, route: str, status: int, seconds: float) -> None:
        # Children looked up once per label set (bounded: routes are templates).
        key = (server, route, status)
        child = self._request_children.get(key)
        if child is None:
            child = self.requests.labels(server, route, str(status))
            self._request_children[key] = child
        child.observe(seconds)

    # -- hooks ----------------------------------------------------------------------------
    def audit_batch_written(self, events: int, seconds: float) -> None:
        self.audit_written.inc(events)
        self.audit_batch.observe(events)
        self.audit_write_latency.observe(seconds)

    def alert_raised(self, alert: Alert) -> None:
        self.alerts.labels(alert.detector, alert.severity).inc()

    def webhook_result(self, delivered: bool) -> None:
        self.webhooks.labels("delivered" if delivered else "failed").inc()

    # -- the event sink -------------------------------------------------------------------
    async def access(self, event: AccessEvent) -> None:
        self.access_nowait(event)

    def access_nowait(self, event: AccessEvent) -> bool:
        """Count a decision (no coroutine: see :class:`tokenward.events.EventBus`)."""
        decision = event.decision
        # The labelled children, looked up once per label set (``labels()`` costs more than
        # the increment itself, and this runs for every decision).
        key = (event.source, decision.allowed, decision.reason)
        children = self._access_children.get(key)
        if children is None:
            outcome = "allow" if decision.allowed else "deny"
            children = (
                self.decisions.labels(event.source, outcome, decision.reason.value),
                self.decision_latency.labels(event.source, str(decision.status)),
            )
            self._access_children[key] = children
        children[0].inc()
        children[1].observe(event.latency_ms / 1000)
        if decision.reason == Reason.RATE_LIMITED:
            self.rate_limited.inc()
        return True

    async def admin(self, event: AdminEvent) -> None:
        self.admin_actions.labels(event.action).inc()

    async def security(self, event: SecurityEvent) -> None:
        self.security_events.labels(event.kind).inc()


class RequestMetrics:
    """Times every HTTP request of the API, per route template and status (the outermost
    layer but for tracing; ``/metrics`` itself is not counted).

    ``api`` is the FastAPI app: its services, opened at startup, hold the instruments.
    """

    def __init__(self, app: ASGIApp, api: Any) -> None:
        self.app = app
        self.api = api

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        services = getattr(self.api.state, "services", None)
        metrics = services.metrics if services is not None else None
        if scope["type"] != "http" or metrics is None or scope["path"] == "/metrics":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 0

        async def timed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        finally:
            metrics.api_request(api_route(scope), status or 500, time.perf_counter() - started)
