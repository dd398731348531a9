"""Audit log (filters, pages, live tail, export), alerts, and settings (users and roles)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tokenward.anomaly.store import Alert, AlertFilter
from tokenward.audit.query import make_cursor, valid_cursor
from tokenward.clientip import parse_ip
from tokenward.dashboard.accounts import Role, User, actor_for
from tokenward.dashboard.activity import Query
from tokenward.dashboard.routes_alerting import alerting_context
from tokenward.dashboard.web import (
    PageError,
    checked_form,
    dash,
    ensure_step_up,
    form_list,
    form_text,
    page_headers,
    query_values,
    redirect,
    render,
    require_owner,
    require_writer,
    services_of,
    session_of,
    url,
    user_names,
    visible_projects,
    whole_number,
)
from tokenward.errors import TokenwardError
from tokenward.events import AdminEvent
from tokenward.service import lifetime_days
from tokenward.store.repository import Project

router = APIRouter()


#: The filters of the audit page, its feed and its export (name → longest value).
AUDIT_PARAMETERS = {
    "project": 64,
    "kind": 16,
    "decision": 8,
    "token": 32,
    "reason": 64,
    "ip": 64,
    "before": 72,
    "after": 72,
}


async def _audit_query(
    request: Request, user: User, limit: int = 50
) -> tuple[Query, dict[str, str]]:
    """The feed query from the page's filters, confined to what ``user`` may see."""
    given = query_values(request, AUDIT_PARAMETERS)
    p = {k: given.get(k, "") for k in AUDIT_PARAMETERS}
    projects = await visible_projects(request, user)
    by_name = {pr.name: pr.id for pr in projects}
    if p["project"]:
        if p["project"] not in by_name:
            raise PageError(404, "Not found", "There is no such project that you can see.")
        allowed: list[str] | None = [by_name[p["project"]]]
    else:
        # Events of no project (sign-ins, global credentials) are for owners only.
        allowed = None if user.is_owner else list(by_name.values())
    if p["kind"] not in ("", "access", "admin", "security"):
        raise PageError(400, "Bad filter", "kind is access, admin or security")
    if p["decision"] not in ("", "allow", "deny"):
        raise PageError(400, "Bad filter", "decision is allow or deny")
    for key in ("before", "after"):
        if p[key] and not valid_cursor(p[key]):
            raise PageError(400, "Bad filter", f"{key} must be a position the page gave")
    if p["ip"] and parse_ip(p["ip"]) is None:
        raise PageError(400, "Bad filter", "ip must be an IP address")
    if p["token"] and not re.fullmatch(r"[A-Za-z0-9_-]+", p["token"]):
        raise PageError(400, "Bad filter", "token must be a token id (tok_…)")
    q = Query(
        project_ids=allowed,
        token_id=p["token"] or None,
        kind=p["kind"] or None,
        decision=p["decision"] or None,
        reason=p["reason"] or None,
        client_ip=str(parse_ip(p["ip"])) if p["ip"] else None,
        before=p["before"] or None,
        after=p["after"] or None,
        limit=limit,
    )
    return q, {k: v for k, v in p.items() if v and k not in ("before", "after")}


def _names(projects: list[Project]) -> dict[str, str]:
    return {p.id: p.name for p in projects}


@router.get("/audit")
async def audit_page(request: Request) -> Response:
    session = await session_of(request)
    q, filters = await _audit_query(request, session.user)
    entries = await dash(request).activity.query(q)
    projects = await visible_projects(request, session.user)
    return render(
        request,
        "audit.html",
        entries=entries,
        filters=filters,
        projects=projects,
        names=_names(projects),
        users=await user_names(request),
        older=entries[-1].cursor if len(entries) == q.limit else None,
        newest=entries[0].cursor if entries else make_cursor(datetime.now(UTC), "0", 0),
    )


@router.get("/audit/feed")
async def audit_feed(request: Request) -> Response:
    """Entries after ``after`` (the live tail), oldest first, as JSON."""
    session = await session_of(request)
    q, _ = await _audit_query(request, session.user, limit=200)
    if q.after is None:
        raise PageError(400, "Bad request", "after is required")
    entries = list(reversed(await dash(request).activity.query(q)))
    return page_headers(JSONResponse({"entries": [e.public() for e in entries]}))


