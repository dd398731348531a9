"""Anomaly handling on the live event stream: detect, then respond.

The engine is an event-bus subscriber placed after the audit writer, so it sees each
decision right after it is durable, in the request that made it. Detectors are in-memory
and cheap; only a finding costs I/O. A finding's response (per detector and project):

* the alert is recorded (``GET /v1/alerts``), with the actions that were taken;
* ``quarantine`` suspends the token at once (reversible by an admin, reason recorded);
* ``block_ip`` refuses the client's network for ``block_seconds`` (never loopback, by
  default, so a gateway in front cannot be locked out by the traffic it forwards); in one
  project only when the address was a project-bound caller's word (docs/anomaly.md);
* ``webhook`` POSTs the alert, signed, retried in the background.

A cooldown per detector and key (network, token) keeps one incident one alert. A failure
while responding is logged and counted, never turned into a failed request.

Allowed decisions (the bulk of the stream) are observed per batch: only the volume-spike and
new-network detectors look at them, so the decisions of one turn of the event loop are
grouped by token and address and each group is observed once (one settings lookup, one
network lookup, one count added). Inside an HTTP request the answer still waits for its
batch (it joins the request's waits, :mod:`tokenward.audit.durable`), so a finding's
response (a quarantine) is in force before the client hears back, as with one event at a
time. Denials, canaries and everything else are observed one by one, at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import structlog

from tokenward.anomaly.blocklist import IPBlocklist
from tokenward.anomaly.config import Action, AnomalyConfig, effective
from tokenward.anomaly.detectors import (
    Bounded,
    BruteForceDetector,
    CanaryDetector,
    Finding,
    LeakedTokenDetector,
    NewNetworkDetector,
    ScopeProbingDetector,
    VolumeSpikeDetector,
)
from tokenward.anomaly.store import GLOBAL, Alert, AnomalyStore, SecretBox
from tokenward.anomaly.webhooks import WebhookSender
from tokenward.audit.durable import pending_of_request
from tokenward.events import AccessEvent, AdminEvent, SecurityEvent
from tokenward.tokens.model import TokenKind

if TYPE_CHECKING:
    from tokenward.service import TokenService

log = structlog.get_logger("tokenward.anomaly")


class _Resolved:
    __slots__ = ("config", "fresh_until", "secret", "url")

    def __init__(self, config: AnomalyConfig, url: str | None, secret: str | None) -> None:
        self.config = config
        self.url = url
        self.secret = secret
        self.fresh_until = 0.0


class _Allowed:
    """Allowed decisions of one turn of the loop, observed together; one future for all."""

    __slots__ = ("events", "future", "waiters")

    def __init__(self, future: asyncio.Future[None]) -> None:
        self.future = future
        self.events: list[AccessEvent] = []
        self.waiters: list[asyncio.Future[None]] = []

    async def wait(self) -> None:
        if not self.future.done():
            waiter = asyncio.get_running_loop().create_future()
            self.waiters.append(waiter)
            await waiter

    def error_for(self, item: object) -> BaseException | None:
        return None  # a detector's failure never fails the request it observed

    def settle(self) -> None:
        if not self.future.done():
            self.future.set_result(None)
        for waiter in self.waiters:
            if not waiter.done():
                waiter.set_result(None)
        self.waiters.clear()


class AnomalyEngine:
    def __init__(
        self,
        store: AnomalyStore,
        tokens: TokenService,
        blocklist: IPBlocklist,
        webhooks: WebhookSender,
        box: SecretBox,
        clock: Callable[[], datetime],
        *,
        config_ttl: float = 5.0,
        on_alert: Callable[[Alert], None] | None = None,
    ) -> None:
        self.store = store
        self.tokens = tokens
        self.blocklist = blocklist
        self.webhooks = webhooks
        self.box = box
        self.clock = clock
        self.config_ttl = config_ttl
        self.on_alert = on_alert
        self.brute_force = BruteForceDetector()
        self.leaked_token = LeakedTokenDetector()
        self.new_network = NewNetworkDetector(store.networks, self._remember)
        self.volume_spike = VolumeSpikeDetector()
        self.scope_probing = ScopeProbingDetector()
        self.canary = CanaryDetector()
        self._configs: dict[str | None, _Resolved] = {}
        self._loading: dict[str | None, asyncio.Future[_Resolved]] = {}
        self._generation = 0  # moved on by forget_settings
        self._last_fired: Bounded[tuple[str, str], float] = Bounded()
        self.failures = 0
        self._allowed: _Allowed | None = None  # the batch new allowed decisions join
        self._observing: set[asyncio.Task[None]] = set()

    # -- settings -------------------------------------------------------------------------
    async def resolved(self, project_id: str | None) -> _Resolved:
        """A project's effective settings, read at most every ``config_ttl`` seconds, and
        by one load at a time: whoever needs them while they are being read waits for that
        read (concurrent batches each read them again before: several queries per refresh
        instead of two, a measurable part of the PostgreSQL gateway's CPU)."""
        cached = self._configs.get(project_id)
        if cached is not None and cached.fresh_until > time.monotonic():
            return cached
        loading = self._loading.get(project_id)
        if loading is None:
            loading = asyncio.ensure_future(self._load(project_id, self._generation))
            self._loading[project_id] = loading
            loading.add_done_callback(lambda done: self._loaded(project_id, done))
        return await asyncio.shield(loading)

    def _loaded(self, project_id: str | None, done: asyncio.Future[_Resolved]) -> None:
        if self._loading.get(project_id) is done:
            del self._loading[project_id]
        if not done.cancelled():
            done.exception()  # seen: every waiter has it raised already

    async def _load(self, project_id: str | None, generation: int) -> _Resolved:
        global_cfg, global_secret = await self.store.get_settings(GLOBAL)
        project_cfg: dict[str, Any] = {}
        project_secret = None
        if project_id is not None:
            project_cfg, project_secret = await self.store.get_settings(project_id)
        try:
            config = effective(global_cfg, project_cfg)
        except ValueError:  # stored settings no longer valid: fall back to the defaults
            log.error("anomaly_settings_invalid", project_id=project_id)
            config = effective()
        sealed = project_secret if project_cfg.get("webhook_url") else global_secret
        resolved = _Resolved(
            config,
            str(config.webhook_url) if config.webhook_url else None,
            self.box.open(sealed) if sealed else None,
        )
        resolved.fresh_until = time.monotonic() + self.config_ttl
        if generation == self._generation:  # not read before a change that forgot them
            self._configs[project_id] = resolved
        return resolved

    def forget_settings(self) -> None:
        self._configs.clear()
        self._loading.clear()
        self._generation += 1

    # -- the event sink -------------------------------------------------------------------
    def access_nowait(self, event: AccessEvent) -> bool:
        """Take an allowed decision into the current batch (``True``); anything else is
        observed on its own (``False``: the bus awaits :meth:`access`)."""
        token = event.decision.token
        if not event.decision.allowed or token is None or token.kind == TokenKind.CANARY:
            return False
        batch = self._allowed
        if batch is None:
            loop = asyncio.get_running_loop()
            batch = self._allowed = _Allowed(loop.create_future())
            loop.call_soon(self._start_batch)
        batch.events.append(event)
        pending = pending_of_request()
        if pending is not None:
            pending.append((batch, None))
        return True

    def _start_batch(self) -> None:
        batch, self._allowed = self._allowed, None
        if batch is None:
            return
        task = asyncio.get_running_loop().create_task(self._observe_allowed(batch))
        self._observing.add(task)
        task.add_done_callback(self._observing.discard)

    async def _observe_allowed(self, batch: _Allowed) -> None:
        """The volume-spike and new-network detectors, once per (token, address) group."""
        try:
            groups: dict[tuple[str, str | None], list[AccessEvent]] = {}
            for event in batch.events:
                token = event.decision.token
                assert token is not None
                groups.setdefault((token.id, event.client_ip), []).append(event)
            for events in groups.values():
                first = events[0]
                token = first.decision.token
                assert token is not None
                settings = await self._settings_or_none(token.project_id)
                if settings is None:
                    continue
                cfg = settings.config
                findings: list[Finding | None] = []
                if cfg.volume_spike.enabled:
                    findings.append(self.volume_spike.observe_many(events, cfg.volume_spike))
                if cfg.new_network.enabled:
                    try:
                        findings.append(await self.new_network.observe(first, cfg.new_network))
                    except Exception as exc:
                        self._failed("new_network", exc)
                for finding in findings:
                    if finding is not None:
                        await self.respond(finding, settings, events[-1].at)
        except Exception as exc:  # never a failed request, never a lost batch future
            self._failed("batch", exc)
        finally:
            batch.settle()

    async def drain(self) -> None:
        """Wait until every allowed decision taken so far has been observed."""
        self._start_batch()
        while self._observing:
            await asyncio.gather(*self._observing, return_exceptions=True)

    async def access(self, event: AccessEvent) -> None:
        if self.access_nowait(event):
            return
        token = event.decision.token
        settings = await self._settings_or_none(token.project_id if token else event.ip_reported_by)
        if settings is None:
            return
        cfg = settings.config
        findings: list[Finding | None] = []
        if cfg.brute_force.enabled:
            findings.append(self.brute_force.observe(event, cfg.brute_force))
        if token is not None:
            if cfg.canary.enabled:
                findings.append(self.canary.observe(event, cfg.canary))
            if cfg.leaked_token.enabled:
                findings.append(self.leaked_token.observe(event, cfg.leaked_token))
            if cfg.scope_probing.enabled:
                findings.append(self.scope_probing.observe(event, cfg.scope_probing))
            if cfg.volume_spike.enabled:
                findings.append(self.volume_spike.observe(event, cfg.volume_spike))
            if cfg.new_network.enabled:
                try:
                    findings.append(await self.new_network.observe(event, cfg.new_network))
                except Exception as exc:
                    self._failed("new_network", exc)
        for finding in findings:
            if finding is not None:
                await self.respond(finding, settings, event.at)

    async def admin(self, event: AdminEvent) -> None:
        return None

    async def security(self, event: SecurityEvent) -> None:
        settings = await self._settings_or_none(event.project_id)
        if settings is None or not settings.config.security_events.enabled:
            return
        cfg = settings.config.security_events
        finding = Finding(
            event.kind[:32],
            event.severity,
            event.token_id or event.kind,
            f"{event.kind.replace('_', ' ')}"
            + (f" (token {event.token_id})" if event.token_id else ""),
            list(cfg.actions),
            cfg.cooldown_seconds,
            project_id=event.project_id,
            token_id=event.token_id,
            client_ip=event.client_ip,
            evidence=dict(event.evidence),
        )
        await self.respond(finding, settings, event.at)

    # -- responses ------------------------------------------------------------------------
    async def respond(self, finding: Finding, settings: _Resolved, at: datetime) -> Alert | None:
        key = (finding.detector, finding.key)
        now = at.timestamp()
        last = self._last_fired.get(key)
        if last is not None and now - last < finding.cooldown_seconds:
            return None
        self._last_fired.touch(key, lambda: now)
        self._last_fired[key] = now
        alert = Alert(
            finding.detector,
            finding.severity,
            finding.summary,
            self.clock(),
            project_id=finding.project_id,
            token_id=finding.token_id,
            client_ip=finding.client_ip,
            request_id=finding.request_id,
            evidence=finding.evidence,
        )
        try:
            if Action.QUARANTINE in finding.actions and finding.token_id is not None:
                reason = f"{finding.detector}: {finding.summary} (alert {alert.id})"
                await self.tokens.quarantine_token(None, finding.token_id, reason)
                alert.actions.append("quarantine")
            if Action.BLOCK_IP in finding.actions:
                network = finding.network or finding.client_ip
                if network and not self.blocklist.protected(network):
                    seconds = finding.block_seconds or 900
                    block = await self.store.add_block(
                        network,
                        f"{finding.detector}: {finding.summary}",
                        alert.id,
                        self.clock(),
                        self.clock() + timedelta(seconds=seconds),
                        project_id=finding.block_project_id,
                    )
                    self.blocklist.add(block)
                    scoped = f"@{finding.block_project_id}" if finding.block_project_id else ""
                    alert.actions.append(f"block_ip:{network}{scoped}")
            if Action.WEBHOOK in finding.actions and settings.url and settings.secret:
                alert.actions.append("webhook")
            await self.store.insert_alert(alert)
        except Exception as exc:
            self._failed(finding.detector, exc)
            return None
        log.warning(
            "alert",
            alert_id=alert.id,
            detector=alert.detector,
            severity=alert.severity,
            token_id=alert.token_id,
            client_ip=alert.client_ip,
            actions=alert.actions,
        )
        if self.on_alert is not None:
            self.on_alert(alert)
        if "webhook" in alert.actions and settings.url and settings.secret:
            self.webhooks.send(alert, settings.url, settings.secret)
        return alert

    async def refresh_blocks(self) -> None:
        self.blocklist.replace(await self.store.blocks(self.clock()))

    async def _settings_or_none(self, project_id: str | None) -> _Resolved | None:
        try:
            return await self.resolved(project_id)
        except Exception as exc:
            self._failed("settings", exc)
            return None

    async def _remember(self, token_id: str, network: str, event: AccessEvent) -> None:
        await self.store.add_network(token_id, network, event.at)

    def _failed(self, where: str, exc: Exception) -> None:
        self.failures += 1
        log.error("anomaly_failed", where=where, error=type(exc).__name__)
