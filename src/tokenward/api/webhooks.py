"""``/v1/webhooks``: lifecycle webhook endpoints per project, a test delivery, the log."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import Field, StringConstraints

from tokenward.api.auth import AdminRead, AdminWrite
from tokenward.api.responses import Open, Timestamp
from tokenward.api.schemas import (
    HTTPS_URL_PATTERN,
    IDENTIFIER,
    PRINTABLE,
    Closed,
    documented,
    printable_parameters,
)
from tokenward.errors import Forbidden, Invalid, NotFound, Unavailable
from tokenward.service import TokenService
from tokenward.tokens.model import TokenRecord
from tokenward.webhooks.sender import WebhookSender, new_message_id
from tokenward.webhooks.signing import check_endpoint_url, new_webhook_secret
from tokenward.webhooks.store import EVENT_TYPES, Endpoint, Message, new_endpoint

router = APIRouter(prefix="/v1", tags=["webhooks"], dependencies=[Depends(printable_parameters)])

Id = Annotated[str, Path(max_length=32, pattern=IDENTIFIER)]
EventType = Literal[
    "*",
    "token.created",
    "token.updated",
    "token.rotated",
    "token.revoked",
    "token.expiring",
    "token.leaked",
    "token.quarantined",
    "alert.raised",
]
assert set(EventType.__args__) == {"*", *EVENT_TYPES}  # type: ignore[attr-defined]


class WebhookBody(Closed):
    url: Annotated[
        str,
        StringConstraints(min_length=8, max_length=2048),
        documented(HTTPS_URL_PATTERN, "https (plain http to loopback only)."),
    ]
    project: Annotated[str | None, StringConstraints(max_length=64, pattern=IDENTIFIER)] = Field(
        None,
        description="The project whose events it receives; omitted: every project's "
        "(global admins only), or the caller's own project.",
    )
    events: list[EventType] = Field(
        default_factory=lambda: ["*"],  # type: ignore[arg-type]
        min_length=1,
        max_length=16,
        description="Or ['*'].",
    )
    description: Annotated[str, StringConstraints(max_length=200, pattern=PRINTABLE)] = ""


class Webhook(Open):
    id: str
    project_id: str | None
    project: str | None
    url: str
    events: list[str]
    description: str
    created_at: Timestamp
    created_by: str | None


class WebhookCreated(Webhook):
    secret: str = Field(description="The signing secret (whsec_…), shown this once.")
    warning: str


class WebhookList(Open):
    webhooks: list[Webhook]


class WebhookDelivery(Open):
    id: str = Field(description="The webhook-id header of every attempt.")
    endpoint_id: str | None
    type: str
    subject: str | None
    status: Literal["pending", "delivered", "failed", "dropped"]
    attempts: int
    created_at: Timestamp
    next_attempt_at: Timestamp | None
    last_attempt_at: Timestamp | None
    last_status: int | None
    last_error: str | None


class WebhookDeliveries(Open):
    deliveries: list[WebhookDelivery]


def _sender(request: Request) -> WebhookSender:
    sender: WebhookSender | None = request.app.state.services.webhooks
    if sender is None:
        raise Unavailable("webhooks_unavailable", "webhooks are not set up on this server")
    return sender


def _tokens(request: Request) -> TokenService:
    service: TokenService = request.app.state.services.tokens
    return service


async def _names(request: Request) -> dict[str, str]:
    projects = await _tokens(request).store.list_projects(None)
    return {p.id: p.name for p in projects}


async def _visible(request: Request, actor: TokenRecord, endpoint_id: str) -> Endpoint:
    endpoint = await _sender(request).store.get_endpoint(endpoint_id)
    if endpoint is None or actor.project_id not in (None, endpoint.project_id):
        raise NotFound("webhook_not_found", "no such webhook")
    return endpoint


@router.post("/webhooks", status_code=201)
async def add_webhook(body: WebhookBody, actor: AdminWrite, request: Request) -> Any:
    """Add an endpoint; its signing secret is returned once."""
    try:
        check_endpoint_url(body.url)
    except ValueError as exc:
        raise Invalid("invalid_webhook_url", str(exc)) from None
    project_id = actor.project_id
    if body.project is not None:
        project_id = (await _tokens(request).project_for(actor, body.project)).id
    sender = _sender(request)
    secret = new_webhook_secret()
    events: list[str] = sorted(set(body.events)) if "*" not in body.events else ["*"]
    endpoint = new_endpoint(
        project_id,
        body.url,
        events,
        sender.sealer.seal(secret),
        body.description,
        sender.clock(),
        actor.id,
    )
    await sender.store.add_endpoint(endpoint)
    await _tokens(request).record_action(
        "webhook.add", actor, project_id, None, {"id": endpoint.id, "url": endpoint.url}
    )
    names = await _names(request)
    shown = endpoint.public(names.get(project_id or ""))
    warning = "Store the signing secret now: it is shown only once."
    return JSONResponse({**shown, "secret": secret, "warning": warning}, status_code=201)


@router.get("/webhooks")
async def list_webhooks(
    actor: AdminRead,
    request: Request,
    project: Annotated[str | None, Query(max_length=64, pattern=IDENTIFIER)] = None,
) -> Any:
    """Endpoints the caller may see (one project's with ``project``)."""
    if project is not None:
        ids: list[str] | None = [(await _tokens(request).project_for(actor, project)).id]
    else:
        ids = None if actor.project_id is None else [actor.project_id]
    names = await _names(request)
    endpoints = await _sender(request).store.endpoints(ids)
    return {"webhooks": [e.public(names.get(e.project_id or "")) for e in endpoints]}


@router.get("/webhooks/{webhook_id}")
async def get_webhook(webhook_id: Id, actor: AdminRead, request: Request) -> Any:
    endpoint = await _visible(request, actor, webhook_id)
    return endpoint.public((await _names(request)).get(endpoint.project_id or ""))


@router.delete("/webhooks/{webhook_id}", status_code=204)
async def remove_webhook(webhook_id: Id, actor: AdminWrite, request: Request) -> Response:
    """Remove an endpoint; its pending deliveries are dropped (the log stays)."""
    endpoint = await _visible(request, actor, webhook_id)
    if endpoint.project_id is None and actor.project_id is not None:
        raise Forbidden("forbidden", "only a global admin credential can do this")
    await _sender(request).store.remove_endpoint(endpoint.id)
    await _tokens(request).record_action(
        "webhook.remove", actor, endpoint.project_id, None, {"id": endpoint.id}
    )
    return Response(status_code=204)


@router.post("/webhooks/{webhook_id}/test")
async def test_webhook(webhook_id: Id, actor: AdminWrite, request: Request) -> Any:
    """Send a signed ``webhook.test`` event now (one attempt) and say what came back."""
    endpoint = await _visible(request, actor, webhook_id)
    sender = _sender(request)
    now = sender.clock()
    data = {"webhook_id": endpoint.id, "requested_by": actor.id}
    msg_id = new_message_id()
    body = sender.body("webhook.test", data, now)
    status, error = await sender.post(
        endpoint.url, sender.sealer.open(endpoint.sealed_secret), msg_id, body
    )
    message = Message(
        msg_id,
        endpoint.id,
        endpoint.project_id,
        endpoint.url,
        None,
        "webhook.test",
        endpoint.id,
        data,
        "delivered" if error is None else "failed",
        1,
        now,
        None,
        now,
        status,
        error,
    )
    await sender.store.add_messages([message])
    return message.public()


@router.get("/webhooks/{webhook_id}/deliveries")
async def list_webhook_deliveries(
    webhook_id: Id,
    actor: AdminRead,
    request: Request,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> Any:
    """The endpoint's deliveries, newest first: pending, delivered, failed or dropped."""
    endpoint = await _visible(request, actor, webhook_id)
    messages = await _sender(request).store.messages(endpoint_id=endpoint.id, limit=limit)
    return {"deliveries": [m.public() for m in messages]}
