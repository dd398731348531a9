"""``/authz``: the decision endpoint for nginx, Traefik, Caddy and Envoy.

The proxy asks before it forwards a request. The original method and URI each come from the
first present of ``X-Original-Method``/``X-Original-URI`` (nginx ``auth_request``),
``X-Forwarded-Method``/``X-Forwarded-Uri`` (Traefik ForwardAuth, Caddy ``forward_auth``) and
the request line itself below ``/authz`` (Envoy ext_authz with ``path_prefix: /authz``); the
method is ``GET`` when no source names one. Every present source must name the same method
and the same URI, and none of these headers may come twice with different values: else 403
``ambiguous_request`` (each proxy sets one source; another one came from the client). The
same route policies as the gateway decide. Answers:

* 200 with ``X-Tokenward-*`` identity headers (and ``RateLimit-*``): forward it;
* 401 ``invalid_token`` / ``missing_credential`` with ``WWW-Authenticate`` (RFC 6750), and
  ``duplicate_authorization`` for more than one ``Authorization`` header (401, not 400:
  nginx passes only 2xx/401/403);
* 403 ``insufficient_scope``, ``ip_not_allowed``, ``wrong_project``, ``wrong_environment``,
  and ``no_route`` (403, not 404: nginx turns any answer but 2xx/401/403 into a 500);
* 429 ``rate_limited`` / ``too_many_failures`` with ``Retry-After``; 503 ``unavailable``.

Every denial also carries its code in ``X-Tokenward-Error`` (a proxy may show it).

It is plain ASGI in front of the API's router: a decision costs no routing, validation or
serialisation beyond what it needs.
"""

from __future__ import annotations

import json
import time
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from tokenward.events import current_request, recorded_header, request_id_from
from tokenward.gateway.enforce import DUPLICATE_AUTHORIZATION, Enforcement, Outcome
from tokenward.tokens.model import Reason
from tokenward.verify import Decision

PREFIX = "/authz"
_NO_STORE = (b"cache-control", b"no-store")
_JSON = (b"content-type", b"application/json")
_EMPTY_ANSWER = (_NO_STORE, (b"content-length", b"0"))


class AuthzMiddleware:
    """Answers ``/authz`` and ``/authz/…`` itself; everything else goes to the app.

    It sits in front of the framework (see ``create_asgi``); ``api`` is the FastAPI app whose
    state holds the services (else they come from ``scope["app"]``).
    """

    def __init__(self, app: ASGIApp, api: Any = None) -> None:
        self.app = app
        self.api = api

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope.get("path", "")
        if scope["type"] != "http" or not (
            path == PREFIX or (path.startswith(PREFIX) and path[len(PREFIX)] == "/")
        ):
            await self.app(scope, receive, send)
            return
        api = self.api if self.api is not None else scope["app"]
        await authz(scope, send, api.state.services.enforcement)


# The request headers /authz reads, by lower-case name (one dict lookup per header).
(
    _AUTHORIZATION,
    _ORIGINAL_URI,
    _ORIGINAL_METHOD,
    _FORWARDED_URI,
    _FORWARDED_METHOD,
    _FORWARDED_FOR,
    _USER_AGENT,
    _REQUEST_ID_HEADER,
    _DPOP,
    _FORWARDED_PROTO,
    _FORWARDED_HOST,
    _HOST,
) = range(12)
_READ: dict[bytes, int] = {
    b"authorization": _AUTHORIZATION,
    b"x-original-uri": _ORIGINAL_URI,
    b"x-original-method": _ORIGINAL_METHOD,
    b"x-forwarded-uri": _FORWARDED_URI,
    b"x-forwarded-method": _FORWARDED_METHOD,
    b"x-forwarded-for": _FORWARDED_FOR,
    b"user-agent": _USER_AGENT,
    b"x-request-id": _REQUEST_ID_HEADER,
    b"dpop": _DPOP,
    b"x-forwarded-proto": _FORWARDED_PROTO,
    b"x-forwarded-host": _FORWARDED_HOST,
    b"host": _HOST,
}


