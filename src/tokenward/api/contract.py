"""The OpenAPI document as the API's contract: every answer an operation can give.

FastAPI derives the request side from the routes (parameters, bodies, their rules). This
module adds what it cannot see, in one table (:data:`OPERATIONS`), one line per operation:

* the success status and its body (models in :mod:`tokenward.api.responses`);
* every error status the operation can answer, each with the one error body
  (:class:`~tokenward.api.responses.ErrorBody`, what :mod:`tokenward.api.errors` sends);
* how the caller authenticates (``bearer``, OAuth client authentication, or nothing).

Statuses every authenticated operation can answer (401, 403, 429, 503), and those of every
operation with input (422; 400, 413 and 415 with a body) are added to each, so a table line
names only what is particular to its operation. ``operationId`` is the route function's name
(stable: renaming a function is a breaking change the contract test shows).

``tests/api/test_contract.py`` runs schemathesis with every check against a live server, so
a route, status or field that drifts from this document fails CI.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from tokenward.anomaly.config import AnomalyConfig
from tokenward.api import responses as r
from tokenward.api import usage as usage_api
from tokenward.api import webhooks as webhooks_api
from tokenward.api.schemas import HTTPS_URL_PATTERN

JSON = "application/json"
NDJSON = "application/x-ndjson"


@dataclass(frozen=True)
class Operation:
    status: int
    body: type[BaseModel] | None  # None: no body (204)
    errors: tuple[int, ...] = ()
    auth: str = "bearer"  # "bearer", "client" (RFC 6749 §2.3.1) or "none"
    media_type: str = JSON


#: Every operation, by operationId.
OPERATIONS: dict[str, Operation] = {
    "healthz": Operation(200, r.Health, auth="none"),
    "readyz": Operation(200, r.Ready, auth="none"),
    "authorization_server_metadata": Operation(200, r.AuthorizationServerMetadata, auth="none"),
    "verify": Operation(200, r.VerifyResult),
    "introspect": Operation(200, r.Introspection, auth="client"),
    "revoke": Operation(200, r.Revoked, auth="client"),
    "token": Operation(200, r.TokenResponse, (400, 401, 403, 429, 503), auth="none"),
    "list_projects": Operation(200, r.ProjectList, (400,)),
    "create_project": Operation(201, r.Project, (409,)),
    "get_project": Operation(200, r.Project, (404,)),
    "update_project": Operation(200, r.Project, (404,)),
    "create_token": Operation(201, r.IssuedToken, (404,)),
    "list_tokens": Operation(200, r.TokenList, (400, 404)),
    "get_token": Operation(200, r.TokenView, (404,)),
    "revoke_token": Operation(200, r.TokenView, (404, 409)),
    "rotate_token": Operation(201, r.RotatedToken, (404, 409)),
    "update_token": Operation(200, r.TokenView, (404,)),
    "disable_token": Operation(200, r.TokenView, (404, 409)),
    "enable_token": Operation(200, r.TokenView, (404,)),
    "create_identity": Operation(201, r.Identity, (404, 409)),
    "list_identities": Operation(200, r.IdentityList, (404,)),
    "get_identity": Operation(200, r.IdentityView, (404,)),
    "update_identity": Operation(200, r.Identity, (404,)),
    "delete_identity": Operation(200, r.IdentityDeleted, (404,)),
    "get_policy": Operation(200, r.ProjectPolicy, (404,)),
    "set_policy": Operation(200, r.ProjectPolicy, (404,)),
    "add_trust_policy": Operation(201, r.TrustPolicy, (404, 409)),
    "list_trust_policies": Operation(200, r.TrustPolicyList, (404,)),
    "remove_trust_policy": Operation(204, None, (404,)),
    "set_rotation": Operation(200, r.RotationCreated, (404, 409)),
    "get_rotation": Operation(200, r.Rotation, (404,)),
    "remove_rotation": Operation(204, None, (404,)),
    "bind_key": Operation(200, r.Token, (404, 409)),
    "list_audit": Operation(200, r.AuditPage, (400, 404)),
    "export_audit": Operation(200, r.AuditEvent, (404,), media_type=NDJSON),
    "verify_audit": Operation(200, r.AuditVerification),
    "list_alerts": Operation(200, r.AlertPage, (400, 404)),
    "get_alert": Operation(200, r.AlertDetail, (404,)),
    "ack_alert": Operation(200, r.Alert, (404, 409)),
    "quarantine_token": Operation(200, r.TokenView, (404, 409)),
    "release_token": Operation(200, r.TokenView, (404, 409)),
    "list_blocks": Operation(200, r.IpBlockList),
    "add_block": Operation(201, r.IpBlock, (409,)),
    "lift_block": Operation(200, r.LiftedBlock, (404, 409)),
    "get_settings": Operation(200, r.AnomalySettings, (404,)),
    "put_settings": Operation(200, r.AnomalySettings, (404,)),
    "get_usage": Operation(200, usage_api.UsageReport, (404,)),
    "add_webhook": Operation(201, webhooks_api.WebhookCreated, (404,)),
    "list_webhooks": Operation(200, webhooks_api.WebhookList, (404,)),
    "get_webhook": Operation(200, webhooks_api.Webhook, (404,)),
    "remove_webhook": Operation(204, None, (404,)),
    "test_webhook": Operation(200, webhooks_api.WebhookDelivery, (404,)),
    "list_webhook_deliveries": Operation(200, webhooks_api.WebhookDeliveries, (404,)),
    "lookup_tokens": Operation(200, r.TokenLookup),
    "report_leaked": Operation(200, r.LeakedToken, (404,)),
    "report_leaks": Operation(200, r.LeakVerdicts, (401, 503), auth="none"),
}

_AUTHENTICATED = (401, 403, 429, 503)
_WITH_INPUT = (422,)
_WITH_BODY = (400, 413, 415)
_DESCRIPTIONS = {
    200: "OK",
    201: "Created",
    204: "No content",
    400: "Malformed request (not JSON, not storable)",
    401: "No credential, or one that does not verify",
    403: "The credential lacks the scope or the project",
    404: "Not found (or not visible to this credential)",
    409: "Conflict with the current state",
    413: "Body too large",
    415: "Unsupported media type",
    422: "A value breaks a rule",
    429: "Rate limited",
    503: "A dependency is unavailable (fails closed)",
}
#: Error answers whose body is not the error body: a not-ready readyz says what is down.
_READY_503: dict[tuple[str, int], type[BaseModel]] = {("readyz", 503): r.Ready}
SECURITY_SCHEMES = {
    "bearer": {
        "type": "http",
        "scheme": "bearer",
        "description": "A tokenward token (tw_live_… / tw_test_…) with the scope the call needs.",
    },
    "basic": {
        "type": "http",
        "scheme": "basic",
        "description": "OAuth client_secret_basic: a token's id and the token as its secret.",
    },
}


def operation_id(route: APIRoute) -> str:
    """``generate_unique_id_function`` of the app: the route function's name."""
    return route.name


