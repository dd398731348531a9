"""Prometheus metrics, fed by the event bus and read from the services at scrape time.

Each application gets its own registry (several apps may live in one process: tests,
embedding). Labels are bounded sets (source, outcome, reason, detector, severity, action);
a token, token id or IP address is never a label.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from tokenward.anomaly.store import Alert
from tokenward.events import AccessEvent, AdminEvent, SecurityEvent
from tokenward.tokens.model import Reason
from tokenward.verify import Verifier

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    """The instruments, and an event sink that counts every decision and admin action."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._access_children: dict[tuple[str, bool, Reason], tuple[Any, Any]] = {}
        self.decisions = Counter(
            "tokenward_decisions",
            "Access decisions by where they were made, outcome and reason.",
            ["source", "outcome", "reason"],
            registry=r,
        )
        self.decision_latency = Histogram(
            "tokenward_decision_latency_seconds",
            "Time from request to decision, by where it was made.",
            ["source"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
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
        self.cache_hits = Gauge(
            "tokenward_cache_hits", "Verifier cache hits since start.", registry=r
        )
        self.cache_misses = Gauge(
            "tokenward_cache_misses", "Verifier cache misses since start.", registry=r
        )
        self.cache_hit_ratio = Gauge(
            "tokenward_cache_hit_ratio", "Share of lookups answered by the cache.", registry=r
        )

    def watch(self, verifier: Verifier, audit_depth: Callable[[], int] | None) -> None:
        """Gauges read at scrape time."""
        self.cache_hits.set_function(lambda: verifier.hits)
        self.cache_misses.set_function(lambda: verifier.misses)

        def ratio() -> float:
            total = verifier.hits + verifier.misses
            return verifier.hits / total if total else 0.0

        self.cache_hit_ratio.set_function(ratio)
        if audit_depth is not None:
            self.audit_queue.set_function(audit_depth)

    def render(self) -> bytes:
        return generate_latest(self.registry)

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
                self.decision_latency.labels(event.source),
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
