"""DPoP context of an incoming HTTP request (RFC 9449), for the API's own endpoints."""

from __future__ import annotations

from starlette.requests import Request

from tokenward.errors import BadRequest
from tokenward.oauth.dpop import DPoPRequest


def request_htu(request: Request) -> str:
    """The URL a proof's ``htu`` must name: ``public_url`` + path behind a proxy, else our own."""
    base: str | None = request.app.state.services.settings.public_url
    if base:
        return base.rstrip("/") + request.url.path
    return str(request.url.replace(query="", fragment=""))


def dpop_context(request: Request) -> DPoPRequest | None:
    """The request's DPoP proof context (``None`` without a ``DPoP`` header)."""
    proofs = request.headers.getlist("dpop")
    if len(proofs) > 1:
        message = "send exactly one DPoP header"
        raise BadRequest("invalid_dpop_proof", message, error_description=message)
    if not proofs:
        return None
    return DPoPRequest(proofs[0], request.method, request_htu(request))
