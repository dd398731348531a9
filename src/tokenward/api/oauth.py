"""``POST /v1/token`` (RFC 8693 exchange, refresh) and the admin API of short-lived tokens:
project policy, trust policies (workload identity), automatic rotation, DPoP key binding."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

from tokenward.api.auth import AdminRead, AdminWrite, client_ip, refuse_failed_address
from tokenward.api.dpop import dpop_context
from tokenward.api.schemas import (
    DAY_PATTERN,
    HTTPS_URL_PATTERN,
    IDENTIFIER,
    JSON_INTEGER,
    PRINTABLE,
    Duration,
    Scopes,
    documented,
    printable,
    printable_parameters,
)
from tokenward.oauth.exchange import (
    GRANT_EXCHANGE,
    GRANT_REFRESH,
    IDENTITY_TYPES,
    TOKENWARD_TYPES,
    TYPE_ACCESS,
    TokenRequest,
    oauth_error,
)
from tokenward.oauth.policy import ProjectPolicy
from tokenward.sessions import Sessions
from tokenward.tokens.durations import parse_duration
from tokenward.tokens.scopes import parse_scope

router = APIRouter(dependencies=[Depends(printable_parameters)])

MAX_FIELD = 16_384
_FIELDS = {
    "grant_type": 128,
    "subject_token": MAX_FIELD,
    "subject_token_type": 128,
    "refresh_token": 4096,
    "scope": 4096,
    "expires_in": 16,
    "audience": 256,
    "requested_token_type": 128,
    # Client authentication (RFC 6749 §2.3.1), as OAuth libraries send it: accepted and
    # ignored. tokenward registers no clients; the grant's own credential authenticates.
    "client_id": 256,
    "client_secret": 4096,
}
GRANT_TYPES = (GRANT_EXCHANGE, GRANT_REFRESH)
NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}

_TEXT = "^[^\\x00-\\x1f\\x7f]*$"
_COMMON = {
    "scope": {"type": "string", "maxLength": 4096, "pattern": _TEXT, "description": "Scopes."},
    "expires_in": {"type": "integer", "minimum": 1, "maximum": 10**15, "description": "Lifetime."},
    "client_id": {"type": "string", "maxLength": 256, "pattern": _TEXT},
    "client_secret": {"type": "string", "maxLength": 4096, "pattern": _TEXT},
}
_GRANTS = [
    {
        "title": "Token exchange (RFC 8693)",
        "type": "object",
        "required": ["grant_type", "subject_token", "subject_token_type"],
        "additionalProperties": False,
        "properties": {
            "grant_type": {"type": "string", "enum": [GRANT_EXCHANGE]},
            "subject_token": {
                "type": "string",
                "minLength": 1,
                "maxLength": MAX_FIELD,
                "pattern": _TEXT,
            },
            "subject_token_type": {
                "type": "string",
                "enum": [*TOKENWARD_TYPES, *IDENTITY_TYPES],
            },
            "requested_token_type": {"type": "string", "enum": [TYPE_ACCESS]},
            "audience": {
                "type": "string",
                "maxLength": 256,
                "pattern": _TEXT,
                "description": "With a CI identity token (required): the project the tokens "
                "are for (shop), one of its trust policies (shop/deploy) or a trust policy id.",
            },
            **_COMMON,
        },
    },
    {
        "title": "Refresh (RFC 6749 §6)",
        "type": "object",
        "required": ["grant_type", "refresh_token"],
        "additionalProperties": False,
        "properties": {
            "grant_type": {"type": "string", "enum": [GRANT_REFRESH]},
            "refresh_token": {
                "type": "string",
                "minLength": 1,
                "maxLength": 4096,
                "pattern": _TEXT,
            },
            **_COMMON,
        },
    },
]
TOKEN_SCHEMA: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            media: {"schema": {"oneOf": _GRANTS}}
            for media in ("application/x-www-form-urlencoded", "application/json")
        },
    }
}


def _sessions(request: Request) -> Sessions:
    sessions: Sessions = request.app.state.services.sessions
    return sessions


async def _token_fields(request: Request) -> dict[str, str]:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/x-www-form-urlencoded":
        form = await request.form(max_files=0, max_fields=20)
        raw: dict[str, Any] = {}
        for key, value in form.multi_items():
            if key in raw:
                raise oauth_error("invalid_request", f"{key}: given more than once")
            raw[key] = value
    elif ctype == "application/json":
        try:
            raw = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            raise oauth_error("invalid_request", "the request body is not valid JSON") from None
        if not isinstance(raw, dict):
            raise oauth_error("invalid_request", "the body must be a JSON object")
        if isinstance(raw.get("scope"), list):
            raw["scope"] = " ".join(str(s) for s in raw["scope"])
        lifetime = raw.get("expires_in")
        if isinstance(lifetime, float) and lifetime.is_integer():  # 900.0 is a JSON integer
            lifetime = int(lifetime)
        if isinstance(lifetime, int) and not isinstance(lifetime, bool):
            raw["expires_in"] = str(lifetime)
    else:
        raise oauth_error("invalid_request", "use application/x-www-form-urlencoded")
    grant_type = raw.get("grant_type")
    if isinstance(grant_type, str) and grant_type and grant_type not in GRANT_TYPES:
        # Before the parameters: another grant's own (code, username, …) are not ours to judge.
        raise oauth_error(
            "unsupported_grant_type", f"grant_type must be {GRANT_EXCHANGE} or {GRANT_REFRESH}"
        )
    fields: dict[str, str] = {}
    for key, value in raw.items():
        if key not in _FIELDS:
            raise oauth_error("invalid_request", f"unknown parameter: {str(key)[:40]}")
        if not isinstance(value, str):
            raise oauth_error("invalid_request", f"{key}: must be a string")
        if len(value) > _FIELDS[key]:
            raise oauth_error("invalid_request", f"{key}: longer than {_FIELDS[key]}")
        if not printable(value):
            raise oauth_error("invalid_request", f"{key}: control characters are not allowed")
        if value:
            fields[key] = value
    return fields


@router.post("/v1/token", tags=["oauth"], openapi_extra=TOKEN_SCHEMA)
async def token(request: Request) -> JSONResponse:
    """Exchange an API key, a refresh token or a CI identity token for a short-lived token."""
    # the grant's token is the credential: the address is checked before any lookup
    await refuse_failed_address(
        request.app.state.services,
        client_ip(request),
        "token_endpoint",
        method="POST",
        path="/v1/token",
    )
    fields = await _token_fields(request)
    if "grant_type" not in fields:
        raise oauth_error("invalid_request", "grant_type is required")
    expires_in = None
    if "expires_in" in fields:
        if not (fields["expires_in"].isascii() and fields["expires_in"].isdigit()):
            raise oauth_error("invalid_request", "expires_in must be a number of seconds")
        expires_in = int(fields["expires_in"])
    scope = fields["scope"].split() if "scope" in fields else None
    req = TokenRequest(
        grant_type=fields["grant_type"],
        subject_token=fields.get("subject_token"),
        subject_token_type=fields.get("subject_token_type"),
        refresh_token=fields.get("refresh_token"),
        scope=scope,
        expires_in=expires_in,
        audience=fields.get("audience"),
        requested_token_type=fields.get("requested_token_type"),
        dpop=dpop_context(request),
        client_ip=client_ip(request),
    )
    response = await _sessions(request).exchange.handle(req)
    return JSONResponse(response.body(), headers=NO_STORE)


@router.get("/.well-known/oauth-authorization-server", tags=["oauth"])
async def authorization_server_metadata(request: Request) -> JSONResponse:
    """RFC 8414: where the token, introspection and revocation endpoints are, and how a
    client authenticates to each. The issuer is ``public_url`` when set (behind a proxy),
    else the URL this request reached."""
    from tokenward.oauth.dpop import ALGORITHMS

    configured: str | None = request.app.state.services.settings.public_url
    base = configured.rstrip("/") if configured else str(request.base_url).rstrip("/")
    body = {
        "issuer": base,
        "token_endpoint": f"{base}/v1/token",
        "introspection_endpoint": f"{base}/oauth/introspect",
        "revocation_endpoint": f"{base}/oauth/revoke",
        "grant_types_supported": list(GRANT_TYPES),
        # The grant's own credential (the subject or refresh token) authenticates.
        "token_endpoint_auth_methods_supported": ["none"],
        "introspection_endpoint_auth_methods_supported": [
            "client_secret_basic",
            "client_secret_post",
        ],
        # A client may always give up a token it holds, without credentials (RFC 7009 §2.1).
        "revocation_endpoint_auth_methods_supported": [
            "none",
            "client_secret_basic",
            "client_secret_post",
        ],
        "response_types_supported": [],  # no authorization endpoint
        "dpop_signing_alg_values_supported": list(ALGORITHMS),
    }
    return JSONResponse(body, headers={"Cache-Control": "public, max-age=300"})


# -- admin: project policy ------------------------------------------------------------------


def _seconds(value: str | None) -> int | None:
    return None if value is None else int(parse_duration(value).total_seconds())


class Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PolicyBody(Closed):
    max_token_lifetime: Duration | None = Field(None, description="Cap on any token: 90d.")
    access_token_ttl: Duration | None = Field(None, description="Longest access token: 15m.")
    require_dpop: bool = Field(False, strict=True)
    expiry_warning_days: Annotated[int, Field(ge=0, le=365), JSON_INTEGER] | None = None
    leak_action: Literal["revoke", "quarantine"] = Field(
        "revoke", description="What a confirmed leak does to a live token."
    )

    @field_validator("max_token_lifetime", "access_token_ttl")
    @classmethod
    def _duration(cls, value: str | None) -> str | None:
        if value is not None:
            parse_duration(value)
        return value


@router.get("/v1/projects/{project}/policy", tags=["projects"])
async def get_policy(project: ProjectRef, actor: AdminRead, request: Request) -> Any:
    return (await _sessions(request).admin.get_policy(actor, project)).public()


@router.put("/v1/projects/{project}/policy", tags=["projects"])
async def set_policy(
    project: ProjectRef, body: PolicyBody, actor: AdminWrite, request: Request
) -> Any:
    policy = ProjectPolicy(
        max_token_lifetime=_seconds(body.max_token_lifetime),
        access_token_ttl=_seconds(body.access_token_ttl),
        require_dpop=body.require_dpop,
        expiry_warning_days=body.expiry_warning_days,
        leak_action=body.leak_action,
    )
    return (await _sessions(request).admin.set_policy(actor, project, policy)).public()


# -- admin: trust policies ------------------------------------------------------------------
ClaimName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")]
ClaimValue = Annotated[str, StringConstraints(min_length=1, max_length=512, pattern=PRINTABLE)]
ProjectRef = Annotated[str, Path(max_length=64, pattern=IDENTIFIER)]
ProjectQuery = Annotated[str | None, Query(max_length=64, pattern=IDENTIFIER)]
TrustName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$")]
DayDuration = Annotated[str, StringConstraints(max_length=32), documented(DAY_PATTERN)]


class TrustPolicyBody(Closed):
    name: TrustName
    issuer: Annotated[
        str,
        StringConstraints(min_length=8, max_length=512, pattern=PRINTABLE),
        documented(HTTPS_URL_PATTERN),
    ]
    audience: Annotated[str, StringConstraints(min_length=1, max_length=256, pattern=PRINTABLE)]
    claims: dict[ClaimName, ClaimValue] = Field(
        description="Required claims; values may be glob patterns (refs/tags/v*).",
        max_length=16,
        # at least one (the service checks: claims_required); no key outside the pattern
        json_schema_extra={"minProperties": 1, "additionalProperties": False},
    )
    scopes: Scopes
    environment: Literal["live", "test"] = "live"
    principal_claim: ClaimName = "sub"
    max_ttl: DayDuration = Field("15m", description="Longest access token for this identity.")
    refresh_ttl: DayDuration | None = Field(None, description="Refresh tokens, if any: 1h.")

    @field_validator("scopes")
    @classmethod
    def _scopes(cls, value: list[str]) -> list[str]:
        for scope in value:
            parse_scope(scope)
        return value

    @field_validator("max_ttl", "refresh_ttl")
    @classmethod
    def _duration(cls, value: str | None) -> str | None:
        if value is not None and parse_duration(value) > timedelta(days=1):
            raise ValueError("at most 1 day")
        return value


@router.post("/v1/projects/{project}/trust-policies", status_code=201, tags=["trust"])
async def add_trust_policy(
    project: ProjectRef, body: TrustPolicyBody, actor: AdminWrite, request: Request
) -> Any:
    policy = await _sessions(request).admin.add_trust_policy(
        actor,
        project,
        name=body.name,
        issuer=body.issuer,
        audience=body.audience,
        claims=body.claims,
        scopes=body.scopes,
        environment=body.environment,
        principal_claim=body.principal_claim,
        max_ttl=parse_duration(body.max_ttl),
        refresh_ttl=parse_duration(body.refresh_ttl) if body.refresh_ttl else None,
    )
    return JSONResponse(policy.public(), 201)


@router.get("/v1/trust-policies", tags=["trust"])
async def list_trust_policies(
    actor: AdminRead,
    request: Request,
    project: ProjectQuery = None,
) -> Any:
    policies = await _sessions(request).admin.list_trust_policies(actor, project)
    return {"trust_policies": [p.public() for p in policies]}


@router.delete("/v1/projects/{project}/trust-policies/{name}", tags=["trust"])
async def remove_trust_policy(
    project: ProjectRef,
    name: Annotated[str, Path(max_length=64, pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$")],
    actor: AdminWrite,
    request: Request,
) -> Response:
    await _sessions(request).admin.remove_trust_policy(actor, project, name)
    return Response(status_code=204)


# -- admin: automatic rotation --------------------------------------------------------------
class RotationBody(Closed):
    period: Duration = Field(description="Rotate this often: 30d.")
    grace: Duration = Field("1h", description="How long the predecessor keeps working.")
    quiet: Duration | None = Field(
        None, description="Retire the predecessor early after this long without traffic."
    )
    webhook_url: Annotated[
        str,
        StringConstraints(min_length=8, max_length=2048),
        documented(HTTPS_URL_PATTERN, "https (plain http to loopback only)."),
    ]

    @field_validator("period", "grace", "quiet")
    @classmethod
    def _duration(cls, value: str | None) -> str | None:
        if value is not None:
            parse_duration(value)
        return value


@router.put("/v1/tokens/{token_id}/rotation", tags=["tokens"])
async def set_rotation(
    token_id: Annotated[str, Path(max_length=32, pattern=IDENTIFIER)],
    body: RotationBody,
    actor: AdminWrite,
    request: Request,
) -> Any:
    rotation, secret = await _sessions(request).admin.set_rotation(
        actor,
        token_id,
        period=parse_duration(body.period),
        grace=parse_duration(body.grace),
        quiet=parse_duration(body.quiet) if body.quiet else None,
        webhook_url=body.webhook_url,
    )
    return JSONResponse(
        {
            **rotation.public(),
            "webhook_secret": secret,
            "warning": "Store the webhook signing secret now: it is shown only once.",
        },
        headers=NO_STORE,
    )


@router.get("/v1/tokens/{token_id}/rotation", tags=["tokens"])
async def get_rotation(
    token_id: Annotated[str, Path(max_length=32, pattern=IDENTIFIER)],
    actor: AdminRead,
    request: Request,
) -> Any:
    return (await _sessions(request).admin.get_rotation(actor, token_id)).public()


@router.delete("/v1/tokens/{token_id}/rotation", tags=["tokens"])
async def remove_rotation(
    token_id: Annotated[str, Path(max_length=32, pattern=IDENTIFIER)],
    actor: AdminWrite,
    request: Request,
) -> Response:
    await _sessions(request).admin.remove_rotation(actor, token_id)
    return Response(status_code=204)


class BindBody(Closed):
    jkt: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{43}$")] = Field(
        description="RFC 7638 SHA-256 thumbprint of the client's public key."
    )


@router.put("/v1/tokens/{token_id}/dpop", tags=["tokens"])
async def bind_key(
    token_id: Annotated[str, Path(max_length=32, pattern=IDENTIFIER)],
    body: BindBody,
    actor: AdminWrite,
    request: Request,
) -> Any:
    record = await _sessions(request).admin.bind_key(actor, token_id, body.jkt)
    return record.public()
