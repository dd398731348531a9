"""Builds the short-lived-token services (:mod:`tokenward.oauth`) and the rotation scheduler
(:mod:`tokenward.rotation`) from the settings and the core services."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from tokenward.events import EventBus
from tokenward.oauth.admin import SessionAdmin
from tokenward.oauth.dpop import DPoPChecker, RedisReplayCache
from tokenward.oauth.exchange import Lifetimes, TokenExchange
from tokenward.oauth.identity import IdentityVerifier
from tokenward.oauth.policy import PolicyStore
from tokenward.oauth.store import SessionStore
from tokenward.oauth.webhooks import SecretBox, WebhookSender
from tokenward.rotation.scheduler import RotationScheduler
from tokenward.service import TokenService


@dataclass
class Sessions:
    store: SessionStore
    policies: PolicyStore
    identity: IdentityVerifier
    exchange: TokenExchange
    admin: SessionAdmin
    scheduler: RotationScheduler


def build_sessions(
    settings: Any, engine: AsyncEngine, tokens: TokenService, events: EventBus, redis: Any
) -> Sessions:
    store = SessionStore(engine)
    policies = PolicyStore(tokens.store)
    tokens.lifetime_cap = policies.cap_lifetime
    replay = RedisReplayCache(redis, settings.redis_prefix + "dpop:") if redis else None
    tokens.verifier.dpop = DPoPChecker(
        replay, max_age=settings.dpop_max_age, skew=settings.dpop_clock_skew
    )
    identity = IdentityVerifier(store, cache_ttl=settings.jwks_cache_ttl)
    lifetimes = Lifetimes(
        access_default=settings.access_token_ttl,
        access_max=settings.access_token_max_ttl,
        refresh=settings.refresh_token_ttl,
        reuse_grace=settings.refresh_reuse_grace,
    )
    exchange = TokenExchange(tokens, store, policies, identity, events, lifetimes)
    box = SecretBox(tokens.hasher)
    sender = WebhookSender(attempts=settings.webhook_attempts)
    admin = SessionAdmin(tokens, store, policies, box, events)
    scheduler = RotationScheduler(
        engine,
        store,
        tokens,
        policies,
        events,
        box,
        sender,
        interval=settings.rotation_interval,
        warning_days=settings.expiry_warning_days,
    )
    return Sessions(store, policies, identity, exchange, admin, scheduler)
