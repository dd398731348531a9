"""Builds the application from settings: services first, then the ASGI stack."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi import FastAPI
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.types import ASGIApp

from tokenward import __version__
from tokenward.api import admin, health, oauth, verification
from tokenward.api.errors import install_error_handlers
from tokenward.api.fastpath import FastPath
from tokenward.api.middleware import (
    BodyLimitMiddleware,
    RequestContextMiddleware,
    SecurityHeadersMiddleware,
)
from tokenward.events import EventBus
from tokenward.fanout import Fanout, make_fanout
from tokenward.gateway import Enforcement, build_enforcement
from tokenward.gateway.authz import AuthzMiddleware
from tokenward.limits import RateLimiter
from tokenward.oauth.sessions import Sessions, build_sessions
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
    fanout: Fanout
    redis: Redis | None = None
    sessions: Sessions | None = None
    #: route policies and the decision pipeline of the gateway and /authz
    enforcement: Enforcement | None = None

    async def close(self) -> None:
        await self.fanout.stop()
        await self.verifier.flush_usage()
        await self.limiter.aclose()
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
    enforcement = build_enforcement(settings, verifier, limiter, events, hasher)
    fanout = make_fanout(verifier, engine, redis)
    await fanout.start()
    tokens = TokenService(store, hasher, verifier, events, on_change=fanout.publish)
    sessions = build_sessions(settings, engine, tokens, events, redis)
    return Services(
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
    )


async def _flush_usage_forever(services: Services) -> None:
    while True:
        await asyncio.sleep(services.settings.usage_flush_seconds)
        await services.verifier.flush_usage()


def create_app(settings: Settings | None = None, services: Services | None = None) -> FastAPI:
    """The FastAPI app (admin API, docs, every route). See :func:`create_asgi` for serving."""
    if settings is None:
        settings = services.settings if services is not None else Settings.load()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = services is None
        svc = services if services is not None else await open_services(settings)
        app.state.services = svc
        flusher = asyncio.create_task(_flush_usage_forever(svc))
        rotation = (
            asyncio.create_task(svc.sessions.scheduler.run_forever()) if svc.sessions else None
        )
        try:
            yield
        finally:
            for task in (flusher, rotation):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
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
    app.include_router(oauth.router)
    app.add_middleware(SecurityHeadersMiddleware)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestContextMiddleware)
    return app


def create_asgi(settings: Settings | None = None, services: Services | None = None) -> ASGIApp:
    """What the server runs: the hot routes' fast path in front of the FastAPI app."""
    api = create_app(settings, services)
    limit = (settings or (services.settings if services else Settings.load())).max_body_bytes
    return FastPath(AuthzMiddleware(api, api), api, limit)
