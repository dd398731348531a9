"""Detector settings: defaults in code, global overrides, per-project overrides.

The effective settings for a project are the defaults, updated by the global overrides
(scope ``*``), updated by the project's overrides, merged key by key and validated as one.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, HttpUrl

from tokenward.webhooks.signing import check_webhook_url

Severity = Literal["info", "warning", "critical"]


class Action(StrEnum):
    ALERT = "alert"  # record an alert (GET /v1/alerts)
    WEBHOOK = "webhook"  # an alert.raised webhook (tokenward.webhooks) to its endpoints
    QUARANTINE = "quarantine"  # suspend the token until an admin releases it
    BLOCK_IP = "block_ip"  # refuse the client's network for block_seconds


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Detector(_Closed):
    enabled: bool = True
    severity: Severity = "warning"
    actions: list[Action] = Field(default_factory=lambda: [Action.ALERT])
    cooldown_seconds: float = Field(300, ge=0, le=86_400, description="One alert per key per …")


class BruteForce(Detector):
    """Failed verifications (malformed, bad checksum, unknown) from one network."""

    threshold: int = Field(20, ge=2, le=100_000)
    window_seconds: float = Field(60, gt=0, le=86_400)
    ipv4_prefix: int = Field(32, ge=8, le=32)
    ipv6_prefix: int = Field(64, ge=16, le=128)
    block_seconds: float = Field(900, gt=0, le=30 * 86_400)


class LeakedToken(Detector):
    """Use of a revoked, expired or rotated-out token."""

    severity: Severity = "critical"
    actions: list[Action] = Field(default_factory=lambda: [Action.ALERT, Action.WEBHOOK])


class NewNetwork(Detector):
    """A token used from a network it never used before, once its learning period is over."""

    learning_seconds: float = Field(86_400, ge=0, le=365 * 86_400)
    ipv4_prefix: int = Field(24, ge=8, le=32)
    ipv6_prefix: int = Field(64, ge=16, le=128)
    cooldown_seconds: float = Field(0, ge=0, le=86_400)


class VolumeSpike(Detector):
    """A token's requests per interval far above its own EWMA baseline."""

    interval_seconds: float = Field(60, ge=1, le=3600)  # a bucket of the clock: never < 1 s
    alpha: float = Field(0.2, gt=0, lt=1, description="EWMA weight of the newest interval")
    deviations: float = Field(4.0, gt=0, le=100)
    min_count: int = Field(20, ge=1, description="Never alert below this many per interval")
    warmup_intervals: int = Field(10, ge=1, le=10_000)


class ScopeProbing(Detector):
    """A token repeatedly denied for scopes it lacks."""

    threshold: int = Field(5, ge=2, le=100_000)
    window_seconds: float = Field(300, gt=0, le=86_400)


class Canary(Detector):
    """Any use of a canary token (never legitimately used)."""

    severity: Severity = "critical"
    actions: list[Action] = Field(default_factory=lambda: [Action.ALERT, Action.WEBHOOK])
    cooldown_seconds: float = Field(60, ge=0, le=86_400)


class SecurityEvents(Detector):
    """Security events raised elsewhere (e.g. a refresh token reused)."""

    actions: list[Action] = Field(default_factory=lambda: [Action.ALERT, Action.WEBHOOK])
    cooldown_seconds: float = Field(0, ge=0, le=86_400)


def _https_or_loopback(url: HttpUrl) -> HttpUrl:
    """The rule of rotation webhooks: https, plain http to loopback only (alerts carry
    token ids and client addresses; and no plain-http request to any host on the network,
    such as a cloud metadata address)."""
    check_webhook_url(str(url))
    return url


WebhookUrl = Annotated[HttpUrl, AfterValidator(_https_or_loopback)]


class AnomalyConfig(_Closed):
    brute_force: BruteForce = Field(default_factory=BruteForce)
    leaked_token: LeakedToken = Field(default_factory=LeakedToken)
    new_network: NewNetwork = Field(default_factory=NewNetwork)
    volume_spike: VolumeSpike = Field(default_factory=VolumeSpike)
    scope_probing: ScopeProbing = Field(default_factory=ScopeProbing)
    canary: Canary = Field(default_factory=Canary)
    security_events: SecurityEvents = Field(default_factory=SecurityEvents)
    webhook_url: WebhookUrl | None = Field(
        None, description="Where alerts are POSTed: https (plain http to loopback only)."
    )


DETECTORS = (
    "brute_force",
    "leaked_token",
    "new_network",
    "volume_spike",
    "scope_probing",
    "canary",
    "security_events",
)


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` on top of ``base``, recursively for nested objects."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def effective(*overrides: dict[str, Any]) -> AnomalyConfig:
    """The defaults with each of ``overrides`` applied in turn (raises on invalid values)."""
    values: dict[str, Any] = AnomalyConfig().model_dump(mode="json")
    for override in overrides:
        values = merge(values, override)
    return AnomalyConfig.model_validate(values)
