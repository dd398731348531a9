"""Builds the application from settings: services first, then the ASGI stack."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta

import structlog
from fastapi import FastAPI
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.types import ASGIApp

from tokenward import __version__, dashboard, redisconn
from tokenward.anomaly.blocklist import IPBlocklist
from tokenward.anomaly.engine import AnomalyEngine
from tokenward.anomaly.store import AnomalyStore
from tokenward.api import admin, health, oauth, observability, verification
from tokenward.api import alerts as alerts_api
from tokenward.api import audit as audit_api
from tokenward.api import docs as api_docs
from tokenward.api import identities as identities_api
from tokenward.api import leaks as leaks_api
from tokenward.api import usage as usage_api
from tokenward.api import webhooks as webhooks_api
from tokenward.api.contract import install_contract, operation_id
from tokenward.api.errors import install_error_handlers
from tokenward.api.fastpath import FastPath, HotPath
from tokenward.api.middleware import (
    BodyLimitMiddleware,
    RequestContextMiddleware,
)
from tokenward.audit import AuditWriter, ChainKeys
from tokenward.audit.chain import prune
from tokenward.audit.writer import DurableResponseMiddleware
from tokenward.events import EventBus
from tokenward.failures import FailureCounter, failures_of
from tokenward.fanout import Fanout, make_fanout
from tokenward.gateway import Enforcement, build_enforcement
from tokenward.identities.service import IdentityService
from tokenward.limits import RateLimiter
from tokenward.logs import access_log, configure_logging
from tokenward.metrics import Metrics, RequestMetrics
from tokenward.sealing import Sealer
from tokenward.service import TokenService
from tokenward.sessions import Sessions, build_sessions
from tokenward.settings import Settings, load_hasher
from tokenward.store.engine import create_engine, migrate, require_current_schema
from tokenward.store.repository import TokenStore
from tokenward.tokens.hashing import TokenHasher
from tokenward.tracing import DecisionAttributes, traced, tracer
from tokenward.usage import UsageRollup
from tokenward.verify import Verifier
from tokenward.webhooks.events import WebhookEvents
from tokenward.webhooks.sender import WebhookSender
from tokenward.webhooks.store import WebhookStore

log = structlog.get_logger("tokenward")


@dataclass
class Services:
    """Everything a request handler may use, built once per process."""

    settings: Settings
    engine: AsyncEngine
    store: TokenStore
    hasher: TokenHasher
    limiter: RateLimiter
    verifier: Verifier
    tokens: TokenService
    events: EventBus
    fanout: Fanout
    redis: Redis | None = None
    sessions: Sessions | None = None
    #: route policies and the decision pipeline of the gateway and /authz
    enforcement: Enforcement | None = None
    audit: AuditWriter | None = None
    anomaly: AnomalyEngine | None = None
    metrics: Metrics | None = None
    usage: UsageRollup | None = None
    webhooks: WebhookSender | None = None
    identities: IdentityService | None = None

    async def close(self) -> None:
        await self.fanout.stop()
        await self.verifier.flush_usage()
        await self.limiter.aclose()
        if self.audit is not None:
            await self.audit.close()
        if self.anomaly is not None:
            await self.anomaly.drain()
        if self.webhooks is not None:
            await self.webhooks.close()
        if self.redis is not None:
            await self.redis.aclose()
        await self.engine.dispose()


async def open_services(settings: Settings, *, run_migrations: bool = True) -> Services:
    hasher = load_hasher(settings)
    engine = create_engine(settings.resolved_database_url)
    if run_migrations and settings.migrate_on_start:
        await migrate(engine)
    elif run_migrations:
        await require_current_schema(engine)  # serve --no-migrate: a schema behind stops it
    store = TokenStore(engine)
    limiter = RateLimiter(settings.redis_url, namespace=settings.redis_prefix)
    # Retries on a fresh connection: only for calls safe to repeat (see tokenward.redisconn).
    redis = redisconn.connect(settings.redis_url) if settings.redis_url else None
    verifier = Verifier(store, hasher, limiter, cache_ttl=settings.cache_ttl)
    events = EventBus()
    enforcement = build_enforcement(settings, verifier, limiter, events, hasher)
    fanout = make_fanout(
        verifier,
        engine,
        redis,
        prefix=settings.redis_prefix,
        subscriber=redisconn.connect(settings.redis_url, retries=0) if settings.redis_url else None,
    )
    await fanout.start()
    tokens = TokenService(store, hasher, verifier, events, on_change=fanout.publish)
    webhooks = WebhookSender(
        WebhookStore(engine),
        Sealer(hasher, "webhook"),
        lambda: verifier.clock(),
        max_attempts=settings.webhook_max_attempts,
        backoff=settings.webhook_backoff_seconds,
        timeout=settings.webhook_timeout_seconds,
        queue_size=settings.webhook_queue_size,
        log_days=settings.webhook_log_days,
    )
    webhook_events = WebhookEvents(webhooks)
    sessions = build_sessions(settings, engine, tokens, events, redis, webhooks)
    audit = AuditWriter(
        engine,
        ChainKeys.from_hasher(hasher),
        mode=settings.audit_mode,
        queue_size=settings.audit_queue_size,
        batch_size=settings.audit_batch_size,
        checkpoint_every=settings.audit_checkpoint_seconds,
        sqlite_synchronous=settings.audit_sqlite_synchronous,
    )
    events.subscribe(audit)
    if tracer() is not None:  # OTEL_* asks for traces: decisions become span attributes
        events.subscribe(DecisionAttributes())
    metrics = None
    if settings.metrics_enabled:
        metrics = Metrics()
        metrics.watch(verifier, lambda: audit.depth)
        audit.observe = metrics.audit_batch_written
        events.subscribe(metrics)
    anomaly = None
    if settings.anomaly_enabled:
        anomaly = build_anomaly(settings, engine, hasher, verifier, tokens, webhook_events)
        if metrics is not None:
            anomaly.on_alert = metrics.alert_raised
        await anomaly.refresh_blocks()
        events.subscribe(anomaly)
    if metrics is not None:
        webhooks.on_result = metrics.webhook_result
    events.subscribe(webhook_events)
    services = Services(
        settings,
        engine,
        store,
        hasher,
        limiter,
        verifier,
        tokens,
        events,
        fanout,
        redis,
        sessions,
        enforcement,
        audit=audit,
        anomaly=anomaly,
        metrics=metrics,
        webhooks=webhooks,
        usage=UsageRollup(
            engine,
            lambda: verifier.clock(),
            interval=settings.usage_rollup_seconds,
            minute_days=settings.usage_minute_days,
            hour_days=settings.usage_hour_days,
        ),
        identities=IdentityService(tokens.identities, tokens),
    )
    # Failed credentials count where their access event is made, for every entry point.
    events.subscribe(FailureCounter(lambda: failures_of(services)))
    return services


def build_anomaly(
    settings: Settings,
    engine: AsyncEngine,
    hasher: TokenHasher,
    verifier: Verifier,
    tokens: TokenService,
    webhooks: WebhookEvents,
) -> AnomalyEngine:
    anomaly_store = AnomalyStore(engine)
    never = [n.strip() for n in settings.anomaly_never_block.split(",") if n.strip()]
    blocklist = IPBlocklist(lambda: verifier.clock(), never)
    verifier.is_blocked = blocklist
    return AnomalyEngine(
        anomaly_store,
        tokens,
        blocklist,
        webhooks,
        Sealer(hasher, "webhook"),
        lambda: verifier.clock(),
    )


async def _prune_audit_forever(services: Services) -> None:
    """Apply the retention setting once an hour (and at start)."""
    days = services.settings.audit_retention_days
    if days <= 0:
        return
    while True:
        now = services.verifier.clock()
        try:
            result = await prune(services.engine, now - timedelta(days=days), now)
            if result.pruned:
                log.info("audit_pruned", events=result.pruned, cuts=result.cuts)
        except Exception as exc:
            log.warning("audit_prune_failed", error=type(exc).__name__)
        await asyncio.sleep(3600)


async def _refresh_blocks_forever(services: Services) -> None:
    while services.anomaly is not None:
        await asyncio.sleep(services.settings.ip_block_refresh_seconds)
        try:
            await services.anomaly.refresh_blocks()
        except Exception as exc:  # keep the blocks we have; try again next round
            log.warning("ip_block_refresh_failed", error=type(exc).__name__)


async def _flush_usage_forever(services: Services) -> None:
    while True:
        await asyncio.sleep(services.settings.usage_flush_seconds)
        await services.verifier.flush_usage()


def create_app(
    settings: Settings | None = None, services: Services | None = None, *, middleware: bool = True
) -> FastAPI:
    """The FastAPI app (admin API, docs, every route). See :func:`create_asgi` for serving."""
    if settings is None:
        settings = services.settings if services is not None else Settings.load()
    assert settings is not None
    if not structlog.is_configured():  # JSON lines on stderr, also when embedded
        configure_logging(settings.log_level)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = services is None
        svc = services if services is not None else await open_services(settings)
        app.state.services = svc
        dashboard.attach(app, svc)
        flusher = asyncio.create_task(_flush_usage_forever(svc))
        rotation = (
            asyncio.create_task(svc.sessions.scheduler.run_forever()) if svc.sessions else None
        )
        background = [
            asyncio.create_task(_refresh_blocks_forever(svc)),
            asyncio.create_task(_prune_audit_forever(svc)),
        ]
        if svc.usage is not None:
            background.append(asyncio.create_task(svc.usage.run_forever()))
        if svc.webhooks is not None:
            background.append(asyncio.create_task(svc.webhooks.run_forever()))
        if rotation is not None:
            background.append(rotation)
        try:
            yield
        finally:
            flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flusher
            for task in background:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if owned:
                await svc.close()
            else:
                await svc.verifier.flush_usage()
            access_log.flush()

    app = FastAPI(
        title="tokenward",
        version=__version__,
        summary="API tokens: issue, scope, time-limit, rotate, revoke and verify.",
        lifespan=lifespan,
        generate_unique_id_function=operation_id,
        # FastAPI's pages load their scripts from a CDN: /docs is served by api/docs.py
        docs_url=None,
        redoc_url=None,
        swagger_ui_oauth2_redirect_url=None,
    )
    install_contract(app)
    app.state.settings = settings
    if services is not None:
        app.state.services = services
        dashboard.attach(app, services)
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(verification.router)
    app.include_router(admin.router)
    app.include_router(identities_api.router)
    app.include_router(oauth.router)
    app.include_router(audit_api.router)
    app.include_router(alerts_api.router)
    app.include_router(usage_api.router)
    app.include_router(webhooks_api.router)
    app.include_router(leaks_api.router)
    app.include_router(observability.router)
    app.include_router(api_docs.router)
    dashboard.install(app)
    if middleware:  # create_asgi puts the same stack around the fast path instead
        app.add_middleware(DurableResponseMiddleware)
        app.add_middleware(
            BodyLimitMiddleware,
            max_bytes=settings.max_body_bytes,
            max_depth=settings.max_json_depth,
        )
        app.add_middleware(RequestContextMiddleware, log_requests=settings.access_log)
    return app


def create_asgi(settings: Settings | None = None, services: Services | None = None) -> ASGIApp:
    """What the server runs, outermost first::

        traces: a span per request, only when OTEL_* turns tracing on (tracing.py)
        metrics: every request timed per route template and status (metrics.py)
        hot path: POST /v1/verify and /authz, each in one layer (api/fastpath.py)
        everything else: request id, security headers and access log
          → body bounds (size, JSON depth) → audit durability
          → GET /healthz → FastAPI

    Every route, hot or not, gets the same request id, log line, security headers, body
    bounds and the promise that its response starts only once its audit events are durable.
    """
    api = create_app(settings, services, middleware=False)
    settings = api.state.settings
    app: ASGIApp = FastPath(api)
    app = DurableResponseMiddleware(app)
    app = BodyLimitMiddleware(app, settings.max_body_bytes, settings.max_json_depth)
    app = RequestContextMiddleware(app, log_requests=settings.access_log)
    hot = HotPath(
        app,
        api,
        max_body_bytes=settings.max_body_bytes,
        max_json_depth=settings.max_json_depth,
        log_requests=settings.access_log,
    )
    app = RequestMetrics(hot, api) if settings.metrics_enabled else hot
    return traced(app)  # a span per request when tracing is on (tracing.py); else nothing
