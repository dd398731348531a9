"""One audit record per event, and the keyed hash that chains records together.

Each record's hash is ``HMAC-SHA256(chain_key, prev_hash ‖ canonical JSON of the record)``.
The chain key is derived from the server key, so someone who can write to the database but
does not hold the server key cannot recompute the chain after editing it.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import secrets
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

from tokenward.events import AccessEvent, AdminEvent, SecurityEvent
from tokenward.tokens.hashing import ServerKey, TokenHasher

GENESIS = "0" * 64

# Event ids need to be unique, not secret: a random per-process prefix and a counter, so
# that the hot path makes no system call for randomness per event.
_ID_PREFIX = secrets.token_hex(6)
_ID_COUNTER = itertools.count(1)


def new_event_id() -> str:
    return f"evt_{_ID_PREFIX}{next(_ID_COUNTER):010x}"


#: The fields a record's hash covers, in a fixed order (``seq`` is not among them: the chain
#: itself, through ``prev_hash``, fixes the order).
HASHED_FIELDS = (
    "id",
    "at",
    "kind",
    "source",
    "request_id",
    "project_id",
    "environment",
    "actor_id",
    "token_id",
    "principal",
    "action",
    "method",
    "resource",
    "scope",
    "decision",
    "reason",
    "client_ip",
    "user_agent",
    "latency_us",
    "fingerprint",
    "detail",
)


@dataclass(slots=True)
class AuditRecord:
    """What the audit log stores about one event (never a presented secret)."""

    at: datetime
    kind: str
    action: str
    id: str = field(default_factory=lambda: new_event_id())
    source: str | None = None
    request_id: str | None = None
    project_id: str | None = None
    environment: str | None = None
    actor_id: str | None = None
    token_id: str | None = None
    principal: str | None = None
    method: str | None = None
    resource: str | None = None
    scope: str | None = None
    decision: str | None = None
    reason: str | None = None
    client_ip: str | None = None
    user_agent: str | None = None
    latency_us: int | None = None
    fingerprint: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    def values(self) -> dict[str, Any]:
        # Not dataclasses.asdict: it deep-copies, and this runs for every event.
        return {name: getattr(self, name) for name in _FIELDS}


_FIELDS = tuple(f.name for f in fields(AuditRecord))


def _clip(value: str | None, size: int) -> str | None:
    """At most ``size`` characters that every store accepts (no NUL, no lone surrogate)."""
    if value is None:
        return None
    if "\x00" in value:
        value = value.replace("\x00", "\\x00")
    value = value[:size]
    if not value.isprintable():  # lone surrogates cannot be encoded for any store
        value = value.encode("utf-8", "replace").decode("utf-8")
    return value


def from_access(event: AccessEvent) -> AuditRecord:
    decision = event.decision
    token = decision.token
    return AuditRecord(
        at=event.at,
        kind="access",
        action="access." + event.source,
        source=event.source,
        request_id=_clip(event.request_id, 64),
        project_id=token.project_id if token else None,
        environment=token.environment if token else None,
        token_id=token.id if token else None,
        principal=token.principal if token else None,
        method=_clip(event.method, 16),
        resource=_clip(event.path, 512),
        scope=_clip(event.scope, 128),
        decision="allow" if decision.allowed else "deny",
        reason=decision.reason.value,
        client_ip=_clip(event.client_ip, 64),
        user_agent=_clip(event.user_agent, 256),
        latency_us=round(event.latency_ms * 1000),
        fingerprint=event.fingerprint,
        detail={"kind": token.kind} if token else {},
    )


def from_admin(event: AdminEvent) -> AuditRecord:
    return AuditRecord(
        at=event.at,
        kind="admin",
        action=_clip(event.action, 64) or "",
        source="admin_api",
        request_id=_clip(event.request_id, 64),
        project_id=event.project_id,
        actor_id=_clip(event.actor_id, 64),
        token_id=event.token_id,
        client_ip=_clip(event.client_ip, 64),
        detail=normalize(event.detail),
    )


def from_security(event: SecurityEvent) -> AuditRecord:
    return AuditRecord(
        at=event.at,
        kind="security",
        action="security." + event.kind[:55],
        project_id=event.project_id,
        token_id=event.token_id,
        client_ip=_clip(event.client_ip, 64),
        detail={"severity": event.severity, **normalize(event.evidence)},
    )


def normalize(detail: dict[str, Any]) -> dict[str, Any]:
    """Make ``detail`` plain JSON, so what is hashed is exactly what is stored and read."""
    text = json.dumps(detail, default=str).replace("\\u0000", "\\\\x00")
    value: dict[str, Any] = json.loads(text)
    return value


def iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


_ENCODE = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode


def canonical(values: dict[str, Any]) -> bytes:
    """The hashed form: the fields of :data:`HASHED_FIELDS` as a JSON array, in that order."""
    body = [values.get(name) for name in HASHED_FIELDS]
    body[1] = iso(values["at"])  # "at" is the second field
    return _ENCODE(body).encode()


@dataclass(frozen=True, slots=True)
class ChainKeys:
    """The chain keys, one per server key (current first), by server key id."""

    current_id: str
    by_id: dict[str, bytes]

    @classmethod
    def from_hasher(cls, hasher: TokenHasher) -> ChainKeys:
        return cls(hasher.current.id, {k.id: _derive(k) for k in hasher.keys})

    def hash(self, key_id: str, prev_hash: str, values: dict[str, Any]) -> str:
        key = self.by_id[key_id]
        return hmac.new(key, prev_hash.encode() + b"\x00" + canonical(values), "sha256").hexdigest()


def _derive(key: ServerKey) -> bytes:
    return hmac.new(key.secret, b"tokenward-audit-chain-v1", hashlib.sha256).digest()
