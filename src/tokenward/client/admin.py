"""A thin client for the admin API (the CLI uses it; scripts may too)."""

from __future__ import annotations

import ssl
from typing import Any

import httpx

from tokenward.tokens.format import TokenFormatError, holds_token, parse_token


class TokenSecretAsId(ValueError):
    """A token secret was given where an id or a name goes into the URL; nothing was sent.

    A URL's path and query reach access logs and audit logs: a secret there is a second
    leak. The message never contains the secret.
    """

    code = "token_secret_as_id"

    def __init__(self) -> None:
        super().__init__(
            "that is a token secret, not a token id; nothing was sent. Give the token's id "
            "(tok_…): 'tokenward token list' shows it next to the secret's hint (its first "
            "and last characters). If the secret leaked, revoke that id."
        )


def looks_like_secret(value: str) -> bool:
    """Whether ``value`` is, holds or nearly is a token secret (a typo is still a secret)."""
    try:
        parse_token(value)
    except TokenFormatError as exc:
        if exc.reason == "bad_checksum":
            return True
    else:
        return True
    if holds_token(value):
        return True
    # A cut secret is still part of a secret; project names (lowercase only) may look alike.
    prefix = value[:8] in ("tw_live_", "tw_test_")
    return prefix and any(c.isupper() for c in value[8:])


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
        # A CA file becomes an SSL context: httpx deprecates a path given as ``verify``.
        trust: bool | ssl.SSLContext = (
            ssl.create_default_context(cafile=verify) if isinstance(verify, str) else verify
        )
        self._http = httpx.Client(
            base_url=url.rstrip("/"),
            headers={"Authorization": f"Bearer {token}", "User-Agent": "tokenward-cli"},
            verify=trust,
            timeout=timeout,
        )

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self._http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """Send one request; ids and names in ``path`` or ``params`` must not be secrets."""
        self.refuse_secrets(path, kwargs.get("params"))
        response = self._http.request(method, path, **kwargs)
        if response.status_code >= 400:
            try:
                body = response.json()
                code, message = str(body.get("error")), str(body.get("message"))
            except ValueError:
                code, message = "http_error", f"HTTP {response.status_code}"
            raise AdminAPIError(response.status_code, code, message)
        if response.status_code == 204:
            return None
        return response.json()

    @staticmethod
    def refuse_secrets(path: str, params: Any = None) -> None:
        """Raise :class:`TokenSecretAsId`, before anything is sent, for a secret in the URL."""
        parts = path.split("/")
        if isinstance(params, dict):
            parts.extend(str(value) for value in params.values())
        if any(looks_like_secret(part) for part in parts):
            raise TokenSecretAsId

    # -- projects
    def create_project(self, name: str) -> dict[str, Any]:
        return dict(self.request("POST", "/v1/projects", json={"name": name}))

    def list_projects(self) -> list[dict[str, Any]]:
        return list(self.request("GET", "/v1/projects")["projects"])

    def update_project(self, name: str, ip_allowlist: list[str]) -> dict[str, Any]:
        body = {"ip_allowlist": ip_allowlist}
        return dict(self.request("PATCH", f"/v1/projects/{name}", json=body))

    # -- tokens
    def create_token(self, **fields: Any) -> dict[str, Any]:
        body = {k: v for k, v in fields.items() if v is not None}
        return dict(self.request("POST", "/v1/tokens", json=body))

    def list_tokens(
        self,
        project: str | None = None,
        state: str | None = None,
        limit: int = 1000,
        identity: str | None = None,
    ) -> list[dict[str, Any]]:
        """Every token (page by page); ``identity``: only that identity's (with ``project``)."""
        params: dict[str, Any] = {"limit": limit}
        if project:
            params["project"] = project
        if state:
            params["state"] = state
        if identity:
            params["identity"] = identity
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

    # -- identities (owners of tokens)
    def create_identity(self, project: str, external_id: str, **fields: Any) -> dict[str, Any]:
        body = {"external_id": external_id, **{k: v for k, v in fields.items() if v is not None}}
        return dict(self.request("POST", f"/v1/projects/{project}/identities", json=body))

    def list_identities(self, project: str, limit: int = 1000) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"limit": limit}
        items: list[dict[str, Any]] = []
        while True:
            page = self.request("GET", f"/v1/projects/{project}/identities", params=params)
            items.extend(page["identities"])
            if not page.get("next"):
                return items
            params["after"] = page["next"]

    def get_identity(self, project: str, external_id: str) -> dict[str, Any]:
        return dict(self.request("GET", f"/v1/projects/{project}/identities/{external_id}"))

    def update_identity(self, project: str, external_id: str, **fields: Any) -> dict[str, Any]:
        """Change ``metadata`` and/or ``rate_limit`` (``""``: none)."""
        body = {k: v for k, v in fields.items() if v is not None}
        path = f"/v1/projects/{project}/identities/{external_id}"
        return dict(self.request("PATCH", path, json=body))

    def delete_identity(self, project: str, external_id: str) -> dict[str, Any]:
        """Delete an identity and revoke all its tokens (the caller has confirmed it)."""
        path = f"/v1/projects/{project}/identities/{external_id}"
        return dict(self.request("DELETE", path, params={"confirm": "true"}))

    # -- short-lived tokens: trust policies, project policy, automatic rotation
    def add_trust_policy(self, project: str, **fields: Any) -> dict[str, Any]:
        body = {k: v for k, v in fields.items() if v is not None}
        return dict(self.request("POST", f"/v1/projects/{project}/trust-policies", json=body))

    def list_trust_policies(self, project: str | None = None) -> list[dict[str, Any]]:
        params = {"project": project} if project else {}
        return list(self.request("GET", "/v1/trust-policies", params=params)["trust_policies"])

    def remove_trust_policy(self, project: str, name: str) -> None:
        self.request("DELETE", f"/v1/projects/{project}/trust-policies/{name}")

    def get_policy(self, project: str) -> dict[str, Any]:
        return dict(self.request("GET", f"/v1/projects/{project}/policy"))

    def set_policy(self, project: str, **fields: Any) -> dict[str, Any]:
        return dict(self.request("PUT", f"/v1/projects/{project}/policy", json=fields))

    def set_rotation(self, token_id: str, **fields: Any) -> dict[str, Any]:
        body = {k: v for k, v in fields.items() if v is not None}
        return dict(self.request("PUT", f"/v1/tokens/{token_id}/rotation", json=body))

    def verify(
        self,
        token: str,
        scope: str | None = None,
        ip: str | None = None,
        cost: int | None = None,
    ) -> dict[str, Any]:
        """``POST /v1/verify``; ``cost``: the credits the request spends (default 1)."""
        body: dict[str, Any] = {"token": token, "scope": scope, "ip": ip}
        if cost is not None:
            body["cost"] = cost
        return dict(self.request("POST", "/v1/verify", json=body))

    # -- audit and alerts
    def audit_page(self, **params: Any) -> dict[str, Any]:
        """One page of ``GET /v1/audit`` (``events``, ``next_cursor``)."""
        query = {k: v for k, v in params.items() if v is not None}
        return dict(self.request("GET", "/v1/audit", params=query))

    def audit_export(self, **params: Any) -> Any:
        """Stream ``GET /v1/audit/export`` line by line (JSON lines)."""
        query = {k: v for k, v in params.items() if v is not None}
        self.refuse_secrets("/v1/audit/export", query)
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
