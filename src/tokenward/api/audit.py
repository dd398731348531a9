"""``GET /v1/audit``: the audit log, filtered and paginated; export; chain verification."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import StringConstraints

from tokenward.api.auth import AdminRead
from tokenward.api.schemas import (
    AUDIT_ANCHOR,
    IDENTIFIER,
    IP_PATTERN,
    PRINTABLE,
    Rfc3339,
    printable_parameters,
)
from tokenward.audit.chain import parse_anchor, verify_chain
from tokenward.audit.query import (
    AuditFilter,
    export_jsonl,
    list_events,
    make_cursor,
    parse_cursor,
    valid_cursor,
)
from tokenward.audit.records import ChainKeys
from tokenward.clientip import parse_ip
from tokenward.errors import Forbidden, Invalid
from tokenward.pagination import (
    CURSOR_PATTERN,
    DEFAULT_LIMIT,
    MAX_CURSOR,
    MAX_LIMIT,
    bad_cursor,
    decode_cursor,
    encode_cursor,
    from_micros,
    micros,
    page_body,
)
from tokenward.service import TokenService

router = APIRouter(prefix="/v1", tags=["audit"], dependencies=[Depends(printable_parameters)])


Text = Annotated[str | None, Query(max_length=64, pattern=PRINTABLE)]
Identifier = Annotated[str | None, Query(max_length=64, pattern=IDENTIFIER)]

#: The filters of the list and of the export: one definition (:func:`audit_filters`).
FILTER_PARAMETERS = frozenset(
    {
        "project",
        "token",
        "principal",
        "actor",
        "actor_id",
        "decision",
        "reason",
        "ip",
        "kind",
        "action",
        "request_id",
        "fingerprint",
        "since",
        "until",
    }
)
#: What only the list takes on top: its page.
PAGE_PARAMETERS = frozenset({"limit", "cursor", "order"})


def refuse_unknown(request: Request, allowed: frozenset[str]) -> None:
    """422 for a query parameter the route does not know (a misspelt filter would
    otherwise be ignored, and the answer would hold every event)."""
    unknown = sorted(set(request.query_params) - allowed)
    if unknown:
        names = ", ".join(n[:40] for n in unknown[:5])
        raise Invalid("invalid_request", f"unknown query parameter: {names}")


async def audit_filters(
    caller: AdminRead,
    request: Request,
    project: Identifier = None,
    token: Identifier = None,
    principal: Annotated[str | None, Query(max_length=128, pattern=PRINTABLE)] = None,
    actor: Identifier = None,
    actor_id: Annotated[  # the old name of actor: still read, no longer documented
        str | None, Query(max_length=64, pattern=IDENTIFIER, include_in_schema=False)
    ] = None,
    decision: Literal["allow", "deny"] | None = None,
    reason: Text = None,
    ip: Annotated[
        str | None,
        Query(max_length=64, description="A client IP address.", pattern=IP_PATTERN),
    ] = None,
    kind: Literal["access", "admin", "security"] | None = None,
    action: Text = None,
    request_id: Annotated[str | None, Query(pattern=r"^[A-Za-z0-9._:-]{1,64}$")] = None,
    fingerprint: Identifier = None,
    since: Rfc3339 | None = None,
    until: Rfc3339 | None = None,
) -> AuditFilter:
    """The filter of ``GET /v1/audit`` and ``GET /v1/audit/export``, narrowed to what the
    caller may see (a project-bound credential: its project only)."""
    if actor is not None and actor_id is not None and actor != actor_id:
        raise Invalid("invalid_request", "actor and actor_id disagree (actor_id is its old name)")
    client_ip = None
    if ip is not None:
        address = parse_ip(ip)
        if address is None:
            raise Invalid("invalid_request", "ip: must be an IP address")
        client_ip = str(address)
    if since is not None and until is not None and since >= until:
        raise Invalid("invalid_time_range", "since must be before until")
    service: TokenService = request.app.state.services.tokens
    if project is not None:
        project_ids: list[str] | None = [(await service.project_for(caller, project)).id]
    elif caller.project_id is not None:
        project_ids = [caller.project_id]
    else:
        project_ids = None
    return AuditFilter(
        project_ids=project_ids,
        token_id=token,
        principal=principal,
        actor_id=actor if actor is not None else actor_id,
        decision=decision,
        reason=reason,
        client_ip=client_ip,
        kind=kind,
        action=action,
        request_id=request_id,
        fingerprint=fingerprint,
        since=since,
        until=until,
    )


Filters = Annotated[AuditFilter, Depends(audit_filters)]


def api_cursor(position: str) -> str:
    """The API's cursor (:mod:`tokenward.pagination`) of a position of the audit log's
    merged order (``<µs>.<chain>.<seq>``, :func:`tokenward.audit.query.make_cursor`)."""
    parsed = parse_cursor(position)
    assert parsed is not None
    at, chain_id, seq = parsed
    return encode_cursor("audit", (micros(at), chain_id, seq))


def log_position(cursor: str | None) -> str | None:
    """The audit log's position of an API cursor (400 ``invalid_cursor`` for a bad one)."""
    key = decode_cursor("audit", cursor, (int, str, int))
    if key is None:
        return None
    try:
        position = make_cursor(from_micros(key[0]), key[1], key[2])
    except OverflowError:
        raise bad_cursor() from None
    if not valid_cursor(position):
        raise bad_cursor()
    return position


