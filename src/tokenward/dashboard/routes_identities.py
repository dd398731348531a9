"""Identities of a project: list and create, detail (its tokens), change, delete.

Every change goes through :class:`~tokenward.identities.service.IdentityService` with the
user as actor, so the dashboard obeys the API's rules: deleting an identity revokes all its
tokens and needs an explicit confirmation (a checkbox the server checks, and a confirm
dialog in the browser).
"""

from __future__ import annotations

from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.datastructures import FormData

from tokenward.dashboard.accounts import User, actor_for
from tokenward.dashboard.web import (
    PageError,
    checked_form,
    form_text,
    project_for,
    redirect,
    render,
    require_writer,
    services_of,
    session_of,
    url,
)
from tokenward.errors import TokenwardError
from tokenward.identities.model import Identity, valid_external_id
from tokenward.identities.service import IdentityChanges, IdentityService
from tokenward.store.repository import Project
from tokenward.tokens.model import TokenRecord

router = APIRouter()

#: identities shown on the list page (the API pages through any number)
LIST_LIMIT = 500


def _service(request: Request) -> IdentityService:
    service: IdentityService = services_of(request).identities
    return service


def parse_metadata(text: str) -> dict[str, str]:
    """``key=value`` lines; :class:`ValueError` with a message for a person."""
    out: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"Metadata line {number}: write key=value.")
        if len(key.strip()) > 64 or len(value.strip()) > 512:
            raise ValueError(
                f"Metadata line {number}: a key is at most 64 characters, a value 512."
            )
        out[key.strip()] = value.strip()
    return out


def _external_id(value: str) -> str:
    if not valid_external_id(value):
        raise PageError(404, "Not found", "There is no identity with that external id.")
    return value


async def _page(
    request: Request,
    user: User,
    project: Project,
    status: int = 200,
    error: str | None = None,
    values: dict[str, str] | None = None,
    done: str | None = None,
) -> Response:
    found = await _service(request).list_identities(
        actor_for(user, project.id), project.name, limit=LIST_LIMIT
    )
    return render(
        request,
        "identities.html",
        status,
        project=project,
        identities=found,
        error=error,
        values=values or {},
        done=done,
        more=len(found) == LIST_LIMIT,
    )


@router.get("/p/{name}/identities")
async def identities_page(request: Request, name: str) -> Response:
    session = await session_of(request)
    project = await project_for(request, session.user, name)
    done = request.query_params.get("done", "")[:140]
    return await _page(request, session.user, project, done=done or None)


@router.post("/p/{name}/identities")
async def create_identity(request: Request, name: str) -> Response:
    session = await session_of(request)
    project = await project_for(request, session.user, name)
    form = await checked_form(request)
    require_writer(session.user)
    values = {k: form_text(form, k, 4096) for k in ("external_id", "metadata", "rate_limit")}
    try:
        identity = await _service(request).create(
            actor_for(session.user, project.id),
            project.name,
            values["external_id"][:128],
            metadata=parse_metadata(values["metadata"]),
            rate_limit=values["rate_limit"][:200] or None,
        )
    except (TokenwardError, ValueError) as exc:
        message = exc.message if isinstance(exc, TokenwardError) else str(exc)
        return await _page(request, session.user, project, 422, message, values)
    return redirect(url(f"/p/{project.name}/identities/{identity.external_id}"))


async def _detail(
    request: Request,
    user: User,
    project: Project,
    identity: Identity,
    status: int = 200,
    error: str | None = None,
) -> Response:
    actor = actor_for(user, project.id)
    owned: list[TokenRecord] = await services_of(request).tokens.list_tokens(
        actor, project=project.id, identity=identity.external_id, limit=1000
    )
    now = services_of(request).verifier.clock()
    return render(
        request,
        "identity_detail.html",
        status,
        project=project,
        identity=identity,
        tokens=owned,
        now=now,
        error=error,
        metadata_text="\n".join(f"{k}={v}" for k, v in identity.metadata.items()),
    )


@router.get("/p/{name}/identities/{external_id}")
async def identity_page(request: Request, name: str, external_id: str) -> Response:
    session = await session_of(request)
    project = await project_for(request, session.user, name)
    identity = await _get(request, session.user, project, external_id)
    return await _detail(request, session.user, project, identity)


async def _get(request: Request, user: User, project: Project, external_id: str) -> Identity:
    try:
        return await _service(request).get(
            actor_for(user, project.id), project.name, _external_id(external_id)
        )
    except TokenwardError as exc:
        raise PageError(404, "Not found", exc.message) from None


@router.post("/p/{name}/identities/{external_id}")
async def update_identity(request: Request, name: str, external_id: str) -> Response:
    session = await session_of(request)
    project = await project_for(request, session.user, name)
    form = await checked_form(request)
    require_writer(session.user)
    identity = await _get(request, session.user, project, external_id)
    try:
        changes = IdentityChanges(
            metadata=parse_metadata(form_text(form, "metadata", 20_000)),
            rate_limit=form_text(form, "rate_limit", 200),
        )
        await _service(request).update(
            actor_for(session.user, project.id), project.name, identity.external_id, changes
        )
    except (TokenwardError, ValueError) as exc:
        message = exc.message if isinstance(exc, TokenwardError) else str(exc)
        return await _detail(request, session.user, project, identity, 422, message)
    return redirect(url(f"/p/{project.name}/identities/{identity.external_id}"))


@router.post("/p/{name}/identities/{external_id}/delete")
async def delete_identity(request: Request, name: str, external_id: str) -> Response:
    session = await session_of(request)
    project = await project_for(request, session.user, name)
    form: FormData = await checked_form(request)
    require_writer(session.user)
    identity = await _get(request, session.user, project, external_id)
    if form_text(form, "confirm", 8) != "yes":
        message = "Tick the box to confirm: deleting an identity revokes all its tokens."
        return await _detail(request, session.user, project, identity, 422, message)
    revoked = await _service(request).delete(
        actor_for(session.user, project.id), project.name, identity.external_id, confirm=True
    )
    done = f"Deleted {identity.external_id} and revoked {len(revoked)} token(s)."
    return redirect(url(f"/p/{project.name}/identities?" + urlencode({"done": done})))
