"""Builds the application from settings: services first, then the ASGI stack."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import FastAPI
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from tokenward import __version__
from tokenward.api import admin, health, verification
from tokenward.api import audit as audit_api
from tokenward.api.errors import install_error_handlers
from tokenward.api.middleware import (
    BodyLimitMiddleware,
    RequestContextMiddleware,
    SecurityHeadersMiddleware,
)
from tokenward.audit import AuditWriter, ChainKeys
from tokenward.events import EventBus
from tokenward.limits import RateLimiter
from tokenward.service import TokenService
from tokenward.settings import Settings, load_hasher
from tokenward.store.engine import create_engine, migrate
from tokenward.store.repository import TokenStore
from tokenward.tokens.hashing import TokenHasher
from tokenward.verify import Verifier


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
    redis: Redis | None = None
    audit: AuditWriter | None = None

    async def close(self) -> None:
        await self.verifier.flush_usage()
        if self.audit is not None:
            await self.audit.close()
        if self.redis is not None:
            await self.redis.aclose()
        await self.engine.dispose()


async def open_services(settings: Settings, *, run_migrations: bool = True) -> Services:
    hasher = load_hasher(settings)
    engine = create_engine(settings.resolved_database_url)
    if run_migrations:
        await migrate(engine)
    store = TokenStore(engine)
    limiter = RateLimiter(settings.redis_url)
    redis = Redis.from_url(settings.redis_url) if settings.redis_url else None
    verifier = Verifier(store, hasher, limiter, cache_ttl=settings.cache_ttl)
    events = EventBus()
    tokens = TokenService(store, hasher, verifier, events)
    audit = AuditWriter(
        engine,
        ChainKeys.from_hasher(hasher),
        mode=settings.audit_mode,
        queue_size=settings.audit_queue_size,
        batch_size=settings.audit_batch_size,
    )
    events.subscribe(audit)
    return Services(
        settings, engine, store, hasher, limiter, verifier, tokens, events, redis, audit=audit
    )


async def _flush_usage_forever(services: Services) -> None:
    while True:
        await asyncio.sleep(services.settings.usage_flush_seconds)
        await services.verifier.flush_usage()


def create_app(settings: Settings | None = None, services: Services | None = None) -> FastAPI:
    """The tokenward ASGI app. Pass ``services`` to share already-open ones (tests, embedding)."""
    if settings is None:
        settings = services.settings if services is not None else Settings.load()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = services is None
        svc = services if services is not None else await open_services(settings)
        app.state.services = svc
        flusher = asyncio.create_task(_flush_usage_forever(svc))
        try:
            yield
        finally:
            flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flusher
            if owned:
                await svc.close()
            else:
                await svc.verifier.flush_usage()

    app = FastAPI(
        title="tokenward",
        version=__version__,
        summary="API tokens: issue, scope, time-limit, rotate, revoke and verify.",
        lifespan=lifespan,
    )
    if services is not None:
        app.state.services = services
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(verification.router)
    app.include_router(admin.router)
    app.include_router(audit_api.router)
    app.add_middleware(SecurityHeadersMiddleware)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestContextMiddleware)
    return app
