"""Alerts, their acknowledgement, quarantine, IP blocks and detector settings."""

from __future__ import annotations

import ipaddress
from datetime import timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from tokenward.anomaly.config import AnomalyConfig, effective
from tokenward.anomaly.engine import AnomalyEngine
from tokenward.anomaly.store import GLOBAL, AlertFilter
from tokenward.api.auth import AdminRead, AdminWrite, client_ip
from tokenward.api.schemas import (
    BLOCK_PATTERN,
    IDENTIFIER,
    PRINTABLE,
    documented,
    printable_parameters,
)
from tokenward.clientip import parse_ip
from tokenward.errors import Forbidden, Invalid, NotFound, Unavailable
from tokenward.pagination import (
    CURSOR_PATTERN,
    DEFAULT_LIMIT,
    MAX_CURSOR,
    MAX_LIMIT,
    bad_cursor,
    decode_cursor,
    encode_cursor,
    page_body,
)
from tokenward.service import TokenService
from tokenward.tokens.model import TokenRecord
from tokenward.webhooks.signing import new_webhook_secret

router = APIRouter(prefix="/v1", dependencies=[Depends(printable_parameters)])

Id = Annotated[str, Path(max_length=32, pattern=IDENTIFIER)]
Note = Annotated[str, StringConstraints(max_length=300, pattern=PRINTABLE)]


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AckBody(_Closed):
    note: Note = ""


class QuarantineBody(_Closed):
    reason: Note = Field("quarantined by an admin", min_length=1)


class ReleaseBody(_Closed):
    note: Note = ""


class BlockBody(_Closed):
    network: Annotated[
        str, StringConstraints(min_length=1, max_length=64), documented(BLOCK_PATTERN)
    ]
    seconds: float = Field(3600, gt=0, le=30 * 86_400)
    reason: Note = "blocked by an admin"


#: The widest network a manual block may cover, per IP version: a wider one (0.0.0.0/0, a /4)
#: is a lockout of everyone, not a response to an incident.
MIN_BLOCK_PREFIX = {4: 8, 6: 32}


def _blockable(network: str, engine: AnomalyEngine, caller: str | None) -> str:
    """``network`` normalised, or 422: not too wide, not one of the never-block networks
    (``TOKENWARD_ANOMALY_NEVER_BLOCK``, loopback by default), not the caller's own address."""
    try:
        net = ipaddress.ip_network(network, strict=False)
    except ValueError:
        raise Invalid("invalid_cidr", "network must be an IP address or CIDR") from None
    if isinstance(net, ipaddress.IPv6Network) and net.subnet_of(
        ipaddress.IPv6Network("::ffff:0:0/96")
    ):
        raise Invalid("invalid_cidr", "write an IPv4-mapped network in its IPv4 form")
    floor = MIN_BLOCK_PREFIX[net.version]
    if net.prefixlen < floor:
        raise Invalid(
            "block_too_wide",
            f"an IPv{net.version} block must be a /{floor} or narrower",
        )
    if engine.blocklist.protected(str(net)):
        raise Invalid(
            "network_never_blocked",
            "the network overlaps TOKENWARD_ANOMALY_NEVER_BLOCK (loopback by default), "
            "which is never blocked",
        )
    address = parse_ip(caller) if caller else None
    if address is not None and address.version == net.version and address in net:
        raise Invalid("block_includes_caller", "the network includes your own address")
    return str(net)


def _json_types(override: Any, defaults: Any, path: str = "") -> None:
    """The overrides under JSON's own types, as documented: no ``true`` or ``"5"`` for a
    number, no ``1`` for a boolean (:func:`effective` reads them leniently)."""
    if not isinstance(override, dict) or not isinstance(defaults, dict):
        return
    for key, value in override.items():
        default = defaults.get(key)
        where = f"{path}{key}"
        if isinstance(default, dict):
            _json_types(value, default, where + ".")
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise Invalid("invalid_settings", f"{where[:80]}: must be true or false")
        elif isinstance(default, int | float) and (
            isinstance(value, bool) or not isinstance(value, int | float)
        ):
            raise Invalid("invalid_settings", f"{where[:80]}: must be a number")


def _engine(request: Request) -> AnomalyEngine:
    engine: AnomalyEngine | None = request.app.state.services.anomaly
    if engine is None:
        raise Unavailable("anomaly_disabled", "anomaly handling is off (TOKENWARD_ANOMALY_ENABLED)")
    return engine


def _tokens(request: Request) -> TokenService:
    service: TokenService = request.app.state.services.tokens
    return service


