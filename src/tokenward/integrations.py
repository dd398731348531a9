"""Verify tokens inside your own Starlette or FastAPI app, against the same store, no HTTP hop.

Starlette::

    from starlette.authentication import requires
    from starlette.middleware.authentication import AuthenticationMiddleware
    from tokenward.integrations import TokenwardBackend

    app.add_middleware(AuthenticationMiddleware, backend=TokenwardBackend(verifier))

    @requires("records:read")          # wildcards in the token's scopes are honoured
    async def list_records(request): ...

FastAPI::

    from tokenward.integrations import TokenGuard
    guard = TokenGuard(verifier)

    @app.get("/records")
    async def records(identity: Annotated[Identity, Depends(guard.require("records:read"))]): ...

Build the verifier with :func:`open_verifier` (same settings and database as the server).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from fastapi import HTTPException
from starlette.authentication import (
    AuthCredentials,
    AuthenticationBackend,
    AuthenticationError,
    BaseUser,
)
from starlette.requests import HTTPConnection, Request

from tokenward.tokens.format import bearer_credential
from tokenward.tokens.model import Reason, TokenRecord
from tokenward.tokens.scopes import ScopeSet
from tokenward.verify import Decision, Verifier


@dataclass(frozen=True, slots=True)
class Identity(BaseUser):
    """Who a verified token acts as."""

    token_id: str
    principal: str
    project: str | None
    environment: str
    scopes: tuple[str, ...]

    @property
    def is_authenticated(self) -> bool:
        return True

    @property
    def display_name(self) -> str:
        return self.principal

    @property
    def identity(self) -> str:
        return self.token_id

    @classmethod
    def of(cls, token: TokenRecord) -> Identity:
        return cls(token.id, token.principal, token.project, token.environment, tuple(token.scopes))


class _WildcardCredentials(AuthCredentials):
    """``scope in request.auth.scopes`` honours wildcards (``records:*`` ⊇ ``records:read``)."""

    def __init__(self, scopes: tuple[str, ...]) -> None:
        super().__init__(list(scopes))
        self.scopes = ScopeSet(scopes)  # type: ignore[assignment]


def _bearer(conn: HTTPConnection) -> str | None:
    return bearer_credential(conn.headers.get("authorization"))


class TokenwardBackend(AuthenticationBackend):
    """Starlette ``AuthenticationBackend``: no header → anonymous; bad token → 400 by default.

    Pass ``on_error`` to ``AuthenticationMiddleware`` to answer 401 instead.
    """

    def __init__(
        self, verifier: Verifier, *, project: str | None = None, environment: str | None = None
    ) -> None:
        self.verifier = verifier
        self.project = project
        self.environment = environment

    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, BaseUser] | None:
        credential = _bearer(conn)
        if credential is None:
            return None
        decision = await self.verifier.verify(
            credential,
            ip=conn.client.host if conn.client else None,
            project=self.project,
            environment=self.environment,
        )
        if not decision.allowed or decision.token is None:
            raise AuthenticationError(decision.reason.value)
        identity = Identity.of(decision.token)
        return _WildcardCredentials(identity.scopes), identity


class TokenGuard:
    """FastAPI dependencies that verify the bearer token and the scope a route needs."""

    def __init__(
        self, verifier: Verifier, *, project: str | None = None, environment: str | None = None
    ) -> None:
        self.verifier = verifier
        self.project = project
        self.environment = environment

    def require(self, scope: str | None = None) -> Callable[[Request], Awaitable[Identity]]:
        async def dependency(request: Request) -> Identity:
            credential = _bearer(request)
            if credential is None:
                raise _http(
                    401, "missing_credential", "send a token as 'Authorization: Bearer <token>'"
                )
            decision = await self.verifier.verify(
                credential,
                scope=scope,
                ip=request.client.host if request.client else None,
                project=self.project,
                environment=self.environment,
            )
            raise_for_decision(decision)
            assert decision.token is not None
            return Identity.of(decision.token)

        return dependency


def raise_for_decision(decision: Decision) -> None:
    """Raise the HTTP error (401/403/429/503, RFC 6750 headers) for a denied decision."""
    if decision.allowed:
        return
    reason = decision.reason
    if reason == Reason.UNAVAILABLE:
        raise _http(503, "unavailable", "a dependency is unavailable; access denied")
    if reason == Reason.RATE_LIMITED:
        retry = decision.ratelimit.reset if decision.ratelimit else 1
        raise _http(429, "rate_limited", "rate limit exceeded", {"Retry-After": str(max(retry, 1))})
    if decision.status == 403:
        raise _http(
            403,
            reason.value,
            f"access denied: {reason.value}",
            {"WWW-Authenticate": f'Bearer error="{_rfc6750(reason)}"'},
        )
    raise _http(
        401,
        "invalid_token",
        f"the token is not valid: {reason.value}",
        {"WWW-Authenticate": 'Bearer error="invalid_token"'},
    )


def _rfc6750(reason: Reason) -> str:
    return "insufficient_scope" if reason == Reason.INSUFFICIENT_SCOPE else "invalid_token"


def _http(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> HTTPException:
    headers = dict(headers or {})
    headers.setdefault("WWW-Authenticate", 'Bearer realm="tokenward"')
    return HTTPException(status, {"error": code, "message": message}, headers)


async def open_verifier(settings: object | None = None) -> Verifier:
    """A verifier on the configured store (``TOKENWARD_*`` settings), for in-process use."""
    from tokenward.app import open_services
    from tokenward.settings import Settings

    services = await open_services(settings if isinstance(settings, Settings) else Settings.load())
    return services.verifier
