"""The admin REST API: projects and tokens."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.responses import JSONResponse

from tokenward.api.auth import AdminRead, AdminWrite
from tokenward.api.schemas import (
    IDENTIFIER,
    ExternalId,
    ProjectCreate,
    ProjectUpdate,
    TokenCreate,
    TokenRevoke,
    TokenRotate,
    printable_parameters,
)
from tokenward.errors import Invalid
from tokenward.service import Issued, TokenService, TokenSpec
from tokenward.tokens.durations import parse_rates
from tokenward.tokens.model import TokenRecord, TokenState
from tokenward.tokens.scopes import unknown_scopes

router = APIRouter(prefix="/v1", dependencies=[Depends(printable_parameters)])

#: The states the list can filter by (``active`` includes rotated-in-grace and not-yet-valid).
ListedState = Literal["active", "expired", "revoked", "rotated"]

ONCE_WARNING = "Store this token now: it is shown only once and cannot be recovered."
#: The scopes tokenward itself asks for (admin API, verify API, introspection).
BUILTIN_SCOPES = ("admin:read", "admin:write", "verify")
#: How many of a project's tokens are read to learn the scopes in use.
KNOWN_FROM_TOKENS = 1000


def _service(request: Request) -> TokenService:
    service: TokenService = request.app.state.services.tokens
    return service


def _issued(issued: Issued, status: int = 201, **extra: Any) -> JSONResponse:
    body = {"token": issued.secret, **issued.record.public(), "warning": ONCE_WARNING, **extra}
    return JSONResponse(body, status, headers={"Cache-Control": "no-store"})


@router.post("/projects", status_code=201, tags=["projects"])
async def create_project(body: ProjectCreate, actor: AdminWrite, request: Request) -> Any:
    project = await _service(request).create_project(actor, body.name)
    return JSONResponse(project.public(), 201)


@router.get("/projects", tags=["projects"])
async def list_projects(actor: AdminRead, request: Request) -> Any:
    projects = await _service(request).list_projects(actor)
    return {"projects": [p.public() for p in projects]}


@router.get("/projects/{name}", tags=["projects"])
async def get_project(
    name: Annotated[str, Path(max_length=64, pattern=IDENTIFIER)],
    actor: AdminRead,
    request: Request,
) -> Any:
    return (await _service(request).project_for(actor, name)).public()


@router.patch("/projects/{name}", tags=["projects"])
async def update_project(
    name: Annotated[str, Path(max_length=64, pattern=IDENTIFIER)],
    body: ProjectUpdate,
    actor: AdminWrite,
    request: Request,
) -> Any:
    """Set the project's IP allowlist (every token of it is then bound to those networks)."""
    project = await _service(request).set_project_ip_allowlist(actor, name, body.ip_allowlist)
    return project.public()


@router.post("/tokens", status_code=201, tags=["tokens"])
async def create_token(body: TokenCreate, actor: AdminWrite, request: Request) -> Any:
    spec = TokenSpec(
        project=body.project,
        scopes=body.scopes,
        environment=body.environment,
        name=body.name,
        kind=body.kind,
        principal=body.principal,
        expires_at=body.expires_at,
        ttl=body.ttl_delta(),
        not_before=body.not_before,
        ip_allowlist=body.ip_allowlist,
        rate_limit=parse_rates(body.rate_limit) if body.rate_limit else [],
        uses=body.uses,
        metadata=body.metadata,
        identity=body.identity,
        refill=body.refill_spec(),
    )
    notices = await _scope_notices(request, actor, body.project, body.scopes)
    if notices and body.strict:
        raise Invalid("unknown_scope", " ".join(n["message"] for n in notices))
    issued = await _service(request).create_token(actor, spec)
    if issued.record.expires_at is None:
        notices.append(
            {
                "code": "never_expires",
                "message": "this token never expires: give it a lifetime (ttl, e.g. 90d) "
                "or rotate it",
            }
        )
    return _issued(issued, warnings=notices)


async def _scope_notices(
    request: Request, actor: TokenRecord, project: str | None, scopes: list[str]
) -> list[dict[str, str]]:
    """An ``unknown_scope`` notice for each scope that no route policy, no built-in scope and
    no token of the project uses (read before the token is made, so ``strict`` refuses it)."""
    known: list[str] = []
    enforcement = request.app.state.services.enforcement
    if enforcement is not None:
        known += enforcement.policy.scopes()
    if project is not None:
        tokens = await _service(request).list_tokens(
            actor, project=project, limit=KNOWN_FROM_TOKENS
        )
        known += [scope for record in tokens for scope in record.scopes]
    notices = []
    for scope, close in unknown_scopes(scopes, known, BUILTIN_SCOPES):
        hint = f" (did you mean {close!r}?)" if close else ""
        notices.append(
            {
                "code": "unknown_scope",
                "message": f"scope {scope!r} matches no route policy, no built-in scope and no "
                f"token of the project{hint}; scopes are resource:action",
            }
        )
    return notices


@router.get("/tokens", tags=["tokens"])
async def list_tokens(
    actor: AdminRead,
    request: Request,
    project: Annotated[str | None, Query(max_length=64, pattern=IDENTIFIER)] = None,
    state: ListedState | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    after: Annotated[str | None, Query(max_length=32, pattern=IDENTIFIER)] = None,
    identity: Annotated[
        ExternalId | None,
        Query(description="Only the tokens of the identity with this external id."),
    ] = None,
) -> Any:
    records = await _service(request).list_tokens(
        actor,
        project=project,
        state=TokenState(state) if state else None,
        limit=limit,
        after=after,
        identity=identity,
    )
    now = _service(request).now
    items = [{**r.public(), "state": r.state(now).value} for r in records]
    return {"tokens": items, "next": records[-1].id if len(records) == limit else None}


@router.get("/tokens/{token_id}", tags=["tokens"])
async def get_token(
    token_id: Annotated[str, Path(max_length=32, pattern=IDENTIFIER)],
    actor: AdminRead,
    request: Request,
) -> Any:
    record = await _service(request).get_token(actor, token_id)
    return {**record.public(), "state": record.state(_service(request).now).value}


@router.post("/tokens/{token_id}/revoke", tags=["tokens"])
async def revoke_token(
    token_id: Annotated[str, Path(max_length=32, pattern=IDENTIFIER)],
    actor: AdminWrite,
    request: Request,
    body: TokenRevoke | None = None,
) -> Any:
    reason = body.reason if body else ""
    record = await _service(request).revoke_token(actor, token_id, reason)
    return {**record.public(), "state": record.state(_service(request).now).value}


@router.post("/tokens/{token_id}/rotate", tags=["tokens"])
async def rotate_token(
    token_id: Annotated[str, Path(max_length=32, pattern=IDENTIFIER)],
    actor: AdminWrite,
    request: Request,
    body: TokenRotate | None = None,
) -> Response:
    grace = (body or TokenRotate()).grace_delta()
    issued, old = await _service(request).rotate_token(actor, token_id, grace)
    return _issued(issued, 201, previous={"id": old.id, "grace_until": old.public()["grace_until"]})
