"""Audit log (filters, pages, live tail, export), alerts, and settings (users and roles)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tokenward.dashboard.accounts import Role, User
from tokenward.dashboard.activity import Entry, Query
from tokenward.dashboard.web import (
    PageError,
    checked_form,
    dash,
    ensure_step_up,
    form_list,
    form_text,
    page_headers,
    redirect,
    render,
    require_owner,
    require_writer,
    services_of,
    session_of,
    url,
    visible_projects,
)
from tokenward.errors import TokenwardError

router = APIRouter()


async def _audit_query(
    request: Request, user: User, limit: int = 50
) -> tuple[Query, dict[str, str]]:
    """The feed query from the page's filters, confined to what ``user`` may see."""
    p = {
        k: request.query_params.get(k, "").strip()[:64]
        for k in ("project", "kind", "decision", "token", "q", "before", "after")
    }
    projects = await visible_projects(request, user)
    by_name = {pr.name: pr.id for pr in projects}
    if p["project"]:
        if p["project"] not in by_name:
            raise PageError(404, "Not found", "There is no such project that you can see.")
        allowed: set[str] | None = {by_name[p["project"]]}
    else:
        allowed = None if user.is_owner else set(by_name.values())
    if p["kind"] not in ("", "access", "admin", "security"):
        raise PageError(400, "Bad filter", "kind is access, admin or security")
    if p["decision"] not in ("", "allow", "deny"):
        raise PageError(400, "Bad filter", "decision is allow or deny")
    for key in ("before", "after"):
        if p[key] and not p[key].isdigit():
            raise PageError(400, "Bad filter", f"{key} must be a whole number")
    q = Query(
        project_ids=allowed,
        token_id=p["token"] or None,
        kind=p["kind"] or None,
        decision=p["decision"] or None,
        text=p["q"] or None,
        before_seq=int(p["before"]) if p["before"] else None,
        after_seq=int(p["after"]) if p["after"] else None,
        limit=limit,
    )
    return q, {k: v for k, v in p.items() if v and k not in ("before", "after")}


def _names(projects: list[object]) -> dict[str, str]:
    return {getattr(p, "id"): getattr(p, "name") for p in projects}  # noqa: B009


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
        names=_names(list(projects)),
        older=entries[-1].seq if len(entries) == q.limit else None,
        newest=entries[0].seq if entries else 0,
    )


@router.get("/audit/feed")
async def audit_feed(request: Request) -> Response:
    """New entries after ``after`` (for the live tail), oldest first, as JSON."""
    session = await session_of(request)
    q, _ = await _audit_query(request, session.user, limit=200)
    entries = list(reversed(await dash(request).activity.query(q)))
    projects = _names(list(await visible_projects(request, session.user)))
    items = [{**e.public(), "project": projects.get(e.project_id or "", "")} for e in entries]
    return page_headers(JSONResponse({"entries": items}))


@router.get("/audit/export")
async def audit_export(request: Request) -> Response:
    """The filtered feed as JSON lines (newest first), as a download."""
    session = await session_of(request)
    q, _ = await _audit_query(request, session.user, limit=100_000)
    entries = await dash(request).activity.query(q)

    async def lines() -> AsyncIterator[bytes]:
        for entry in entries:
            yield (json.dumps(entry.public(), separators=(",", ":")) + "\n").encode()

    response = StreamingResponse(lines(), media_type="application/x-ndjson")
    response.headers["Content-Disposition"] = 'attachment; filename="tokenward-audit.jsonl"'
    return page_headers(response)


# -- alerts --------------------------------------------------------------------------------
@router.get("/alerts")
async def alerts_page(request: Request) -> Response:
    session = await session_of(request)
    projects = await visible_projects(request, session.user)
    allowed = None if session.user.is_owner else {p.id for p in projects}
    alerts: list[Entry] = await dash(request).activity.query(
        Query(project_ids=allowed, kind="security", limit=200)
    )
    users = {u.id: u.login for u in await dash(request).accounts.list_users()}
    return render(
        request,
        "alerts.html",
        alerts=alerts,
        acked=dash(request).alerts.acknowledged,
        users=users,
        names=_names(list(projects)),
    )


@router.post("/alerts/{seq}/ack")
async def acknowledge(request: Request, seq: int) -> Response:
    session = await session_of(request)
    await checked_form(request)
    require_writer(session.user)
    projects = await visible_projects(request, session.user)
    allowed = None if session.user.is_owner else {p.id for p in projects}
    found = await dash(request).activity.query(
        Query(project_ids=allowed, kind="security", after_seq=seq - 1, before_seq=seq + 1, limit=1)
    )
    if not found:
        raise PageError(404, "Not found", "No such alert.")
    now = services_of(request).verifier.clock()
    dash(request).alerts.acknowledged[seq] = (session.user.id, now)
    return redirect(url("/alerts"))


# -- settings: users and roles --------------------------------------------------------------
@router.get("/settings")
async def settings_page(request: Request) -> Response:
    session = await session_of(request)
    require_owner(session.user)
    return await _settings(request)


async def _settings(request: Request, status: int = 200, **extra: object) -> Response:
    users = await dash(request).accounts.list_users()
    projects = await visible_projects(request, request.state.session.user)
    settings = services_of(request).settings
    return render(
        request,
        "settings.html",
        status,
        users=users,
        projects=projects,
        names=_names(list(projects)),
        roles=[r.value for r in Role],
        policy=dash(request).accounts.policy,
        settings=settings,
        **extra,
    )


def _project_ids(request_projects: list[object], chosen: list[str]) -> list[str]:
    known = {getattr(p, "id") for p in request_projects}  # noqa: B009
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
            project_ids=_project_ids(list(projects), form_list(form, "projects", 32)),
            actor=session.user,
        )
    except (TokenwardError, ValueError) as exc:
        message = exc.message if isinstance(exc, TokenwardError) else "unknown role"
        return await _settings(request, 422, error=message)
    return await _settings(request, 201, created=(user.login, password))


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
            _project_ids(list(projects), form_list(form, "projects", 32)),
            actor=session.user,
        )
    except (TokenwardError, ValueError) as exc:
        message = exc.message if isinstance(exc, TokenwardError) else "unknown role"
        return await _settings(request, 422, error=message)
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
        return await _settings(request, exc.status, error=exc.message)
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
        return await _settings(request, exc.status, error=exc.message)
    return redirect(url("/settings?done=removed"))
