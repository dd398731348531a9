"""Leak response over HTTP: look tokens up by secret, report one leaked, partner reports.

* ``POST /v1/tokens/lookup`` (admin read): what the server knows of secrets found by a
  scanner, in a request body (a secret never goes into a URL);
* ``POST /v1/tokens/{id}/leaked`` (admin write): act on a leak as the project's policy
  says (``tokenward scan --revoke``);
* ``POST /v1/leaks``: a secret-scanning partner's signed report (GitHub's format; no bearer
  credential: the signature is the authentication). A missing or bad signature is answered
  401, changes nothing, and is recorded as a security event (audited).
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path as FilePath
from typing import Annotated, Any

import structlog
from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from tokenward.api.auth import AdminRead, AdminWrite
from tokenward.api.schemas import IDENTIFIER, PRINTABLE, printable_parameters
from tokenward.events import SecurityEvent, current_request
from tokenward.leaks.partner import (
    KEY_ID_HEADER,
    SIGNATURE_HEADER,
    PartnerKeys,
    ReportError,
    parse_report,
    verify_signature,
)
from tokenward.leaks.response import LeakResponder, system_actor
from tokenward.service import TokenService
from tokenward.tokens.format import redact_tokens

log = structlog.get_logger("tokenward.leaks")
router = APIRouter(dependencies=[Depends(printable_parameters)])

#: secrets per lookup request
MAX_LOOKUP = 100


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TokenLookupBody(_Closed):
    tokens: list[Annotated[str, StringConstraints(min_length=1, max_length=200)]] = Field(
        min_length=1, max_length=MAX_LOOKUP, description="Secrets a scanner found."
    )


class LeakedBody(_Closed):
    location: Annotated[str, StringConstraints(max_length=1000, pattern=PRINTABLE)] = Field(
        "", description="Where it was seen: a URL, or file:line."
    )


def _tokens(request: Request) -> TokenService:
    service: TokenService = request.app.state.services.tokens
    return service


def _responder(request: Request) -> LeakResponder:
    services = request.app.state.services
    return LeakResponder(services.tokens, services.anomaly)


@router.post("/v1/tokens/lookup", tags=["leaks"])
async def lookup_tokens(body: TokenLookupBody, actor: AdminRead, request: Request) -> Any:
    """What the server knows of each secret, in order: found or not and, when found (and
    visible to the caller), the token's id, project, state and kind; never the secret."""
    answers = await _responder(request).lookup(actor, body.tokens)
    found = [a["id"] for a in answers if a["found"]]
    detail: dict[str, object] = {"tokens": len(answers), "found": found}
    await _tokens(request).record_action("token.lookup", actor, actor.project_id, None, detail)
    return {"tokens": answers}


@router.post("/v1/tokens/{token_id}/leaked", tags=["leaks"])
async def report_leaked(
    token_id: Annotated[str, Path(max_length=32, pattern=IDENTIFIER)],
    actor: AdminWrite,
    request: Request,
    body: LeakedBody | None = None,
) -> Any:
    """Report a token leaked: revoked or quarantined per its project's ``leak_action``
    (left alone when it is a canary or no longer works), an alert, a ``token.leaked``
    event."""
    record = await _tokens(request).get_token(actor, token_id)
    location = body.location if body else ""
    outcome = await _responder(request).respond(
        actor, record, location=location or "reported by an admin", reporter="admin"
    )
    now = _tokens(request).now
    view = {**outcome.token.public(), "state": outcome.token.state(now).value}
    return {**view, "action": outcome.action, "alert_id": outcome.alert_id}


_REPORT_BODY = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "required": ["token", "type", "url"],
                    "properties": {
                        "token": {"type": "string", "minLength": 1, "maxLength": 1000},
                        "type": {"type": "string", "minLength": 1, "maxLength": 128},
                        "url": {"type": "string", "minLength": 1, "maxLength": 2048},
                        "source": {"type": "string", "maxLength": 64},
                    },
                },
            }
        }
    },
}
_SIGNATURE_HEADERS = [
    {
        "name": KEY_ID_HEADER,
        "in": "header",
        "required": True,
        "description": "Id of the partner key that signed the body.",
        "schema": {"type": "string", "maxLength": 128},
    },
    {
        "name": SIGNATURE_HEADER,
        "in": "header",
        "required": True,
        "description": "Base64 DER ECDSA P-256 SHA-256 signature of the raw body.",
        "schema": {"type": "string", "maxLength": 256},
    },
]