def _global_only(actor: TokenRecord) -> None:
    if actor.project_id is not None:
        raise Forbidden("forbidden", "only a global admin credential can do this")


async def _visible_projects(
    request: Request, actor: TokenRecord, project: str | None
) -> list[str] | None:
    if project is not None:
        return [(await _tokens(request).project_for(actor, project)).id]
    return None if actor.project_id is None else [actor.project_id]


# -- alerts -------------------------------------------------------------------------------
@router.get("/alerts", tags=["alerts"])
async def list_alerts(
    actor: AdminRead,
    request: Request,
    project: Annotated[str | None, Query(max_length=64, pattern=IDENTIFIER)] = None,
    detector: Annotated[str | None, Query(max_length=32, pattern=PRINTABLE)] = None,
    severity: Literal["info", "warning", "critical"] | None = None,
    token: Annotated[str | None, Query(max_length=32, pattern=IDENTIFIER)] = None,
    acknowledged: bool | None = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
    cursor: Annotated[
        str | None,
        Query(
            max_length=MAX_CURSOR,
            description="next_cursor of the previous page (opaque).",
            json_schema_extra={"pattern": CURSOR_PATTERN},
        ),
    ] = None,
) -> Any:
    """Alerts, newest first; follow ``next_cursor`` for the next page."""
    filters = AlertFilter(
        project_ids=await _visible_projects(request, actor, project),
        detector=detector,
        severity=severity,
        token_id=token,
        acknowledged=acknowledged,
    )
    # The store pages by ``<µs>.<alert id>``; the API speaks the shared cursor.
    key = decode_cursor("alerts", cursor, (int, str))
    if key is not None and (key[0] >= 10**16 or not key[1].startswith("alt_")):
        raise bad_cursor()
    items, position = await _engine(request).store.list_alerts(
        filters, limit=limit, cursor=None if key is None else f"{key[0]}.{key[1]}"
    )
    next_cursor = None
    if position is not None:
        at, _, alert_id = position.partition(".")
        next_cursor = encode_cursor("alerts", (int(at), alert_id))
    return page_body("alerts", [a.public() for a in items], limit, next_cursor)


async def _visible_alert(request: Request, actor: TokenRecord, alert_id: str) -> Any:
    alert = await _engine(request).store.get_alert(alert_id)
    if alert is None or actor.project_id not in (None, alert.project_id):
        raise NotFound("alert_not_found", "no such alert")
    return alert


@router.get("/alerts/{alert_id}", tags=["alerts"])
async def get_alert(alert_id: Id, actor: AdminRead, request: Request) -> Any:
    """One alert, with its webhook delivery log."""
    alert = await _visible_alert(request, actor, alert_id)
    deliveries = await _engine(request).store.deliveries(alert.id)
    sender = request.app.state.services.webhooks
    if sender is not None:
        deliveries += [m.public() for m in await sender.store.messages(subject=alert.id)]
    return {**alert.public(), "deliveries": deliveries}


@router.post("/alerts/{alert_id}/ack", tags=["alerts"])
async def ack_alert(
    alert_id: Id, actor: AdminWrite, request: Request, body: AckBody | None = None
) -> Any:
    """Acknowledge an alert (idempotent: the first acknowledgement is kept)."""
    await _visible_alert(request, actor, alert_id)
    engine = _engine(request)
    alert = await engine.store.acknowledge(
        alert_id, actor.id, (body or AckBody()).note, engine.clock()
    )
    assert alert is not None
    await _tokens(request).record_action(
        "alert.ack", actor, alert.project_id, alert.token_id, {"alert_id": alert.id}
    )
    return alert.public()


# -- quarantine ---------------------------------------------------------------------------
@router.post("/tokens/{token_id}/quarantine", tags=["tokens"])
async def quarantine_token(
    token_id: Id, actor: AdminWrite, request: Request, body: QuarantineBody | None = None
) -> Any:
    """Suspend a token now (reversible with ``/release``)."""
    reason = (body or QuarantineBody()).reason
    record = await _tokens(request).quarantine_token(actor, token_id, reason)
    return {**record.public(), "state": record.state(_tokens(request).now).value}


@router.post("/tokens/{token_id}/release", tags=["tokens"])
async def release_token(
    token_id: Id, actor: AdminWrite, request: Request, body: ReleaseBody | None = None
) -> Any:
    """Lift a token's quarantine: it works again at once."""
    record = await _tokens(request).release_token(actor, token_id, (body or ReleaseBody()).note)
    return {**record.public(), "state": record.state(_tokens(request).now).value}


