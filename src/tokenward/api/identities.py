"""The admin REST API: identities (owners of tokens) of a project."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import JSONResponse

from tokenward.api.auth import AdminRead, AdminWrite
from tokenward.api.schemas import (
    IDENTIFIER,
    ExternalId,
    IdentityCreate,
    IdentityUpdate,
    printable_parameters,
)
from tokenward.identities.model import EXTERNAL_ID
from tokenward.identities.service import IdentityChanges, IdentityService

router = APIRouter(
    prefix="/v1/projects/{name}/identities", dependencies=[Depends(printable_parameters)]
)

ProjectParam = Annotated[str, Path(max_length=64, pattern=IDENTIFIER)]
ExternalIdParam = Annotated[str, Path(max_length=128, pattern=EXTERNAL_ID)]


def _service(request: Request) -> IdentityService:
    service: IdentityService = request.app.state.services.identities
    return service


@router.post("", status_code=201, tags=["identities"])
async def create_identity(
    name: ProjectParam, body: IdentityCreate, actor: AdminWrite, request: Request
) -> Any:
    """Create an identity: its tokens (``identity`` when creating one) share its rate limit."""
    identity = await _service(request).create(
        actor, name, body.external_id, metadata=body.metadata, rate_limit=body.rate_limit
    )
    return JSONResponse(identity.public(), 201)


@router.get("", tags=["identities"])
async def list_identities(
    name: ProjectParam,
    actor: AdminRead,
    request: Request,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    after: Annotated[ExternalId | None, Query()] = None,
) -> Any:
    """The project's identities in external-id order (``after``: the last one of a page)."""
    found = await _service(request).list_identities(actor, name, limit=limit, after=after)
    return {
        "identities": [i.public() for i in found],
        "next": found[-1].external_id if len(found) == limit else None,
    }


@router.get("/{external_id}", tags=["identities"])
async def get_identity(
    name: ProjectParam, external_id: ExternalIdParam, actor: AdminRead, request: Request
) -> Any:
    """One identity, with how many unrevoked tokens it has (list them with
    ``GET /v1/tokens?project=…&identity=…``)."""
    service = _service(request)
    identity = await service.get(actor, name, external_id)
    return {**identity.public(), "tokens": await service.store.count_tokens(identity.id)}


@router.patch("/{external_id}", tags=["identities"])
async def update_identity(
    name: ProjectParam,
    external_id: ExternalIdParam,
    body: IdentityUpdate,
    actor: AdminWrite,
    request: Request,
) -> Any:
    """Change metadata or the rate limit (``""``: none); effective on every replica at once."""
    changes = IdentityChanges(metadata=body.metadata, rate_limit=body.rate_limit)
    identity = await _service(request).update(actor, name, external_id, changes)
    return identity.public()


@router.delete("/{external_id}", tags=["identities"])
async def delete_identity(
    name: ProjectParam,
    external_id: ExternalIdParam,
    actor: AdminWrite,
    request: Request,
    confirm: Annotated[
        Literal["true"],
        Query(description="Must be true: every token of the identity is revoked with it."),
    ],
) -> Any:
    """Delete the identity and revoke all its tokens, on every replica at once."""
    revoked = await _service(request).delete(actor, name, external_id, confirm=confirm == "true")
    return {"external_id": external_id, "revoked": revoked}
