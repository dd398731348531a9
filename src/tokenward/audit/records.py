"""One audit record per event, and the keyed hash that chains records together.

Each record's hash is ``HMAC-SHA256(chain_key, prev_hash ‖ 0x00 ‖ canonical JSON)``, where the
canonical JSON is the array ``[chain_id, seq, *HASHED_FIELDS]`` (the events of the legacy
chain, written before chains were per writer, hash the fields alone). The chain key is
derived from the server key, so someone who can write to the database but does not hold
the server key cannot recompute the chain after editing it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

import orjson

from tokenward.audit.tables import LEGACY_CHAIN
from tokenward.events import AccessEvent, AdminEvent, IdSource, SecurityEvent
from tokenward.tokens.format import redact_tokens
from tokenward.tokens.hashing import Hmac256, ServerKey, TokenHasher

GENESIS = "0" * 64

# Event ids need to be unique, not secret: a random per-process prefix and a counter, so
# that the hot path makes no system call for randomness per event.
_EVENT_IDS = IdSource("evt_", 6)


def new_event_id() -> str:
    return f"{_EVENT_IDS.prefix}{next(_EVENT_IDS.counter):010x}"


#: The fields a record's hash covers, in a fixed order, after its chain id and ``seq`` (which
#: the writer knows only when it seals the record into its chain).
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

    def row(self) -> Row:
        """The record as the writer queues it: the values of :data:`HASHED_FIELDS`."""
        return tuple(getattr(self, name) for name in HASHED_FIELDS)

    @classmethod
    def from_row(cls, row: Row) -> AuditRecord:
        return cls(**dict(zip(HASHED_FIELDS, row, strict=True)))


#: One event as the writer queues it: a tuple of the :data:`HASHED_FIELDS` values, in order
#: (a tuple, not a record object: the hot path builds one per decision).
Row = tuple[Any, ...]

_FIELDS = tuple(f.name for f in fields(AuditRecord))


def _clip(value: str | None, size: int) -> str | None:
    """At most ``size`` characters that every store accepts (no NUL, no lone surrogate),
    with every token-shaped string cut out first (so that clipping leaves no part of one)."""
    if value is None:
        return None
    return _clean(value[: 4 * size])[:size]


def access_row(event: AccessEvent) -> Row:
    """The row of one access decision (the hot path: built straight as a tuple)."""
    decision = event.decision
    token = decision.token
    project_id: str | None
    environment: str | None
    token_id: str | None
    principal: str | None
    if token is not None:
        project_id, environment, token_id, principal = (
            token.project_id,
            token.environment,
            token.id,
            token.principal,
        )
        detail: dict[str, Any] = {"kind": token.kind}
    else:
        project_id = environment = token_id = principal = None
        detail = {}
    if event.detail:
        detail.update(event.detail)
    source = event.source
    return (
        new_event_id(),
        event.at,
        "access",
        source,
        _clip(event.request_id, 64),
        project_id,
        environment,
        event.actor_id,
        token_id,
        principal,
        "access." + source,
        _clip(event.method, 16),
        _clip(event.path, 512),
        _clip(event.scope, 128),
        "allow" if decision.allowed else "deny",
        decision.reason.value,
        _clip(event.client_ip, 64),
        _clip(event.user_agent, 256),
        round(event.latency_ms * 1000),
        event.fingerprint,
        detail,
    )


def from_access(event: AccessEvent) -> AuditRecord:
    return AuditRecord.from_row(access_row(event))


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
    """Make ``detail`` plain JSON, so what is hashed is exactly what is stored and read.

    Strings (keys too) lose what no store takes: a NUL becomes the text ``\\x00``, a lone
    surrogate the replacement character; and a token-shaped string is cut to its prefix.
    """
    value: dict[str, Any] = _plain_json(json.loads(json.dumps(detail, default=str)))
    return value


def _plain_json(value: Any) -> Any:
    if isinstance(value, str):
        return _clean(value)
    if isinstance(value, dict):
        return {_clean(k): _plain_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain_json(v) for v in value]
    return value


def _clean(text: str) -> str:
    """``text`` as it may be recorded: no token in it (one rule for every recorded text,
    :func:`~tokenward.tokens.format.redact_tokens`), no NUL, no lone surrogate."""
    text = redact_tokens(text)
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    if not text.isprintable():
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text


def iso(value: datetime) -> str:
    if value.tzinfo is UTC:
        return value.isoformat(timespec="microseconds")[:-6] + "Z"
    return value.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


_ENCODE = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode
_DETAIL = HASHED_FIELDS.index("detail")


def plain(detail: Any) -> bool:
    """Whether ``detail`` holds only strings, booleans and nulls under string keys.

    For such values (and the strings, integers and nulls of the other fields) orjson writes
    exactly the bytes of the reference encoder, ``json`` with sorted keys, no spaces and
    ``ensure_ascii=False`` (a property test holds the two together). Anything else, floats
    above all, whose text the two encoders may write differently, takes the reference one.
    """
    if type(detail) is not dict:
        return False
    for key, value in detail.items():
        if type(key) is not str or not (type(value) is str or value is None or type(value) is bool):
            return False
    return True


def canonical_row(row: Row, at: str) -> bytes:
    """The hashed form: ``row`` (the :data:`HASHED_FIELDS`) as a JSON array, ``at`` as text."""
    body = list(row)
    body[1] = at
    if plain(body[_DETAIL]):
        try:
            return orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
        except TypeError:  # a lone surrogate or an integer over 64 bits: the reference says
            pass
    return _ENCODE(body).encode()


def canonical(values: dict[str, Any]) -> bytes:
    """The hashed form of a record of the legacy chain, given as a mapping."""
    row = tuple(values.get(name) for name in HASHED_FIELDS)
    return canonical_row(row, iso(values["at"]))


def chained(chain_id: str, seq: int, body: bytes) -> bytes:
    """``body`` (a :func:`canonical_row` array) with ``chain_id`` and ``seq`` in front: the
    bytes the reference encoder writes for ``[chain_id, seq, *fields]`` (a chain id is
    ASCII letters, digits and ``-``: nothing to escape)."""
    return b'["' + chain_id.encode() + b'",' + str(seq).encode() + b"," + body[1:]


def checkpoint_body(values: dict[str, Any]) -> bytes:
    """The hashed form of a chain checkpoint (see ``audit_chain_checkpoints``)."""
    body = [
        "checkpoint",
        values["chain_id"],
        int(values["n"]),
        iso(values["at"]),
        int(values["seq"]),
        values["hash"],
        bool(values["closed"]),
        values["writer"],
        values["witness"],
    ]
    return _ENCODE(body).encode()


@dataclass(frozen=True, slots=True)
class ChainKeys:
    """The chain keys, one per server key (current first), by server key id."""

    current_id: str
    by_id: dict[str, bytes]
    _macs: dict[str, Hmac256] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_hasher(cls, hasher: TokenHasher) -> ChainKeys:
        return cls(hasher.current.id, {k.id: _derive(k) for k in hasher.keys})

    def hash(self, key_id: str, prev_hash: str, values: dict[str, Any]) -> str:
        """The hash of a stored event (``values`` as read back, with its chain and seq)."""
        body = canonical(values)
        chain_id = values.get("chain_id")
        if chain_id is not None and chain_id != LEGACY_CHAIN:
            body = chained(chain_id, int(values["seq"]), body)
        return self.hash_canonical(key_id, prev_hash, body)

    def checkpoint_mac(self, key_id: str, values: dict[str, Any]) -> str:
        """The MAC of a chain checkpoint, chained to the previous one (``prev_mac``)."""
        body = checkpoint_body(values)
        return self.mac(key_id).hexdigest(values["prev_mac"].encode() + b"\x01" + body)

    def hash_canonical(self, key_id: str, prev_hash: str, body: bytes) -> str:
        return self.mac(key_id).hexdigest(prev_hash.encode() + b"\x00" + body)

    def mac(self, key_id: str) -> Hmac256:
        """The chain's HMAC under key ``key_id`` (its key schedule prepared once)."""
        mac = self._macs.get(key_id)
        if mac is None:
            mac = self._macs[key_id] = Hmac256(self.by_id[key_id])
        return mac


def _derive(key: ServerKey) -> bytes:
    return hmac.new(key.secret, b"tokenward-audit-chain-v1", hashlib.sha256).digest()
