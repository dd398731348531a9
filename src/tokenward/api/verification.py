"""``POST /v1/verify``, RFC 7662 introspection and RFC 7009 revocation."""

from __future__ import annotations

import re
import time
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from tokenward.api.access import emit_access
from tokenward.api.auth import (
    authenticate,
    authenticate_credential,
    client_ip,
    refuse_failed_address,
)
from tokenward.api.errors import error_response
from tokenward.api.middleware import MAX_JSON_DEPTH, json_nests_deeper, too_deep_message
from tokenward.api.schemas import IP_PATTERN
from tokenward.clientip import parse_ip
from tokenward.errors import (
    BadRequest,
    Forbidden,
    Invalid,
    TokenwardError,
    Unauthorized,
    UnsupportedMediaType,
    refuse_pasted_tokens,
)
from tokenward.oauth.clientauth import ClientCredentials, client_credentials, invalid_client
from tokenward.oauth.dpop import DPoPRequest
from tokenward.tokens.credits import MAX_COST, CreditsError, check_cost
from tokenward.tokens.format import TokenFormatError, bearer_credential, parse_token
from tokenward.tokens.model import Reason, TokenRecord

router = APIRouter()

_FIELD_NAME = re.compile(r"^[a-z_]{1,32}$")
_VERIFY_FIELDS = {"token": 4096, "scope": 128, "ip": 64, "project": 64, "environment": 8}
#: DPoP (RFC 9449): the proof the resource server received, with its request's method and URL
_VERIFY_FIELDS.update({"dpop": 8192, "method": 16, "url": 2048})


def _optional(max_length: int, **extra: Any) -> dict[str, Any]:
    return {"type": ["string", "null"], "maxLength": max_length, **extra}


_FORM_TEXT = {"type": "string"}  # read only with client_secret_post, as the credential
#: RFC 7662 §2.1 / RFC 7009 §2.1 parameters, and client_secret_post (RFC 6749 §2.3.1)
CLIENT_FORM_SCHEMA: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/x-www-form-urlencoded": {
                "schema": {
                    "type": "object",
                    "required": ["token"],
                    # other parameters are ignored (RFC 6749 §3.2), up to ten in all
                    "maxProperties": 10,
                    "additionalProperties": {"type": "string"},
                    "properties": {
                        "token": {"type": "string", "minLength": 1, "maxLength": 4096},
                        "token_type_hint": {  # a hint only: every kind is looked up
                            "type": "string",
                            "examples": ["access_token", "refresh_token"],
                        },
                        "client_id": _FORM_TEXT,
                        "client_secret": _FORM_TEXT,
                    },
                }
            }
        },
    }
}
VERIFY_SCHEMA: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["token"],
                    "additionalProperties": False,
                    "properties": {
                        "token": {
                            "type": "string",
                            "maxLength": 4096,
                            "description": "The presented token.",
                        },
                        "scope": _optional(128, example="records:read"),
                        "ip": _optional(64, pattern=IP_PATTERN, example="203.0.113.7"),
                        "project": _optional(64),
                        "environment": {"type": ["string", "null"], "enum": ["live", "test", None]},
                        "dpop": _optional(8192, description="The request's DPoP proof."),
                        "method": _optional(16, example="GET"),
                        "url": _optional(2048, example="https://api.example.com/records"),
                        "cost": {
                            "type": ["integer", "null"],
                            "minimum": 0,
                            "maximum": MAX_COST,
                            "description": "Credits this request spends from a token with "
                            "remaining uses (default 1; 0 needs one left, spends none).",
                        },
                    },
                    # A proof is checked against the request it came with.
                    "dependentSchemas": {
                        "dpop": {
                            "required": ["method", "url"],
                            "properties": {
                                "method": {"type": "string", "minLength": 1},
                                "url": {"type": "string", "minLength": 1},
                            },
                        }
                    },
                }
            }
        },
    }
}


