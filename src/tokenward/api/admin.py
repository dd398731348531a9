"""The admin REST API: projects and tokens."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.responses import JSONResponse

from tokenward.api.audit import refuse_unknown
from tokenward.api.auth import AdminRead, AdminWrite
from tokenward.api.schemas import (
    IDENTIFIER,
    PRINTABLE,
    ExternalId,
    ProjectCreate,
    ProjectUpdate,
    Rfc3339,
    TokenCreate,
    TokenDisable,
    TokenEnable,
    TokenRevoke,
    TokenRotate,
    TokenUpdate,
    printable_parameters,
)
from tokenward.errors import Invalid
from tokenward.pagination import (
    CURSOR_PATTERN,
    DEFAULT_LIMIT,
    MAX_CURSOR,
    MAX_LIMIT,
    decode_cursor,
    encode_cursor,
    page_body,
)
from tokenward.service import Issued, TokenChanges, TokenService, TokenSpec
from tokenward.store.repository import TokenQuery
from tokenward.tokens.durations import parse_rates
from tokenward.tokens.model import TokenRecord
from tokenward.tokens.scopes import unknown_scopes

router = APIRouter(prefix="/v1", dependencies=[Depends(printable_parameters)])

#: The states the list can filter by: a token's state, exactly.
ListedState = Literal[
    "active", "not_yet_valid", "expired", "revoked", "rotated_in_grace", "rotated"
]
ListedKind = Literal["api_key", "access", "refresh", "canary"]
#: ``limit`` and ``cursor`` of every list (:mod:`tokenward.pagination`)
Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT)]
Cursor = Annotated[
    str | None,
    Query(
        max_length=MAX_CURSOR,
        description="next_cursor of the previous page (opaque).",
        json_schema_extra={"pattern": CURSOR_PATTERN},
    ),
]
MetadataFilter = Annotated[
    list[str] | None,
    Query(
        max_length=8,
        description="key=value (repeatable): tokens whose metadata has each of them.",
        json_schema_extra={
            "items": {
                "type": "string",
                "pattern": r"^[^=\x00-\x1f\x7f]{1,64}=[^\x00-\x1f\x7f]{0,512}$",
            }
        },
    ),
]
TOKEN_FILTERS = frozenset(
    {
        "project",
        "identity",
        "name_prefix",
        "principal",
        "metadata",
        "state",
        "kind",
        "environment",
        "expires_before",
        "last_used_before",
        "disabled",
        "quarantined",
        "limit",
        "cursor",
    }
)

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
async def list_projects(
    actor: AdminRead, request: Request, limit: Limit = DEFAULT_LIMIT, cursor: Cursor = None
) -> Any:
    """Projects by name; follow ``next_cursor`` for the next page."""
    key = decode_cursor("projects", cursor, (str,))
    projects = await _service(request).list_projects(
        actor, limit=limit + 1, after=None if key is None else key[0]
    )
    more = len(projects) > limit
    projects = projects[:limit]
    next_cursor = encode_cursor("projects", (projects[-1].name,)) if more and projects else None
    return page_body("projects", [p.public() for p in projects], limit, next_cursor)


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


def _view(record: TokenRecord, request: Request) -> dict[str, Any]:
    return {**record.public(), "state": record.state(_service(request).now).value}


def _metadata_pairs(values: list[str] | None) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for value in values or []:
        key, sep, wanted = value.partition("=")
        if not sep or not key or len(key) > 64 or len(wanted) > 512:
            raise Invalid("invalid_request", "metadata: key=value, such as team=billing")
        pairs[key] = wanted
    return pairs


@router.get("/tokens", tags=["tokens"])
async def list_tokens(
    actor: AdminRead,
    request: Request,
    project: Annotated[str | None, Query(max_length=64, pattern=IDENTIFIER)] = None,
    name_prefix: Annotated[
        str | None, Query(min_length=1, max_length=128, pattern=PRINTABLE)
    ] = None,
    principal: Annotated[str | None, Query(max_length=128, pattern=PRINTABLE)] = None,
    metadata: MetadataFilter = None,
    state: ListedState | None = None,
    kind: ListedKind | None = None,
    environment: Literal["live", "test"] | None = None,
    expires_before: Annotated[
        Rfc3339 | None, Query(description="Tokens with an expiry before this time.")
    ] = None,
    last_used_before: Annotated[
        Rfc3339 | None,
        Query(description="Tokens last used before this time, or never and made before it."),
    ] = None,
    identity: Annotated[
        ExternalId | None,
        Query(description="Only the tokens of the identity with this external id."),
    ] = None,
    disabled: bool | None = None,
    quarantined: bool | None = None,
    limit: Limit = DEFAULT_LIMIT,
    cursor: Cursor = None,
) -> Any:
    """Tokens, newest first, filtered by the database; follow ``next_cursor`` for the next
    page (with the same filters)."""
    refuse_unknown(request, TOKEN_FILTERS)
    query = TokenQuery(
        name_prefix=name_prefix,
        principal=principal,
        metadata=_metadata_pairs(metadata),
        state=state,
        kind=kind,
        environment=environment,
        expires_before=expires_before,
        last_used_before=last_used_before,
        identity=identity,
        disabled=disabled,
        quarantined=quarantined,
    )
    page = await _service(request).search_tokens(
        actor, query, project=project, limit=limit, cursor=cursor
    )
    items = [_view(r, request) for r in page.tokens]
    return page_body("tokens", items, limit, page.next_cursor)


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


@router.patch("/tokens/{token_id}", tags=["tokens"])
async def update_token(
    token_id: Annotated[str, Path(max_length=32, pattern=IDENTIFIER)],
    body: TokenUpdate,
    actor: AdminWrite,
    request: Request,
) -> Any:
    """Change a token's settings: name, metadata, IP allowlist and rate limit freely; scopes,
    expiry and uses only narrower (``422`` naming the field otherwise). Effective on every
    replica when the call returns."""
    changes = TokenChanges(
        name=body.name,
        scopes=body.scopes,
        expires_at=body.expires_at,
        ip_allowlist=body.ip_allowlist,
        rate_limit=None
        if body.rate_limit is None
        else (parse_rates(body.rate_limit) if body.rate_limit else []),
        uses=body.uses,
        metadata=body.metadata,
    )
    record = await _service(request).update_token(actor, token_id, changes)
    return _view(record, request)


@router.post("/tokens/{token_id}/disable", tags=["tokens"])
async def disable_token(
    token_id: Annotated[str, Path(max_length=32, pattern=IDENTIFIER)],
    actor: AdminWrite,
    request: Request,
    body: TokenDisable | None = None,
) -> Any:
    """Switch a token off now, on every replica (verify answers ``disabled``); reversible
    with ``/enable``. Tokens minted from it by exchange or refresh are revoked."""
    reason = (body or TokenDisable()).reason
    return _view(await _service(request).disable_token(actor, token_id, reason), request)


@router.post("/tokens/{token_id}/enable", tags=["tokens"])
async def enable_token(
    token_id: Annotated[str, Path(max_length=32, pattern=IDENTIFIER)],
    actor: AdminWrite,
    request: Request,
    body: TokenEnable | None = None,
) -> Any:
    """Switch a disabled token on again (a quarantine, if any, stays)."""
    note = (body or TokenEnable()).note
    return _view(await _service(request).enable_token(actor, token_id, note), request)
