"""``GET /v1/audit``: the audit log, filtered and paginated; export; chain verification."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import AwareDatetime

from tokenward.api.auth import AdminRead
from tokenward.api.schemas import printable_parameters
from tokenward.audit.chain import verify_chain
from tokenward.audit.query import AuditFilter, export_jsonl, list_events
from tokenward.audit.records import ChainKeys
from tokenward.errors import Forbidden
from tokenward.service import TokenService
from tokenward.tokens.model import TokenRecord

router = APIRouter(prefix="/v1", tags=["audit"], dependencies=[Depends(printable_parameters)])

Short = Annotated[str | None, Query(max_length=64)]


async def audit_filter(
    request: Request,
    actor: TokenRecord,
    project: str | None,
    **fields: Any,
) -> AuditFilter:
    """The filter asked for, narrowed to what ``actor`` may see (its project only)."""
    service: TokenService = request.app.state.services.tokens
    if project is not None:
        project_ids: list[str] | None = [(await service.project_for(actor, project)).id]
    elif actor.project_id is not None:
        project_ids = [actor.project_id]
    else:
        project_ids = None
    return AuditFilter(project_ids=project_ids, **fields)


@router.get("/audit")
async def list_audit(
    actor: AdminRead,
    request: Request,
    project: Short = None,
    token: Short = None,
    principal: Annotated[str | None, Query(max_length=128)] = None,
    actor_id: Short = None,
    decision: Literal["allow", "deny"] | None = None,
    reason: Short = None,
    ip: Short = None,
    kind: Literal["access", "admin", "security"] | None = None,
    action: Short = None,
    request_id: Short = None,
    fingerprint: Short = None,
    since: AwareDatetime | None = None,
    until: AwareDatetime | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: Annotated[str | None, Query(max_length=20)] = None,
    order: Literal["desc", "asc"] = "desc",
) -> Any:
    """Audit events, newest first; follow ``next_cursor`` for the next page."""
    filters = await audit_filter(
        request,
        actor,
        project,
        token_id=token,
        principal=principal,
        actor_id=actor_id,
        decision=decision,
        reason=reason,
        client_ip=ip,
        kind=kind,
        action=action,
        request_id=request_id,
        fingerprint=fingerprint,
        since=since,
        until=until,
    )
    engine = request.app.state.services.engine
    page = await list_events(engine, filters, limit=limit, cursor=cursor, order=order)
    return {"events": [e.public() for e in page.events], "next_cursor": page.next_cursor}


@router.get("/audit/export")
async def export_audit(
    actor: AdminRead,
    request: Request,
    project: Short = None,
    token: Short = None,
    decision: Literal["allow", "deny"] | None = None,
    reason: Short = None,
    ip: Short = None,
    since: AwareDatetime | None = None,
    until: AwareDatetime | None = None,
) -> StreamingResponse:
    """Every matching event, oldest first, as JSON lines (``application/x-ndjson``)."""
    filters = await audit_filter(
        request,
        actor,
        project,
        token_id=token,
        decision=decision,
        reason=reason,
        client_ip=ip,
        since=since,
        until=until,
    )
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
    anchor: Annotated[str | None, Query(max_length=90, pattern=r"^\d+:[0-9a-f]{64}$")] = None,
) -> Any:
    """Walk the hash chain (global admin credentials only: it spans every project)."""
    if actor.project_id is not None:
        raise Forbidden("forbidden", "only a global admin credential can verify the whole chain")
    services = request.app.state.services
    parsed = None
    if anchor is not None:
        seq, _, digest = anchor.partition(":")
        parsed = (int(seq), digest)
    await services.audit.flush()
    report = await verify_chain(
        services.engine, ChainKeys.from_hasher(services.hasher), anchor=parsed
    )
    return report.public()