def _verify_body(
    raw: bytes, content_type: str | None = None, max_depth: int = MAX_JSON_DEPTH
) -> dict[str, Any]:
    if json_nests_deeper(raw, max_depth):  # read as JSON even when sent as a form
        raise BadRequest("json_too_deep", too_deep_message(max_depth))
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        # The body is read as JSON whatever its declared type (``curl -d`` says form); one
        # that is declared as something else and is not JSON was sent in the wrong format.
        if content_type and "json" not in content_type.lower():
            raise UnsupportedMediaType(
                "unsupported_media_type", "the body must be JSON (Content-Type: application/json)"
            ) from None
        raise BadRequest("invalid_json", "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise Invalid("invalid_request", "the body must be a JSON object")
    unknown = set(body) - _VERIFY_FIELDS.keys() - {"cost"}
    if unknown:
        # Field names are echoed only when they look like field names (never a pasted secret).
        names = sorted(n if _FIELD_NAME.match(n) else "…" for n in unknown)
        raise Invalid("invalid_request", f"unknown field(s): {', '.join(names)[:200]}")
    if "token" not in body:
        raise Invalid("invalid_request", "token: field required")
    # What the caller typed besides the credential and its proof is recorded (the audit
    # keeps the scope): a token in it is refused, as in every stored text.
    refuse_pasted_tokens(
        **{name: value for name, value in body.items() if name not in ("token", "dpop", "cost")}
    )
    cost = body.pop("cost", None)
    if isinstance(cost, float) and cost.is_integer():  # JSON's 5.0 is the integer 5
        cost = int(cost)
    if cost is not None:
        try:
            body["cost"] = check_cost(cost)
        except CreditsError as exc:
            raise Invalid("invalid_request", str(exc)) from None
    for name, value in body.items():
        if (value is None and name != "token") or name == "cost":
            continue
        if not isinstance(value, str):
            raise Invalid("invalid_request", f"{name}: must be a string")
        if len(value) > _VERIFY_FIELDS[name]:
            raise Invalid("invalid_request", f"{name}: longer than {_VERIFY_FIELDS[name]}")
    if body.get("ip") is not None and parse_ip(body["ip"]) is None:
        raise Invalid("invalid_request", "ip: not an IPv4 or IPv6 address")
    if body.get("environment") not in (None, "live", "test"):
        raise Invalid("invalid_request", "environment: must be 'live' or 'test'")
    if body.get("dpop") and not (body.get("method") and body.get("url")):
        raise Invalid("invalid_request", "dpop: needs the request's method and url")
    return body


async def handle_verify(
    services: Any,
    authorization: str | None,
    raw_body: bytes,
    peer_ip: str | None,
    content_type: str | None = None,
) -> tuple[int, dict[str, Any]]:
    """``POST /v1/verify`` without a framework: status and body, or a TokenwardError.

    Served by the fast path (api/fastpath.py) and by the documented FastAPI route alike.
    """
    started = time.perf_counter()
    caller = await authenticate_credential(
        services,
        bearer_credential(authorization),
        peer_ip,
        ("verify", "admin:read"),
        method="POST",
        path="/v1/verify",
        audit_allowed=False,
    )
    body = _verify_body(raw_body, content_type, services.settings.max_json_depth)
    reported_by = _reported_by(caller, body.get("ip"), peer_ip)
    decision = await services.verifier.verify(
        body["token"] or "",
        scope=body.get("scope"),
        ip=body.get("ip"),
        tenant=caller.project_id,
        environment=body.get("environment"),
        project=body.get("project"),
        dpop=DPoPRequest(body["dpop"], body["method"] or "", body["url"] or "")
        if body.get("dpop")
        else None,
        cost=body.get("cost", 1),
    )
    await emit_access(
        services,
        "verify_api",
        decision,
        started,
        credential=body["token"],
        scope=body.get("scope"),
        method="POST",
        path="/v1/verify",
        client_ip=body.get("ip"),
        actor_id=caller.id,
        ip_reported_by=reported_by,
    )
    result = decision.as_dict()
    if decision.reason == Reason.UNKNOWN or decision.token is None:
        result.update(
            token_id=None, project=None, environment=None, principal=None, scopes=[], identity=None
        )
    if decision.reason == Reason.UNAVAILABLE:
        result.update(error="unavailable", message="a dependency is unavailable; access denied")
        return 503, result
    return 200, result


def _reported_by(caller: TokenRecord, ip: str | None, peer_ip: str | None) -> str | None:
    """Whose word the body's ``ip`` is: the project of a project-bound caller, or ``None`` when
    the server may act on it for everyone (a global caller, or the caller's own address).

    The address decides this verification either way (allowlists, blocks); what it may
    *trigger* (detector counts, blocks) stays in the caller's project (docs/anomaly.md).
    """
    if caller.project_id is None or ip is None:
        return None
    if peer_ip is not None and parse_ip(ip) == parse_ip(peer_ip):
        return None
    return caller.project_id


@router.post("/v1/verify", tags=["verify"], openapi_extra=VERIFY_SCHEMA)
async def verify(request: Request) -> JSONResponse:
    """Is this token good for this action? 200 with ``valid`` true or false; 503 fails closed.

    The caller authenticates with a credential holding ``verify`` or ``admin:read``; a
    project-bound caller only ever sees its own project's tokens.
    """
    status, body = await handle_verify(
        request.app.state.services,
        request.headers.get("authorization"),
        await request.body(),
        client_ip(request),
        request.headers.get("content-type"),
    )
    return JSONResponse(body, status)


def _epoch(value: Any) -> int | None:
    return int(value.timestamp()) if value is not None else None


NO_STORE = {"Cache-Control": "no-store"}
#: RFC 7662/7009 parameters, and those of client authentication (RFC 6749 §2.3.1)
_FORM_FIELDS = {"token", "token_type_hint", "client_id", "client_secret"}


def _invalid_request(message: str) -> BadRequest:
    return BadRequest("invalid_request", message, error_description=message)


async def _form(request: Request) -> dict[str, str]:
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith("application/x-www-form-urlencoded"):
        raise _invalid_request("use application/x-www-form-urlencoded")
    form = await request.form(max_files=0, max_fields=10)
    fields: dict[str, str] = {}
    for key, value in form.multi_items():
        if key not in _FORM_FIELDS or not isinstance(value, str):
            continue
        if key in fields:  # RFC 6749 §3.1: a parameter must not be sent more than once
            raise _invalid_request(f"{key}: given more than once")
        fields[key] = value
    return fields


def _token(form: dict[str, str]) -> str:
    if not form.get("token"):
        raise _invalid_request("token: field required")
    if len(form["token"]) > 4096:
        raise _invalid_request("token: too long")
    return form["token"]


async def _client(
    request: Request, form: dict[str, str], *any_of: str
) -> tuple[TokenRecord | None, ClientCredentials]:
    """The authenticated client (``None`` for a public client) and how it authenticated.

    A Bearer (or DPoP) credential goes through the same check as every admin call; the
    client_secret_basic and client_secret_post secrets are tokenward credentials too, and a
    ``client_id`` sent with them must be that credential's id (``tok_…``).
    """
    creds = client_credentials(request.headers.get("authorization"), form)
    if creds.method == "none":
        return None, creds
    if creds.method == "bearer":
        return await authenticate(request, *any_of), creds
    try:
        record = await authenticate_credential(
            request.app.state.services,
            creds.secret,
            client_ip(request),
            any_of,
            method=request.method,
            path=request.url.path,
        )
    except Unauthorized:
        raise invalid_client("the client credentials are not valid") from None
    if creds.client_id is not None and creds.client_id != record.id:
        raise invalid_client("client_id is not the id of the credential in client_secret")
    request.state.actor = record
    return record, creds


def _client_error(request: Request, exc: TokenwardError) -> JSONResponse:
    """RFC 6749 §5.2: a client that tried Basic is challenged with Basic."""
    response = error_response(exc.status, exc.code, exc.message, **exc.extra)
    scheme = request.headers.get("authorization", "").strip().partition(" ")[0].lower()
    if exc.status == 401 and scheme == "basic":
        response.headers["WWW-Authenticate"] = 'Basic realm="tokenward"'
    return response


@router.post("/oauth/introspect", tags=["oauth"], openapi_extra=CLIENT_FORM_SCHEMA)
async def introspect(request: Request) -> JSONResponse:
    """RFC 7662: ``{"active": false}`` for anything that is not a currently valid token.

    The caller authenticates with a credential holding ``verify`` or ``admin:read``: as a
    Bearer token, or as the client secret (client_secret_basic or client_secret_post).
    """
    form = await _form(request)
    try:
        caller, _ = await _client(request, form, "verify", "admin:read")
        if caller is None:
            raise Unauthorized(
                "missing_credential",
                "authenticate with 'Authorization: Bearer <token>' or as an OAuth client",
            )
    except (Unauthorized, BadRequest) as exc:
        return _client_error(request, exc)
    token_value = _token(form)
    services = request.app.state.services
    decision = await services.verifier.verify(token_value, tenant=caller.project_id, consume=False)
    if not decision.allowed or decision.token is None:
        return JSONResponse({"active": False}, headers=NO_STORE)
    token = decision.token
    body = {
        "active": True,
        "scope": " ".join(token.scopes),
        "client_id": token.project or "",
        "sub": token.principal,
        "username": token.principal,
        "token_type": token.kind,
        "exp": _epoch(token.expires_at),
        "iat": _epoch(token.created_at),
        "nbf": _epoch(token.not_before),
        "jti": token.id,
        "iss": "tokenward",
        "environment": token.environment,
        "project": token.project,
        "cnf": {"jkt": token.dpop_jkt} if token.dpop_jkt else None,
    }
    return JSONResponse({k: v for k, v in body.items() if v is not None}, headers=NO_STORE)


@router.post("/oauth/revoke", tags=["oauth"], openapi_extra=CLIENT_FORM_SCHEMA)
async def revoke(request: Request) -> JSONResponse:
    """RFC 7009: revoke a token; answers 200 whether or not the token was known.

    A client may always give up a token it holds: with no client credentials (a public
    client), or presenting the token itself as its credential. Any other token needs an
    ``admin:write`` credential (Bearer, client_secret_basic or client_secret_post).
    Revoking a refresh token revokes the access tokens of its grant (its family) too.
    """
    form = await _form(request)
    services = request.app.state.services
    try:
        creds = client_credentials(request.headers.get("authorization"), form)
    except (BadRequest, Unauthorized) as exc:
        return _client_error(request, exc)
    token_value = _token(form)
    try:
        parse_token(token_value)
    except TokenFormatError:
        well_formed = False
    else:
        well_formed = True
    if creds.method == "none" or creds.secret == token_value:
        # the token is its own credential (a public client): the same failed-credential guard
        await refuse_failed_address(
            services, client_ip(request), "admin_auth", method="POST", path="/oauth/revoke"
        )
        if well_formed:
            found = await services.verifier.verify(
                token_value, consume=False, ip=client_ip(request)
            )
            # A canary answers "unknown" to its holder; its holder cannot switch it off either.
            if found.token is not None and found.reason != Reason.UNKNOWN:
                await services.tokens.revoke_own(found.token, "revoked by its holder (RFC 7009)")
                await _sessions(request).exchange.revoke_grant(
                    found.token, actor_id=found.token.id, client_ip=client_ip(request)
                )
        return JSONResponse({}, headers=NO_STORE)
    try:
        caller, _ = await _client(request, form, "admin:write")
    except Forbidden as refused:
        # RFC 7009 §2.1: a client may revoke the tokens issued to it, i.e. those granted
        # from its credential (an API key revoking what it was exchanged for).
        own = refused.caller
        if well_formed and own is not None and await _revoke_granted(request, own, token_value):
            return JSONResponse({}, headers=NO_STORE)
        message = "revoking another token needs admin:write"
        return error_response(403, "insufficient_scope", message, error_description=message)
    except (Unauthorized, BadRequest) as exc:
        return _client_error(request, exc)
    assert caller is not None
    if not well_formed:
        return JSONResponse({}, headers=NO_STORE)
    decision = await services.verifier.verify(token_value, tenant=caller.project_id, consume=False)
    if decision.token is not None and decision.reason != Reason.UNKNOWN:
        await services.tokens.revoke_token(caller, decision.token.id, "revoked via RFC 7009")
        await _sessions(request).exchange.revoke_grant(
            decision.token, actor_id=caller.id, client_ip=client_ip(request)
        )
    return JSONResponse({}, headers=NO_STORE)


async def _revoke_granted(request: Request, caller: TokenRecord, token_value: str) -> bool:
    """Revoke the token ``token_value`` if it was granted from ``caller`` (directly, or from a
    token granted from it); whether it was."""
    services = request.app.state.services
    found = await services.verifier.verify(token_value, tenant=caller.project_id, consume=False)
    target = found.token
    if target is None or found.reason == Reason.UNKNOWN:
        return False
    token_id: str | None = target.id
    for _ in range(_GRANT_DEPTH):
        link = await services.store.grant_link(token_id) if token_id else None
        if link is None:
            return False
        if caller.id in (link.parent_id, link.origin_id):
            break
        token_id = link.parent_id
    else:
        return False
    reason = f"revoked via RFC 7009 by {caller.id}, which it was granted from"
    await services.tokens.revoke_own(target, reason, actor=caller)
    await _sessions(request).exchange.revoke_grant(
        target, actor_id=caller.id, client_ip=client_ip(request)
    )
    return True


#: how far up the grant links a client's own tokens are looked for (exchange, refresh,
#: narrowing: a few levels in practice)
_GRANT_DEPTH = 16


def _sessions(request: Request) -> Any:
    return request.app.state.services.sessions
