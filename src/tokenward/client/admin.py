"""A thin client for the admin API (the CLI uses it; scripts may too)."""

from __future__ import annotations

from typing import Any

import httpx


class AdminAPIError(Exception):
    """The server answered with an error: ``status``, stable ``code``, human ``message``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class AdminClient:
    def __init__(
        self, url: str, token: str, *, verify: bool | str = True, timeout: float = 10.0
    ) -> None:
        self._http = httpx.Client(
            base_url=url.rstrip("/"),
            headers={"Authorization": f"Bearer {token}", "User-Agent": "tokenward-cli"},
            verify=verify,
            timeout=timeout,
        )

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self._http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._http.request(method, path, **kwargs)
        if response.status_code >= 400:
            try:
                body = response.json()
                code, message = str(body.get("error")), str(body.get("message"))
            except ValueError:
                code, message = "http_error", f"HTTP {response.status_code}"
            raise AdminAPIError(response.status_code, code, message)
        return response.json()

    # -- projects
    def create_project(self, name: str) -> dict[str, Any]:
        return dict(self.request("POST", "/v1/projects", json={"name": name}))

    def list_projects(self) -> list[dict[str, Any]]:
        return list(self.request("GET", "/v1/projects")["projects"])

    # -- tokens
    def create_token(self, **fields: Any) -> dict[str, Any]:
        body = {k: v for k, v in fields.items() if v is not None}
        return dict(self.request("POST", "/v1/tokens", json=body))

    def list_tokens(
        self, project: str | None = None, state: str | None = None, limit: int = 1000
    ) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"limit": limit}
        if project:
            params["project"] = project
        if state:
            params["state"] = state
        items: list[dict[str, Any]] = []
        while True:
            page = self.request("GET", "/v1/tokens", params=params)
            items.extend(page["tokens"])
            if not page.get("next"):
                return items
            params["after"] = page["next"]

    def get_token(self, token_id: str) -> dict[str, Any]:
        return dict(self.request("GET", f"/v1/tokens/{token_id}"))

    def revoke_token(self, token_id: str, reason: str = "") -> dict[str, Any]:
        return dict(self.request("POST", f"/v1/tokens/{token_id}/revoke", json={"reason": reason}))

    def rotate_token(self, token_id: str, grace: str = "1h") -> dict[str, Any]:
        return dict(self.request("POST", f"/v1/tokens/{token_id}/rotate", json={"grace": grace}))

    def verify(self, token: str, scope: str | None = None, ip: str | None = None) -> dict[str, Any]:
        body = {"token": token, "scope": scope, "ip": ip}
        return dict(self.request("POST", "/v1/verify", json=body))

    # -- audit and alerts
    def audit_page(self, **params: Any) -> dict[str, Any]:
        """One page of ``GET /v1/audit`` (``events``, ``next_cursor``)."""
        query = {k: v for k, v in params.items() if v is not None}
        return dict(self.request("GET", "/v1/audit", params=query))

    def audit_export(self, **params: Any) -> Any:
        """Stream ``GET /v1/audit/export`` line by line (JSON lines)."""
        query = {k: v for k, v in params.items() if v is not None}
        with self._http.stream("GET", "/v1/audit/export", params=query) as response:
            if response.status_code >= 400:
                response.read()
                body = response.json()
                raise AdminAPIError(response.status_code, body["error"], body["message"])
            yield from response.iter_lines()

    def alerts_page(self, **params: Any) -> dict[str, Any]:
        query = {k: v for k, v in params.items() if v is not None}
        return dict(self.request("GET", "/v1/alerts", params=query))

    def get_alert(self, alert_id: str) -> dict[str, Any]:
        return dict(self.request("GET", f"/v1/alerts/{alert_id}"))

    def ack_alert(self, alert_id: str, note: str = "") -> dict[str, Any]:
        return dict(self.request("POST", f"/v1/alerts/{alert_id}/ack", json={"note": note}))

    def quarantine_token(self, token_id: str, reason: str) -> dict[str, Any]:
        path = f"/v1/tokens/{token_id}/quarantine"
        return dict(self.request("POST", path, json={"reason": reason}))

    def release_token(self, token_id: str, note: str = "") -> dict[str, Any]:
        return dict(self.request("POST", f"/v1/tokens/{token_id}/release", json={"note": note}))