@router.post(
    "/v1/leaks",
    tags=["leaks"],
    openapi_extra={"requestBody": _REPORT_BODY, "parameters": _SIGNATURE_HEADERS},
)
async def report_leaks(request: Request) -> Any:
    """A secret-scanning partner's report (GitHub's format): for each token, confirmed by
    checksum and lookup, the project's ``leak_action``, a critical alert with the public
    URL, and ``token.leaked``; the answer labels each ``true_positive`` or
    ``false_positive`` by the token's SHA-256, never echoing it."""
    services = request.app.state.services
    settings = services.settings
    body = await request.body()
    try:
        if len(body) > settings.leak_report_max_bytes:
            raise ReportError(
                413,
                "payload_too_large",
                f"a leak report is at most {settings.leak_report_max_bytes} bytes",
            )
        keys = _partner_keys(request)
        await verify_signature(
            keys, body, request.headers.get(KEY_ID_HEADER), request.headers.get(SIGNATURE_HEADER)
        )
        reported = parse_report(body, settings.leak_report_max_tokens)
    except ReportError as exc:
        if exc.status == 401:
            await _rejected(request, exc.code)
        return JSONResponse({"error": exc.code, "message": exc.message}, exc.status)
    responder = LeakResponder(services.tokens, services.anomaly)
    actor = system_actor(services.tokens.now)
    labels: dict[str, str] = {}
    answers = []
    for item in reported:
        label = labels.get(item.token)
        if label is None:
            record = await responder.find(item.token)
            label = "false_positive" if record is None else "true_positive"
            if record is not None:
                await responder.respond(
                    actor,
                    record,
                    location=item.url,
                    reporter="partner",
                    source=item.source,
                    secret_type=item.type,
                )
            labels[item.token] = label
        answers.append(
            {"token_hash": item.token_hash, "token_type": item.type[:128], "label": label}
        )
    log.info(
        "leak_report",
        tokens=len(reported),
        true_positives=sum(1 for a in answers if a["label"] == "true_positive"),
    )
    return answers


def _partner_keys(request: Request) -> PartnerKeys:
    """The app's partner keys, built once (the file is read then)."""
    keys: PartnerKeys | None = getattr(request.app.state, "leak_partner_keys", None)
    if keys is None:
        settings = request.app.state.services.settings
        inline = settings.leak_report_keys or ""
        path: FilePath | None = settings.leak_report_keys_file
        try:
            if path is not None:
                inline = (inline + "\n" + path.read_text()).strip()
            keys = PartnerKeys(
                url=settings.leak_report_keys_url,
                inline=inline or None,
                ttl=settings.leak_report_keys_ttl,
            )
        except (OSError, ValueError) as exc:
            log.error("leak_keys_invalid", error=type(exc).__name__)
            raise ReportError(
                503, "leak_keys_unavailable", "the partner's public keys cannot be read"
            ) from None
        request.app.state.leak_partner_keys = keys
    return keys


async def _rejected(request: Request, code: str) -> None:
    """A refused report is a security event: audited, and seen by anomaly handling."""
    ctx = current_request.get()
    key_id = request.headers.get(KEY_ID_HEADER)
    evidence: dict[str, Any] = {"reason": code, "endpoint": "/v1/leaks"}
    if key_id:
        evidence["key_identifier"] = redact_tokens(key_id[:128])
    await request.app.state.services.events.security(
        SecurityEvent(
            at=_now(request),
            kind="leak_report_rejected",
            severity="warning",
            client_ip=ctx.client_ip if ctx else None,
            evidence=evidence,
        )
    )


def _now(request: Request) -> datetime:
    now: datetime = request.app.state.services.tokens.now
    return now
