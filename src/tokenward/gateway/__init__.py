"""Enforcement in front of a backend: route policies, the built-in gateway and ``/authz``.

* :mod:`~tokenward.gateway.config`: the route policy file (TOML) and its checks;
* :mod:`~tokenward.gateway.enforce`: one request → one decision (the shared pipeline);
* :mod:`~tokenward.gateway.authz`: ``/authz`` for nginx, Traefik, Caddy and Envoy;
* :mod:`~tokenward.gateway.proxy`: the reverse proxy on its own port;
* :mod:`~tokenward.gateway.mcp`: MCP routes, each JSON-RPC message decided by its scope;
* :mod:`~tokenward.gateway.credentials`: provider keys the gateway adds for an upstream;
* :mod:`~tokenward.gateway.postgres`: PostgreSQL listeners (``[[postgres]]``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tokenward.clientip import resolver_for
from tokenward.gateway.config import ConfigError, Policy, load_policy, parse_policy
from tokenward.gateway.enforce import Enforcement, Outcome
from tokenward.tokens.durations import parse_rates

if TYPE_CHECKING:
    from tokenward.events import EventBus
    from tokenward.limits import RateLimiter
    from tokenward.settings import Settings
    from tokenward.tokens.hashing import TokenHasher
    from tokenward.verify import Verifier

__all__ = [
    "ConfigError",
    "Enforcement",
    "Outcome",
    "Policy",
    "build_enforcement",
    "load_policy",
    "parse_policy",
]


def build_enforcement(
    settings: Settings,
    verifier: Verifier,
    limiter: RateLimiter,
    events: EventBus,
    hasher: TokenHasher,
    policy: Policy | None = None,
) -> Enforcement:
    """The enforcement of these settings; the policy file is read (and checked) here."""
    if policy is None:
        policy = load_policy(settings.gateway_config) if settings.gateway_config else Policy()
    failure_limit = settings.auth_failure_limit.strip()
    return Enforcement(
        policy,
        verifier,
        limiter,
        events,
        hasher,
        resolver_for(settings.trusted_proxies),
        failure_limit=tuple(parse_rates(failure_limit)) if failure_limit else (),
        public_url=settings.public_url,
    )
