"""Usage: requests, allowed and denied by reason over a chosen range (a chart per bucket).

The same counts as ``GET /v1/usage`` and ``tokenward usage`` (:mod:`tokenward.usage`), for
the projects the signed-in user may see.
"""

from __future__ import annotations

from collections import Counter
from datetime import timedelta

from fastapi import APIRouter, Request
from fastapi.responses import Response

from tokenward.dashboard import charts
from tokenward.dashboard.web import (
    PageError,
    project_for,
    query_values,
    render,
    services_of,
    session_of,
    visible_projects,
)
from tokenward.errors import TokenwardError
from tokenward.usage import UsageFilter, usage

router = APIRouter()

#: The range picker: label → (span, granularity)
RANGES: dict[str, tuple[timedelta, str]] = {
    "1h": (timedelta(hours=1), "minute"),
    "24h": (timedelta(hours=24), "hour"),
    "7d": (timedelta(days=7), "hour"),
    "30d": (timedelta(days=30), "day"),
    "90d": (timedelta(days=90), "day"),
}
FORMATS = {"minute": "%H:%M", "hour": "%d %b %H:00", "day": "%d %b"}


@router.get("/usage")
async def usage_page(request: Request) -> Response:
    session = await session_of(request)
    user = session.user
    p = query_values(request, {"project": 64, "token": 32, "range": 4})
    span_name = p.get("range") or "24h"
    if span_name not in RANGES:
        raise PageError(400, "Bad filter", "range must be one of " + ", ".join(RANGES))
    span, granularity = RANGES[span_name]
    projects = await visible_projects(request, user)
    if p.get("project"):
        project_ids: list[str] | None = [(await project_for(request, user, p["project"])).id]
    elif user.is_owner:
        project_ids = None
    else:
        project_ids = [pr.id for pr in projects]
    services = services_of(request)
    now = services.verifier.clock()
    filters = UsageFilter(project_ids=project_ids, token_id=p.get("token") or None)
    try:
        report = await usage(services.engine, filters, granularity, now - span, None, now)
    except TokenwardError as exc:
        raise PageError(400, "Bad filter", exc.message) from None
    totals = report.totals
    what = p.get("token") or p.get("project") or "all projects"
    return render(
        request,
        "usage.html",
        nav="usage",
        projects=projects,
        filters=p,
        ranges=list(RANGES),
        range=span_name,
        granularity=granularity,
        totals=totals,
        chart=charts.activity_bars(
            report.buckets,
            f"requests and denials of {what}, last {span_name}, per {granularity}",
            when_format=FORMATS[granularity],
        ),
        reasons=charts.reason_bars(Counter(totals.denied), f"denials by reason, last {span_name}"),
    )
