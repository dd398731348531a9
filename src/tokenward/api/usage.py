"""``GET /v1/usage``: requests, allowed and denied by reason, per minute, hour or day."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import Field

from tokenward.api.audit import refuse_unknown
from tokenward.api.auth import AdminRead
from tokenward.api.responses import Open, Timestamp
from tokenward.api.schemas import IDENTIFIER, Rfc3339, printable_parameters
from tokenward.service import TokenService
from tokenward.usage.query import UsageFilter, usage

router = APIRouter(prefix="/v1", tags=["usage"], dependencies=[Depends(printable_parameters)])

PARAMETERS = frozenset({"project", "token", "identity", "from", "to", "granularity"})
Identifier = Annotated[str | None, Query(max_length=64, pattern=IDENTIFIER)]


class UsageCounts(Open):
    requests: int
    allowed: int
    denied: int
    denied_by_reason: dict[str, int] = Field(description="Denials by their stable reason code.")


class UsageBucket(UsageCounts):
    start: Timestamp


class UsageReport(Open):
    granularity: Literal["minute", "hour", "day"]
    from_: Timestamp = Field(alias="from")
    to: Timestamp
    totals: UsageCounts
    buckets: list[UsageBucket]


@router.get("/usage")
async def get_usage(
    caller: AdminRead,
    request: Request,
    project: Identifier = None,
    token: Identifier = None,
    identity: Identifier = None,
    from_: Annotated[Rfc3339 | None, Query(alias="from")] = None,
    to: Rfc3339 | None = None,
    granularity: Literal["minute", "hour", "day"] = "hour",
) -> Any:
    """Access decisions counted per bucket over ``[from, to)`` (widened to whole buckets,
    UTC; at most 1500 buckets), for a project, a token or an identity, or all the
    caller may see. Counts trail the audit log by a rollup tick (a couple of seconds)."""
    refuse_unknown(request, PARAMETERS)
    services = request.app.state.services
    service: TokenService = services.tokens
    if project is not None:
        project_ids: list[str] | None = [(await service.project_for(caller, project)).id]
    elif caller.project_id is not None:
        project_ids = [caller.project_id]
    else:
        project_ids = None
    if token is not None:
        await service.get_token(caller, token)  # 404 for a token the caller cannot see
    filters = UsageFilter(project_ids=project_ids, token_id=token, identity_id=identity)
    report = await usage(services.engine, filters, granularity, from_, to, service.now)
    return report.public()