@router.get("/audit/export")
async def audit_export(request: Request) -> Response:
    """Every event matching the filters, oldest first, as JSON lines."""
    session = await session_of(request)
    q, _ = await _audit_query(request, session.user)

    async def lines() -> AsyncIterator[bytes]:
        async for line in dash(request).activity.export(q):
            yield line.encode()

    response = StreamingResponse(lines(), media_type="application/x-ndjson")
    response.headers["Content-Disposition"] = 'attachment; filename="tokenward-audit.jsonl"'
    return page_headers(response)


# -- alerts --------------------------------------------------------------------------------
async def _alert_scope(request: Request, user: User) -> tuple[list[Project], list[str] | None]:
    projects = await visible_projects(request, user)
    return projects, None if user.is_owner else [p.id for p in projects]


@router.get("/alerts")
async def alerts_page(request: Request) -> Response:
    session = await session_of(request)
    projects, allowed = await _alert_scope(request, session.user)
    show = request.query_params.get("show", "open")
    acknowledged = None if show == "all" else False
    alerts, _ = await dash(request).alerts.list_alerts(
        AlertFilter(project_ids=allowed, acknowledged=acknowledged), limit=200
    )
    quarantined = {}
    for alert in alerts:
        if alert.token_id and "quarantine" in alert.actions and alert.token_id not in quarantined:
            record = await services_of(request).store.get_token(alert.token_id)
            quarantined[alert.token_id] = bool(record and record.quarantined_at)
    users = {u.id: u.login for u in await dash(request).accounts.list_users()}
    return render(
        request,
        "alerts.html",
        alerts=alerts,
        show=show,
        quarantined=quarantined,
        users=users,
        names=_names(projects),
    )


async def _alert(request: Request, user: User, alert_id: str) -> Alert:
    _, allowed = await _alert_scope(request, user)
    alert = await dash(request).alerts.get_alert(alert_id[:32])
    if alert is None or (allowed is not None and alert.project_id not in allowed):
        raise PageError(404, "Not found", "No such alert.")
    return alert


@router.post("/alerts/{alert_id}/ack")
async def acknowledge(request: Request, alert_id: str) -> Response:
    session = await session_of(request)
    form = await checked_form(request)
    require_writer(session.user)
    alert = await _alert(request, session.user, alert_id)
    now = services_of(request).verifier.clock()
    note = form_text(form, "note", 300)
    await dash(request).alerts.acknowledge(alert.id, session.user.login, note, now)
    await services_of(request).events.admin(
        AdminEvent(
            at=now,
            action="alert.acknowledge",
            actor_id=session.user.id,
            project_id=alert.project_id,
            token_id=alert.token_id,
            detail={"alert": alert.id, "note": note},
        )
    )
    return redirect(url("/alerts"))


@router.post("/alerts/{alert_id}/release")
async def release(request: Request, alert_id: str) -> Response:
    """Lift the quarantine an alert put on its token (the token works again)."""
    session = await session_of(request)
    form = await checked_form(request)
    require_writer(session.user)
    alert = await _alert(request, session.user, alert_id)
    if alert.token_id is None:
        raise PageError(422, "Nothing to release", "This alert quarantined no token.")
    record = await services_of(request).store.get_token(alert.token_id)
    if record is None or not session.user.sees(record.project_id):
        raise PageError(404, "Not found", "No such token.")
    note = form_text(form, "note", 300) or f"released after alert {alert.id}"
    await services_of(request).tokens.release_token(
        actor_for(session.user, record.project_id), record.id, note
    )
    return redirect(url("/alerts"))


# -- settings: users and roles --------------------------------------------------------------
@router.get("/settings")
async def settings_page(request: Request) -> Response:
    session = await session_of(request)
    require_owner(session.user)
    return await settings_response(request)