async def authz(scope: Scope, send: Send, enforcement: Enforcement) -> None:
    started = time.perf_counter()
    # One pass. The first Host counts; a header naming the original request must not come
    # twice with different values, and Authorization not twice at all.
    values: list[bytes | None] = [None] * 12
    forwarded_for: list[str] = []
    repeated = authorizations = 0
    for name, value in scope["headers"]:
        slot = _READ.get(name)
        if slot is None:
            continue
        if slot == _FORWARDED_FOR:
            forwarded_for.append(value.decode("latin-1"))
            continue
        seen = values[slot]
        if seen is None:
            values[slot] = value
        elif slot == _AUTHORIZATION:
            authorizations += 1
        elif slot <= _FORWARDED_METHOD and seen != value:
            repeated += 1
        elif slot != _HOST:
            values[slot] = value
    raw_agent = values[_USER_AGENT]
    user_agent = recorded_header(raw_agent)
    request_id = _text(values[_REQUEST_ID_HEADER])
    dpop_proof = _text(values[_DPOP])
    proto = _text(values[_FORWARDED_PROTO])
    forwarded_host = values[_FORWARDED_HOST]
    host = _text(forwarded_host if forwarded_host is not None else values[_HOST])

    # The request line names the original request only below /authz (Envoy).
    rest = scope["path"][len(PREFIX) :]
    line_uri = line_method = None
    if rest:
        query = scope.get("query_string", b"")
        raw = scope.get("raw_path") or scope["path"].encode()
        line_uri = raw.decode("latin-1")[len(PREFIX) :]
        if query:
            line_uri += "?" + query.decode("latin-1")
        line_method = scope["method"]
    # Per field, the first present source wins; any other present source must agree.
    uri, uri_agrees = _first(_text(values[_ORIGINAL_URI]), _text(values[_FORWARDED_URI]), line_uri)
    method, method_agrees = _first(
        _upper(values[_ORIGINAL_METHOD]), _upper(values[_FORWARDED_METHOD]), line_method
    )
    if uri is None:
        await _respond(
            send,
            400,
            [],
            {
                "error": "missing_original_uri",
                "message": "send X-Original-URI (nginx) or X-Forwarded-Uri (Traefik, "
                "Caddy), or call /authz/<path> (Envoy)",
            },
        )
        return
    method = (method or "GET")[:16]
    raw_path = uri.split("?", 1)[0]
    client = scope.get("client")
    client_ip = enforcement.resolver.resolve(client[0] if client else None, forwarded_for)

    # The URL the client called, for a DPoP proof's htu (TOKENWARD_PUBLIC_URL wins).
    url = f"{proto or 'http'}://{host}{raw_path}" if host else None
    if repeated or not (uri_agrees and method_agrees):
        # Each proxy sets one source; another one, or a second value, came from the client.
        # Which one is genuine cannot be told here, so none is trusted.
        outcome = Outcome(Decision(False, Reason.AMBIGUOUS_REQUEST))
    elif authorizations:
        # Servers disagree on which of several counts (first, last, joined): refuse.
        outcome = Outcome.refused(DUPLICATE_AUTHORIZATION)
    else:
        outcome = await enforcement.decide(
            method,
            raw_path,
            _text(values[_AUTHORIZATION]),
            client_ip,
            dpop_proof=dpop_proof,
            url=url,
        )

    outer = current_request.get()  # set when served by the full stack (create_asgi)
    request_id = outer.request_id if outer is not None else request_id_from(request_id)
    await enforcement.record(
        outcome,
        source="authz",
        method=method,
        path=raw_path,
        client_ip=client_ip,
        request_id=request_id,
        user_agent=user_agent,
        started=started,
    )
    headers = enforcement.raw_headers(outcome)
    if outer is None:
        headers.append((b"x-request-id", request_id.encode()))
    if outcome.allowed:
        await _respond(send, 200, headers, None)
        return
    # nginx's auth_request passes only 2xx, 401 and 403 (anything else becomes a 500).
    status = outcome.status
    if status == 404:
        status = 403  # no_route
    elif status == 400:
        status = 401  # a malformed credential header
    # The code as a header too: nginx cannot read the body of an auth subrequest.
    headers.append((b"x-tokenward-error", outcome.error.encode()))
    await _respond(send, status, headers, outcome.body())


def _first(*sources: str | None) -> tuple[str | None, bool]:
    """The first present source, and whether every present source agrees with it."""
    chosen = None
    for source in sources:
        if source is not None:
            if chosen is None:
                chosen = source
            elif source != chosen:
                return chosen, False
    return chosen, True


def _upper(value: bytes | None) -> str | None:
    return value.decode("latin-1").upper() if value is not None else None


def _text(value: bytes | None) -> str | None:
    return value.decode("latin-1") if value is not None else None


async def _respond(
    send: Send, status: int, headers: list[tuple[bytes, bytes]], body: dict[str, object] | None
) -> None:
    if body is None:
        payload = b""
        headers += _EMPTY_ANSWER
    else:
        payload = json.dumps(body).encode()
        headers += (_NO_STORE, (b"content-length", str(len(payload)).encode()), _JSON)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
