"""``/authz``: the decision endpoint for nginx, Traefik, Caddy and Envoy.

The proxy asks before it forwards a request. The original method and URI come from
``X-Original-Method``/``X-Original-URI`` (nginx ``auth_request``), else
``X-Forwarded-Method``/``X-Forwarded-Uri`` (Traefik ForwardAuth, Caddy ``forward_auth``),
else the request line itself below ``/authz`` (Envoy ext_authz with ``path_prefix: /authz``).
The same route policies as the gateway decide. Answers:

* 200 with ``X-Tokenward-*`` identity headers (and ``RateLimit-*``): forward it;
* 401 ``invalid_token`` / ``missing_credential`` with ``WWW-Authenticate`` (RFC 6750);
* 403 ``insufficient_scope``, ``ip_not_allowed``, ``wrong_project``, ``wrong_environment``,
  and ``no_route`` (403, not 404: nginx turns any answer but 2xx/401/403 into a 500);
* 429 ``rate_limited`` / ``too_many_failures`` with ``Retry-After``; 503 ``unavailable``.

Every denial also carries its code in ``X-Tokenward-Error`` (a proxy may show it).

It is plain ASGI in front of the API's router: a decision costs no routing, validation or
serialisation beyond what it needs.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from tokenward.events import current_request, new_request_id
from tokenward.gateway.enforce import Enforcement
from tokenward.tokens.model import Reason

PREFIX = "/authz"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_NO_STORE = (b"cache-control", b"no-store")


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


async def authz(scope: Scope, send: Send, enforcement: Enforcement) -> None:
    started = time.perf_counter()
    method = uri = authorization = None
    fwd_method = fwd_uri = request_id = user_agent = dpop_proof = None
    proto = host = None
    forwarded_for: list[str] = []
    for name, value in scope["headers"]:
        if name == b"authorization":
            authorization = value.decode("latin-1")
        elif name == b"x-original-uri":
            uri = value.decode("latin-1")
        elif name == b"x-original-method":
            method = value.decode("latin-1")
        elif name == b"x-forwarded-uri":
            fwd_uri = value.decode("latin-1")
        elif name == b"x-forwarded-method":
            fwd_method = value.decode("latin-1")
        elif name == b"x-forwarded-for":
            forwarded_for.append(value.decode("latin-1"))
        elif name == b"user-agent":
            user_agent = value[:256].decode("latin-1")
        elif name == b"x-request-id":
            request_id = value.decode("latin-1")
        elif name == b"dpop":
            dpop_proof = value.decode("latin-1")
        elif name == b"x-forwarded-proto":
            proto = value.decode("latin-1")
        elif name == b"x-forwarded-host" or (name == b"host" and host is None):
            host = value.decode("latin-1")
    if uri is None and fwd_uri is not None:
        uri, method = fwd_uri, fwd_method
    if uri is None:
        rest = scope["path"][len(PREFIX) :]
        if not rest:
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
        query = scope.get("query_string", b"")
        raw = scope.get("raw_path") or scope["path"].encode()
        uri = raw.decode("latin-1")[len(PREFIX) :]
        if query:
            uri += "?" + query.decode("latin-1")
        method = scope["method"]
    method = (method or "GET").upper()[:16]
    raw_path = uri.split("?", 1)[0]
    client = scope.get("client")
    client_ip = enforcement.resolver.resolve(client[0] if client else None, forwarded_for)

    # The URL the client called, for a DPoP proof's htu (TOKENWARD_PUBLIC_URL wins).
    url = f"{proto or 'http'}://{host}{raw_path}" if host else None
    outcome = await enforcement.decide(
        method, raw_path, authorization, client_ip, dpop_proof=dpop_proof, url=url
    )

    outer = current_request.get()  # set when served by the full stack (create_asgi)
    if outer is not None:
        request_id = outer.request_id
    elif request_id is None or not _REQUEST_ID.match(request_id):
        request_id = new_request_id()
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
    status = 403 if outcome.decision.reason is Reason.NO_ROUTE else outcome.status
    # The code as a header too: nginx cannot read the body of an auth subrequest.
    headers.append((b"x-tokenward-error", outcome.error.encode()))
    await _respond(send, status, headers, outcome.body())


async def _respond(
    send: Send, status: int, headers: list[tuple[bytes, bytes]], body: dict[str, object] | None
) -> None:
    payload = json.dumps(body).encode() if body is not None else b""
    headers = [*headers, _NO_STORE, (b"content-length", str(len(payload)).encode())]
    if body is not None:
        headers.append((b"content-type", b"application/json"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