async def settings_response(request: Request, status: int = 200, **extra: object) -> Response:
    users = await dash(request).accounts.list_users()
    projects = await visible_projects(request, request.state.session.user)
    settings = services_of(request).settings
    store = services_of(request).store
    lifetimes = {p.id: lifetime_days(await store.project_settings(p.id)) for p in projects}
    return render(
        request,
        "settings.html",
        status,
        users=users,
        projects=projects,
        names=_names(projects),
        roles=[r.value for r in Role],
        policy=dash(request).accounts.policy,
        settings=settings,
        lifetimes=lifetimes,
        done=request.query_params.get("done"),
        **(await alerting_context(request)),
        **extra,
    )


def _project_ids(projects: list[Project], chosen: list[str]) -> list[str]:
    known = {p.id for p in projects}
    return [c for c in chosen if c in known]


@router.post("/settings/users")
async def add_user(request: Request) -> Response:
    session = await session_of(request)
    form = await checked_form(request)
    require_owner(session.user)
    prompt = await ensure_step_up(request, session, form, "Adding a user grants access.")
    if prompt is not None:
        return prompt
    projects = await visible_projects(request, session.user)
    try:
        user, password = await dash(request).accounts.create_user(
            form_text(form, "login", 64),
            form_text(form, "role", 16) or "viewer",
            project_ids=_project_ids(projects, form_list(form, "projects", 32)),
            actor=session.user,
        )
    except (TokenwardError, ValueError) as exc:
        message = exc.message if isinstance(exc, TokenwardError) else "unknown role"
        return await settings_response(request, 422, error=message)
    return await settings_response(request, 201, created=(user.login, password))


@router.post("/settings/users/{user_id}/role")
async def change_role(request: Request, user_id: str) -> Response:
    session = await session_of(request)
    form = await checked_form(request)
    require_owner(session.user)
    prompt = await ensure_step_up(
        request, session, form, "Changing a role changes who can do what."
    )
    if prompt is not None:
        return prompt
    projects = await visible_projects(request, session.user)
    try:
        await dash(request).accounts.set_role(
            user_id[:32],
            form_text(form, "role", 16),
            _project_ids(projects, form_list(form, "projects", 32)),
            actor=session.user,
        )
    except (TokenwardError, ValueError) as exc:
        message = exc.message if isinstance(exc, TokenwardError) else "unknown role"
        return await settings_response(request, 422, error=message)
    return redirect(url("/settings?done=role"))


@router.post("/settings/users/{user_id}/reset-mfa")
async def reset_mfa(request: Request, user_id: str) -> Response:
    session = await session_of(request)
    form = await checked_form(request)
    require_owner(session.user)
    prompt = await ensure_step_up(
        request, session, form, "The user must enrol a new authenticator."
    )
    if prompt is not None:
        return prompt
    try:
        await dash(request).accounts.reset_mfa(user_id[:32], actor=session.user)
    except TokenwardError as exc:
        return await settings_response(request, exc.status, error=exc.message)
    return redirect(url("/settings?done=mfa"))


@router.post("/settings/users/{user_id}/remove")
async def remove_user(request: Request, user_id: str) -> Response:
    session = await session_of(request)
    form = await checked_form(request)
    require_owner(session.user)
    prompt = await ensure_step_up(request, session, form, "Removing a user ends their access.")
    if prompt is not None:
        return prompt
    try:
        await dash(request).accounts.remove_user(user_id[:32], actor=session.user)
    except TokenwardError as exc:
        return await settings_response(request, exc.status, error=exc.message)
    return redirect(url("/settings?done=removed"))


@router.post("/settings/projects/{name}/lifetime")
async def set_lifetime(request: Request, name: str) -> Response:
    """A project's lifetime policy: the longest a new token of it may live."""
    session = await session_of(request)
    form = await checked_form(request)
    require_owner(session.user)
    text = form_text(form, "max_days", 6)
    if text and not whole_number(text):
        return await settings_response(request, 422, error="Days must be a whole number.")
    try:
        await services_of(request).tokens.set_lifetime_policy(
            actor_for(session.user, None), name[:64], int(text) if text else None
        )
    except TokenwardError as exc:
        return await settings_response(request, exc.status, error=exc.message)
    return redirect(url("/settings?done=lifetime#lifetime"))