def install_contract(app: FastAPI) -> None:
    """Make ``app.openapi()`` build the full contract (once, then cached)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_document(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def build_document(app: FastAPI) -> dict[str, Any]:
    doc = get_openapi(
        title=app.title,
        version=app.version,
        summary=app.summary,
        routes=app.routes,
        openapi_version=app.openapi_version,
    )
    components = doc.setdefault("components", {})
    schemas: dict[str, Any] = components.setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    models: set[type[BaseModel]] = {r.ErrorBody, *_READY_503.values()}
    models.update(op.body for op in OPERATIONS.values() if op.body is not None)
    ordered = sorted(models, key=lambda m: m.__name__)
    refs, defs = models_json_schema(
        [(m, "serialization") for m in ordered], ref_template="#/components/schemas/{model}"
    )
    schemas.update(defs.get("$defs", {}))
    ref = {m: refs[(m, "serialization")] for m in ordered}
    components["securitySchemes"] = SECURITY_SCHEMES
    settings = AnomalyConfig.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(settings.pop("$defs", {}))
    for option in settings["properties"]["webhook_url"]["anyOf"]:
        if option.get("type") == "string":  # https, as the validator wants
            option["pattern"] = HTTPS_URL_PATTERN
    schemas["AnomalyOverrides"] = {
        **settings,
        "title": "AnomalyOverrides",
        "description": "Overrides of the detector settings: any part of them, merged onto "
        "the defaults (then the global overrides, for a project).",
    }
    seen = set()
    for path, item in doc["paths"].items():
        for method, op in item.items():
            name = op["operationId"]
            spec = OPERATIONS.get(name)
            if spec is None:
                raise LookupError(f"{method.upper()} {path} ({name}) is not in OPERATIONS")
            seen.add(name)
            op["responses"] = _responses(name, op, spec, ref)
            if name == "put_settings":  # a free-form dict in the route, checked by the model
                body = {"schema": {"$ref": "#/components/schemas/AnomalyOverrides"}}
                op["requestBody"]["content"] = {JSON: body}
            if spec.auth == "bearer":
                op["security"] = [{"bearer": []}]
            elif spec.auth == "client":  # Bearer, Basic, or client_secret_post (in the body)
                op["security"] = [{"bearer": []}, {"basic": []}, {}]
            else:
                op["security"] = []
    missing = set(OPERATIONS) - seen
    if missing:
        raise LookupError(f"OPERATIONS names operations no route has: {sorted(missing)}")
    return doc


def _responses(
    name: str, op: dict[str, Any], spec: Operation, ref: dict[type[BaseModel], dict[str, Any]]
) -> dict[str, Any]:
    statuses = set(spec.errors)
    if name == "readyz":
        statuses.add(503)
    if spec.auth != "none":
        statuses.update(_AUTHENTICATED)
    if op.get("parameters") or "requestBody" in op:
        statuses.update(_WITH_INPUT)
    if "requestBody" in op:
        statuses.update(_WITH_BODY)
    out: dict[str, Any] = {}
    success: dict[str, Any] = {"description": _DESCRIPTIONS[spec.status]}
    if spec.body is not None:
        success["content"] = {spec.media_type: {"schema": ref[spec.body]}}
    out[str(spec.status)] = success
    error = {JSON: {"schema": ref[r.ErrorBody]}}
    for status in sorted(statuses):
        body = _READY_503.get((name, status))
        content = {JSON: {"schema": ref[body]}} if body is not None else error
        out[str(status)] = {"description": _DESCRIPTIONS[status], "content": content}
        if status == 401:
            out["401"]["headers"] = {
                "WWW-Authenticate": {
                    "description": "RFC 6750 challenge (error=invalid_token when a credential "
                    "was presented)",
                    "schema": {"type": "string"},
                }
            }
    return out