# -- IP blocks ----------------------------------------------------------------------------
@router.get("/ip-blocks", tags=["alerts"])
async def list_blocks(
    actor: AdminRead,
    request: Request,
    all: bool = False,
) -> Any:
    """Temporary IP blocks (active ones unless ``all``); global admins only."""
    _global_only(actor)
    engine = _engine(request)
    blocks = await engine.store.blocks(engine.clock(), active_only=not all)
    return {"blocks": [b.public() for b in blocks]}


@router.post("/ip-blocks", status_code=201, tags=["alerts"])
async def add_block(body: BlockBody, actor: AdminWrite, request: Request) -> Any:
    """Refuse a network for ``seconds``; see :data:`MIN_BLOCK_PREFIX` and :func:`_blockable`."""
    _global_only(actor)
    engine = _engine(request)
    network = _blockable(body.network, engine, client_ip(request))
    now = engine.clock()
    block = await engine.store.add_block(
        network, body.reason, None, now, now + timedelta(seconds=body.seconds)
    )
    engine.blocklist.add(block)
    await _tokens(request).record_action("ip.block", actor, None, None, block.public())
    return block.public()


@router.delete("/ip-blocks/{block_id}", tags=["alerts"])
async def lift_block(block_id: Id, actor: AdminWrite, request: Request) -> Any:
    """Lift a block now (on this replica at once, on others within the refresh interval)."""
    _global_only(actor)
    engine = _engine(request)
    if not await engine.store.lift_block(block_id, engine.clock()):
        raise NotFound("block_not_found", "no such active block")
    await engine.refresh_blocks()
    await _tokens(request).record_action("ip.unblock", actor, None, None, {"block_id": block_id})
    return {"id": block_id, "lifted": True}


# -- detector settings --------------------------------------------------------------------
async def _scope(request: Request, actor: TokenRecord, project: str | None) -> str:
    if project is None:
        _global_only(actor)
        return GLOBAL
    return (await _tokens(request).project_for(actor, project)).id


@router.get("/anomaly/settings", tags=["alerts"])
async def get_settings(
    actor: AdminRead,
    request: Request,
    project: Annotated[str | None, Query(max_length=64, pattern=IDENTIFIER)] = None,
) -> Any:
    """The effective detector settings of a project (or the global ones), and the overrides."""
    scope = await _scope(request, actor, project)
    engine = _engine(request)
    overrides, sealed = await engine.store.get_settings(scope)
    resolved = await engine.resolved(None if scope == GLOBAL else scope)
    return {
        "scope": "global" if scope == GLOBAL else project,
        "overrides": overrides,
        "effective": resolved.config.model_dump(mode="json"),
        "webhook_secret_set": sealed is not None,
    }


@router.put("/anomaly/settings", tags=["alerts"])
async def put_settings(
    actor: AdminWrite,
    request: Request,
    overrides: Annotated[dict[str, Any], Body()],
    project: Annotated[str | None, Query(max_length=64, pattern=IDENTIFIER)] = None,
    rotate_webhook_secret: bool = False,
) -> Any:
    """Replace the overrides of a project (or the global ones); validated before stored.

    Setting a ``webhook_url`` for the first time (or ``rotate_webhook_secret``) makes a new
    signing secret, returned once in ``webhook_secret``.
    """
    scope = await _scope(request, actor, project)
    engine = _engine(request)
    global_overrides = {} if scope == GLOBAL else (await engine.store.get_settings(GLOBAL))[0]
    try:
        _json_types(overrides, AnomalyConfig().model_dump(mode="json"))
        effective(global_overrides, overrides)
    except ValidationError as exc:
        summary = "; ".join(
            ".".join(str(p) for p in e["loc"]) + ": " + e["msg"] for e in exc.errors()[:5]
        )
        raise Invalid("invalid_settings", summary or "invalid settings") from None
    _, sealed = await engine.store.get_settings(scope)
    new_secret = None
    if overrides.get("webhook_url") and (sealed is None or rotate_webhook_secret):
        new_secret = new_webhook_secret()
        sealed = engine.box.seal(new_secret)
    await engine.store.put_settings(scope, overrides, sealed, engine.clock())
    engine.forget_settings()
    await _tokens(request).record_action(
        "anomaly.settings",
        actor,
        None if scope == GLOBAL else scope,
        None,
        {"overrides": overrides, "secret_rotated": new_secret is not None},
    )
    body = await get_settings(actor, request, project)
    if new_secret is not None:
        body["webhook_secret"] = new_secret
        body["warning"] = "Store this webhook secret now: it is shown only once."
    return body
