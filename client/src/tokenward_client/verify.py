"""For a service that checks the tokens its callers present: ``POST /v1/verify`` and RFC 7662
introspection, sync and async.

The credential given here is the service's own (a token with the ``verify`` scope), not
the caller's; the caller's token travels in the body, never in a URL.

::

    checker = VerifyClient("https://tokens.example.com", os.environ["TOKENWARD_VERIFY_TOKEN"])
    result = checker.verify(presented, scope="records:read", ip=client_ip)
    if not result["valid"]:
        deny(result["reason"])          # stable codes: revoked, expired, scope_denied, …
"""

from __future__ import annotations

from typing import Any, cast

import httpx

from tokenward_client.admin import USER_AGENT, AdminAPIError, trust
from tokenward_client.models import Introspection, VerifyResult


def _verify_body(
    token: str,
    scope: str | None,
    ip: str | None,
    project: str | None,
    environment: str | None,
    dpop: tuple[str, str, str] | None,
) -> dict[str, Any]:
    body: dict[str, Any] = {"token": token}
    for name, value in (("scope", scope), ("ip", ip), ("project", project)):
        if value is not None:
            body[name] = value
    if environment is not None:
        body["environment"] = environment
    if dpop is not None:
        body["dpop"], body["method"], body["url"] = dpop
    return body


def _result(response: httpx.Response) -> Any:
    """A decision (also the 503 one, ``reason: unavailable``), or an :class:`AdminAPIError`
    for a request the server refused (the service's credential, a malformed body)."""
    try:
        body = response.json()
    except ValueError:
        raise AdminAPIError(
            response.status_code, "http_error", f"HTTP {response.status_code}"
        ) from None
    if response.status_code >= 400 and not (isinstance(body, dict) and "valid" in body):
        raise AdminAPIError(response.status_code, str(body.get("error")), str(body.get("message")))
    return body


class VerifyClient:
    def __init__(
        self, url: str, credential: str, *, verify: bool | str = True, timeout: float = 5.0
    ) -> None:
        self._http = httpx.Client(
            base_url=url.rstrip("/"),
            headers={"Authorization": f"Bearer {credential}", "User-Agent": USER_AGENT},
            verify=trust(verify),
            timeout=timeout,
        )

    def __enter__(self) -> VerifyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def verify(
        self,
        token: str,
        *,
        scope: str | None = None,
        ip: str | None = None,
        project: str | None = None,
        environment: str | None = None,
        dpop: tuple[str, str, str] | None = None,
    ) -> VerifyResult:
        """The decision on ``token`` (``dpop`` = the request's proof, method and URL)."""
        body = _verify_body(token, scope, ip, project, environment, dpop)
        return cast(VerifyResult, _result(self._http.post("/v1/verify", json=body)))

    def introspect(self, token: str) -> Introspection:
        """RFC 7662: ``{"active": false}`` for any token that does not work."""
        response = self._http.post("/oauth/introspect", data={"token": token})
        return cast(Introspection, _result(response))


class AsyncVerifyClient:
    def __init__(
        self, url: str, credential: str, *, verify: bool | str = True, timeout: float = 5.0
    ) -> None:
        self._http = httpx.AsyncClient(
            base_url=url.rstrip("/"),
            headers={"Authorization": f"Bearer {credential}", "User-Agent": USER_AGENT},
            verify=trust(verify),
            timeout=timeout,
        )

    async def __aenter__(self) -> AsyncVerifyClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def verify(
        self,
        token: str,
        *,
        scope: str | None = None,
        ip: str | None = None,
        project: str | None = None,
        environment: str | None = None,
        dpop: tuple[str, str, str] | None = None,
    ) -> VerifyResult:
        body = _verify_body(token, scope, ip, project, environment, dpop)
        return cast(VerifyResult, _result(await self._http.post("/v1/verify", json=body)))

    async def introspect(self, token: str) -> Introspection:
        response = await self._http.post("/oauth/introspect", data={"token": token})
        return cast(Introspection, _result(response))