@router.get("/audit")
async def list_audit(
    request: Request,
    filters: Filters,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
    cursor: Annotated[
        str | None,
        Query(
            max_length=MAX_CURSOR,
            description="next_cursor of the previous page, or an event's cursor (opaque).",
            json_schema_extra={"pattern": CURSOR_PATTERN},
        ),
    ] = None,
    order: Literal["desc", "asc"] = "desc",
) -> Any:
    """Audit events, newest first; follow ``next_cursor`` for the next page."""
    refuse_unknown(request, FILTER_PARAMETERS | PAGE_PARAMETERS)
    engine = request.app.state.services.engine
    page = await list_events(engine, filters, limit=limit, cursor=log_position(cursor), order=order)
    events = [{**e.public(), "cursor": api_cursor(e.cursor)} for e in page.events]
    next_cursor = api_cursor(page.next_cursor) if page.next_cursor else None
    return page_body("events", events, limit, next_cursor)


@router.get("/audit/export")
async def export_audit(request: Request, filters: Filters) -> StreamingResponse:
    """Every event matching the same filters as the list, oldest first, as JSON lines
    (``application/x-ndjson``)."""
    refuse_unknown(request, FILTER_PARAMETERS)
    engine = request.app.state.services.engine
    return StreamingResponse(
        export_jsonl(engine, filters),
        media_type="application/x-ndjson",
        headers={"Cache-Control": "no-store"},
    )


@router.get("/audit/verify")
async def verify_audit(
    actor: AdminRead,
    request: Request,
    anchor: Annotated[
        list[Annotated[str, StringConstraints(pattern=AUDIT_ANCHOR)]] | None,
        Query(
            max_length=32,
            description="chain:seq:hash printed by an earlier verify (seq:hash: the legacy chain).",
        ),
    ] = None,
) -> Any:
    """Walk every writer's hash chain and cross-check their checkpoints (global admin
    credentials only: it spans every project)."""
    if actor.project_id is not None:
        raise Forbidden("forbidden", "only a global admin credential can verify the whole chain")
    services = request.app.state.services
    anchors = []
    for text in anchor or []:
        parsed = parse_anchor(text)
        if parsed is None:
            raise Invalid("invalid_request", "anchor: chain:seq:hash as a verify printed it")
        anchors.append(parsed)
    await services.audit.flush()
    report = await verify_chain(
        services.engine, ChainKeys.from_hasher(services.hasher), anchors=anchors
    )
    return report.public()
