"""Lifecycle webhooks: endpoints per project (add, test, remove) and their delivery log.

The same endpoints and log as ``/v1/webhooks`` and ``tokenward webhook`` (one sender,
:mod:`tokenward.webhooks`). A user sees the endpoints of the projects they may see; the
server-wide ones (every project's events) are the owners'.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from tokenward.dashboard.accounts import User
from tokenward.dashboard.web import (
    PageError,
    checked_form,
    form_list,
    form_text,
    project_for,
    redirect,
    render,
    require_writer,
    services_of,
    session_of,
    url,
    visible_projects,
)
from tokenward.events import AdminEvent
from tokenward.webhooks.sender import WebhookSender, new_message_id
from tokenward.webhooks.signing import check_webhook_url, new_webhook_secret
from tokenward.webhooks.store import EVENT_TYPES, Endpoint, Message, new_endpoint

router = APIRouter()


def _sender(request: Request) -> WebhookSender:
    sender: WebhookSender | None = services_of(request).webhooks
    if sender is None:
        raise PageError(503, "Unavailable", "Webhooks are not set up on this server.")
    return sender


async def _endpoint(request: Request, user: User, endpoint_id: str) -> Endpoint:
    endpoint = await _sender(request).store.get_endpoint(endpoint_id[:32])
    visible = endpoint is not None and (
        user.is_owner if endpoint.project_id is None else user.sees(endpoint.project_id)
    )
    if endpoint is None or not visible:
        raise PageError(404, "Not found", "No such webhook.")
    return endpoint


async def _page(request: Request, user: User, status: int = 200, **extra: object) -> Response:
    projects = await visible_projects(request, user)
    names = {p.id: p.name for p in projects}
    sender = _sender(request)
    endpoints = await sender.store.endpoints(None if user.is_owner else list(names))
    rows = [
        (e, await sender.store.messages(endpoint_id=e.id, limit=10))
        for e in endpoints
        if e.project_id is None or e.project_id in names
    ]
    return render(
        request,
        "webhooks.html",
        status,
        nav="webhooks",
        rows=rows,
        names=names,
        projects=projects,
        event_types=EVENT_TYPES,
        **extra,
    )


@router.get("/webhooks")
async def webhooks_page(request: Request) -> Response:
    session = await session_of(request)
    return await _page(request, session.user)


@router.post("/webhooks")
async def add_webhook(request: Request) -> Response:
    session = await session_of(request)
    form = await checked_form(request)
    require_writer(session.user)
    user = session.user
    target = form_text(form, "url", 2048)
    try:
        check_webhook_url(target)
    except ValueError as exc:
        return await _page(request, user, 422, error=str(exc))
    project_name = form_text(form, "project", 64)
    if project_name:
        project_id: str | None = (await project_for(request, user, project_name)).id
    elif user.is_owner:
        project_id = None
    else:
        return await _page(request, user, 422, error="Choose one of your projects.")
    events = [e for e in form_list(form, "events", 40) if e in EVENT_TYPES] or ["*"]
    sender = _sender(request)
    secret = new_webhook_secret()
    endpoint = new_endpoint(
        project_id,
        target,
        sorted(events),
        sender.sealer.seal(secret),
        form_text(form, "description", 200),
        sender.clock(),
        user.id,
    )
    await sender.store.add_endpoint(endpoint)
    await services_of(request).events.admin(
        AdminEvent(
            at=sender.clock(),
            action="webhook.add",
            actor_id=user.id,
            project_id=project_id,
            detail={"id": endpoint.id, "url": endpoint.url},
        )
    )
    return await _page(request, user, 200, new_secret=secret, new_id=endpoint.id)


@router.post("/webhooks/{endpoint_id}/test")
async def test_webhook(request: Request, endpoint_id: str) -> Response:
    session = await session_of(request)
    await checked_form(request)
    require_writer(session.user)
    endpoint = await _endpoint(request, session.user, endpoint_id)
    sender = _sender(request)
    now = sender.clock()
    data = {"webhook_id": endpoint.id, "requested_by": session.user.login}
    msg_id = new_message_id()
    body = sender.body("webhook.test", data, now)
    secret = sender.sealer.open(endpoint.sealed_secret)
    code, error = await sender.post(endpoint.url, secret, msg_id, body)
    status = "delivered" if error is None else "failed"
    await sender.store.add_messages(
        [
            Message(
                msg_id,
                endpoint.id,
                endpoint.project_id,
                endpoint.url,
                None,
                "webhook.test",
                endpoint.id,
                data,
                status,
                1,
                now,
                None,
                now,
                code,
                error,
            )
        ]
    )
    outcome = f"HTTP {code}" if code else (error or "no answer")
    message = f"Test delivery {'delivered' if error is None else 'NOT delivered'}: {outcome}"
    return await _page(request, session.user, 200 if error is None else 502, result=message)


@router.post("/webhooks/{endpoint_id}/remove")
async def remove_webhook(request: Request, endpoint_id: str) -> Response:
    session = await session_of(request)
    await checked_form(request)
    require_writer(session.user)
    endpoint = await _endpoint(request, session.user, endpoint_id)
    await _sender(request).store.remove_endpoint(endpoint.id)
    await services_of(request).events.admin(
        AdminEvent(
            at=_sender(request).clock(),
            action="webhook.remove",
            actor_id=session.user.id,
            project_id=endpoint.project_id,
            detail={"id": endpoint.id},
        )
    )
    return redirect(url("/webhooks?done=removed"))
