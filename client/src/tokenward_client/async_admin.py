"""The admin API client for asyncio: the same methods as :class:`~.admin.AdminClient`,
awaited (a test holds the two to the same names and parameters)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any, cast

import httpx

from tokenward_client.admin import (
    USER_AGENT,
    answer,
    change_body,
    given,
    refuse_secrets,
    token_body,
    token_filters,
    trust,
)
from tokenward_client.models import (
    Alert,
    AlertPage,
    AuditPage,
    IssuedToken,
    LeakReport,
    Project,
    ProjectPolicy,
    RotatedToken,
    Rotation,
    Token,
    TokenLookup,
    TrustPolicy,
    VerifyResult,
)


class AsyncAdminClient:
    """``async with AsyncAdminClient(url, admin_token) as admin: await admin.list_projects()``."""

    def __init__(
        self,
        url: str,
        token: str,
        *,
        verify: bool | str = True,
        timeout: float = 10.0,
        user_agent: str = USER_AGENT,
    ) -> None:
        self._http = httpx.AsyncClient(
            base_url=url.rstrip("/"),
            headers={"Authorization": f"Bearer {token}", "User-Agent": user_agent},
            verify=trust(verify),
            timeout=timeout,
        )

    async def __aenter__(self) -> AsyncAdminClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """Send one request; ids and names in ``path`` or ``params`` must not be secrets."""
        refuse_secrets(path, kwargs.get("params"))
        return answer(await self._http.request(method, path, **kwargs))

    # -- projects
    async def create_project(self, name: str) -> Project:
        return cast(Project, await self.request("POST", "/v1/projects", json={"name": name}))

    async def pages(self, path: str, key: str, **params: Any) -> AsyncIterator[Any]:
        """Every item of a list endpoint, page after page (its ``next_cursor``)."""
        query = given(params)
        while True:
            page = await self.request("GET", path, params=query)
            for item in page[key]:
                yield item
            if not page.get("next_cursor"):
                return
            query["cursor"] = page["next_cursor"]

    async def list_projects(self) -> list[Project]:
        return [p async for p in self.pages("/v1/projects", "projects", limit=1000)]

    async def update_project(self, name: str, ip_allowlist: list[str]) -> Project:
        body = {"ip_allowlist": ip_allowlist}
        return cast(Project, await self.request("PATCH", f"/v1/projects/{name}", json=body))

    # -- identities (owners of tokens)
    async def create_identity(
        self, project: str, external_id: str, **fields: Any
    ) -> dict[str, Any]:
        body = {"external_id": external_id, **given(fields)}
        path = f"/v1/projects/{project}/identities"
        return dict(await self.request("POST", path, json=body))

    async def list_identities(self, project: str, limit: int = 1000) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"limit": limit}
        items: list[dict[str, Any]] = []
        while True:
            page = await self.request("GET", f"/v1/projects/{project}/identities", params=params)
            items.extend(page["identities"])
            if not page.get("next"):
                return items
            params["after"] = page["next"]

    async def get_identity(self, project: str, external_id: str) -> dict[str, Any]:
        path = f"/v1/projects/{project}/identities/{external_id}"
        return dict(await self.request("GET", path))

    async def update_identity(
        self, project: str, external_id: str, **fields: Any
    ) -> dict[str, Any]:
        path = f"/v1/projects/{project}/identities/{external_id}"
        return dict(await self.request("PATCH", path, json=given(fields)))

    async def delete_identity(self, project: str, external_id: str) -> dict[str, Any]:
        path = f"/v1/projects/{project}/identities/{external_id}"
        return dict(await self.request("DELETE", path, params={"confirm": "true"}))

    # -- tokens
    async def create_token(
        self,
        project: str | None = None,
        scopes: Sequence[str] = (),
        *,
        environment: str | None = None,
        name: str | None = None,
        principal: str | None = None,
        ttl: str | None = None,
        expires_at: str | None = None,
        not_before: str | None = None,
        ip_allowlist: Sequence[str] | None = None,
        rate_limit: str | None = None,
        uses: int | None = None,
        metadata: dict[str, str] | None = None,
        strict: bool | None = None,
        **more: Any,
    ) -> IssuedToken:
        body = token_body(
            project, scopes, environment, name, principal, ttl, expires_at, not_before,
            ip_allowlist, rate_limit, uses, metadata, strict, more,
        )  # fmt: skip
        return cast(IssuedToken, await self.request("POST", "/v1/tokens", json=body))

    async def iter_tokens(
        self,
        project: str | None = None,
        state: str | None = None,
        limit: int = 1000,
        **filters: Any,
    ) -> AsyncIterator[Token]:
        """Tokens matching the filters of ``GET /v1/tokens``, a page at a time (see
        :meth:`tokenward_client.AdminClient.iter_tokens`)."""
        params = token_filters(project, state, limit, filters)
        async for token in self.pages("/v1/tokens", "tokens", **params):
            yield token

    async def list_tokens(
        self, project: str | None = None, state: str | None = None, **filters: Any
    ) -> list[Token]:
        return [t async for t in self.iter_tokens(project, state, **filters)]

    async def update_token(self, token_id: str, **changes: Any) -> Token:
        path = f"/v1/tokens/{token_id}"
        return cast(Token, await self.request("PATCH", path, json=change_body(changes)))

    async def disable_token(self, token_id: str, reason: str = "disabled by an admin") -> Token:
        path = f"/v1/tokens/{token_id}/disable"
        return cast(Token, await self.request("POST", path, json={"reason": reason}))

    async def enable_token(self, token_id: str, note: str = "") -> Token:
        path = f"/v1/tokens/{token_id}/enable"
        return cast(Token, await self.request("POST", path, json={"note": note}))

    async def get_token(self, token_id: str) -> Token:
        return cast(Token, await self.request("GET", f"/v1/tokens/{token_id}"))

    async def revoke_token(self, token_id: str, reason: str = "") -> Token:
        path = f"/v1/tokens/{token_id}/revoke"
        return cast(Token, await self.request("POST", path, json={"reason": reason}))

    async def rotate_token(self, token_id: str, grace: str = "1h") -> RotatedToken:
        path = f"/v1/tokens/{token_id}/rotate"
        return cast(RotatedToken, await self.request("POST", path, json={"grace": grace}))

    async def quarantine_token(self, token_id: str, reason: str) -> Token:
        path = f"/v1/tokens/{token_id}/quarantine"
        return cast(Token, await self.request("POST", path, json={"reason": reason}))

    async def release_token(self, token_id: str, note: str = "") -> Token:
        path = f"/v1/tokens/{token_id}/release"
        return cast(Token, await self.request("POST", path, json={"note": note}))

    # -- usage and webhooks
    async def usage(self, **params: Any) -> dict[str, Any]:
        """``GET /v1/usage``: counts per bucket (``from_`` is sent as ``from``)."""
        query = {k.rstrip("_"): v for k, v in given(params).items()}
        return dict(await self.request("GET", "/v1/usage", params=query))

    async def add_webhook(self, **fields: Any) -> dict[str, Any]:
        return dict(await self.request("POST", "/v1/webhooks", json=given(fields)))

    async def list_webhooks(self, project: str | None = None) -> list[dict[str, Any]]:
        params = given({"project": project})
        return list((await self.request("GET", "/v1/webhooks", params=params))["webhooks"])

    async def remove_webhook(self, webhook_id: str) -> None:
        await self.request("DELETE", f"/v1/webhooks/{webhook_id}")

    async def test_webhook(self, webhook_id: str) -> dict[str, Any]:
        return dict(await self.request("POST", f"/v1/webhooks/{webhook_id}/test"))

    async def webhook_deliveries(self, webhook_id: str, limit: int = 50) -> list[dict[str, Any]]:
        path = f"/v1/webhooks/{webhook_id}/deliveries"
        return list((await self.request("GET", path, params={"limit": limit}))["deliveries"])

    # -- leak response
    async def lookup_tokens(self, secrets: list[str]) -> list[TokenLookup]:
        """What the server knows of each secret (in a POST body, never a URL), in order."""
        found: list[TokenLookup] = []
        for start in range(0, len(secrets), 100):  # the endpoint takes 100 at a time
            body = {"tokens": secrets[start : start + 100]}
            found.extend((await self.request("POST", "/v1/tokens/lookup", json=body))["tokens"])
        return found

    async def report_leaked(self, token_id: str, location: str = "") -> LeakReport:
        """Report a token as leaked: revoked or quarantined per ``leak_action``."""
        path = f"/v1/tokens/{token_id}/leaked"
        return cast(LeakReport, await self.request("POST", path, json={"location": location}))

    # -- short-lived tokens: trust policies, project policy, automatic rotation
    async def add_trust_policy(self, project: str, **fields: Any) -> TrustPolicy:
        path = f"/v1/projects/{project}/trust-policies"
        return cast(TrustPolicy, await self.request("POST", path, json=given(fields)))

    async def list_trust_policies(self, project: str | None = None) -> list[TrustPolicy]:
        params = {"project": project} if project else {}
        page = await self.request("GET", "/v1/trust-policies", params=params)
        return cast(list[TrustPolicy], page["trust_policies"])

    async def remove_trust_policy(self, project: str, name: str) -> None:
        await self.request("DELETE", f"/v1/projects/{project}/trust-policies/{name}")

    async def get_policy(self, project: str) -> ProjectPolicy:
        return cast(ProjectPolicy, await self.request("GET", f"/v1/projects/{project}/policy"))

    async def set_policy(self, project: str, **fields: Any) -> ProjectPolicy:
        path = f"/v1/projects/{project}/policy"
        return cast(ProjectPolicy, await self.request("PUT", path, json=fields))

    async def set_rotation(self, token_id: str, **fields: Any) -> Rotation:
        path = f"/v1/tokens/{token_id}/rotation"
        return cast(Rotation, await self.request("PUT", path, json=given(fields)))

    async def verify(
        self, token: str, scope: str | None = None, ip: str | None = None, cost: int | None = None
    ) -> VerifyResult:
        body: dict[str, Any] = {"token": token, "scope": scope, "ip": ip}
        if cost is not None:
            body["cost"] = cost
        return cast(VerifyResult, await self.request("POST", "/v1/verify", json=body))

    # -- audit and alerts
    async def audit_page(self, **params: Any) -> AuditPage:
        return cast(AuditPage, await self.request("GET", "/v1/audit", params=given(params)))

    async def audit_export(self, **params: Any) -> AsyncIterator[str]:
        """Stream ``GET /v1/audit/export`` line by line (JSON lines)."""
        query = given(params)
        refuse_secrets("/v1/audit/export", query)
        async with self._http.stream("GET", "/v1/audit/export", params=query) as response:
            if response.status_code >= 400:
                await response.aread()
                answer(response)
            async for line in response.aiter_lines():
                yield line

    async def alerts_page(self, **params: Any) -> AlertPage:
        return cast(AlertPage, await self.request("GET", "/v1/alerts", params=given(params)))

    async def get_alert(self, alert_id: str) -> Alert:
        return cast(Alert, await self.request("GET", f"/v1/alerts/{alert_id}"))

    async def ack_alert(self, alert_id: str, note: str = "") -> Alert:
        path = f"/v1/alerts/{alert_id}/ack"
        return cast(Alert, await self.request("POST", path, json={"note": note}))
