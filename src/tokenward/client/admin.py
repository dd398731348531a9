"""A thin client for the admin API (the CLI uses it; scripts may too)."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
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
            for value in params.values():
                values = value if isinstance(value, list | tuple) else [value]
                parts.extend(str(v) for v in values)
        if any(looks_like_secret(part) for part in parts):
            raise TokenSecretAsId

    # -- projects
    def create_project(self, name: str) -> dict[str, Any]:
        return dict(self.request("POST", "/v1/projects", json={"name": name}))

    def pages(self, path: str, key: str, **params: Any) -> Iterator[dict[str, Any]]:
        """Every item of a list endpoint, page after page (its ``next_cursor``): the one
        pagination of the API (tokens, projects, audit, alerts). ``None`` values are left
        out; a list value is sent as a repeated parameter."""
        query = {k: v for k, v in params.items() if v is not None}
        while True:
            page = self.request("GET", path, params=query)
            yield from page[key]
            if not page.get("next_cursor"):
                return
            query["cursor"] = page["next_cursor"]

    def list_projects(self) -> list[dict[str, Any]]:
        return list(self.pages("/v1/projects", "projects", limit=1000))

    def update_project(self, name: str, ip_allowlist: list[str]) -> dict[str, Any]:
        body = {"ip_allowlist": ip_allowlist}
        return dict(self.request("PATCH", f"/v1/projects/{name}", json=body))

    # -- tokens
    def create_token(self, **fields: Any) -> dict[str, Any]:
        body = {k: v for k, v in fields.items() if v is not None}
        return dict(self.request("POST", "/v1/tokens", json=body))

    def iter_tokens(
        self,
        project: str | None = None,
        *,
        state: str | None = None,
        limit: int = 1000,
        metadata: dict[str, str] | None = None,
        **filters: Any,
    ) -> Iterator[dict[str, Any]]:
        """Tokens matching the filters of ``GET /v1/tokens`` (``name_prefix``,
        ``principal``, ``kind``, ``environment``, ``expires_before``, ``last_used_before``,
        ``disabled``, ``quarantined``; ``metadata`` as a dict), newest first, fetched a page
        at a time as the iteration goes."""
        meta = [f"{k}={v}" for k, v in (metadata or {}).items()] or None
        for name in ("expires_before", "last_used_before"):
            if hasattr(filters.get(name), "isoformat"):
                filters[name] = filters[name].isoformat()
        yield from self.pages(
            "/v1/tokens",
            "tokens",
            project=project,
            state=state,
            limit=limit,
            metadata=meta,
            **filters,
        )

    def list_tokens(
        self, project: str | None = None, state: str | None = None, **filters: Any
    ) -> list[dict[str, Any]]:
        """Every token matching the filters (see :meth:`iter_tokens`), as one list."""
        return list(self.iter_tokens(project, state=state, **filters))

    def update_token(self, token_id: str, **changes: Any) -> dict[str, Any]:
        """``PATCH /v1/tokens/{id}``: ``name``, ``metadata``, ``ip_allowlist``,
        ``rate_limit`` (``""``: none), and narrower ``scopes``, ``expires_at``, ``uses``."""
        body = {k: v for k, v in changes.items() if v is not None}
        if hasattr(body.get("expires_at"), "isoformat"):
            body["expires_at"] = body["expires_at"].isoformat()
        return dict(self.request("PATCH", f"/v1/tokens/{token_id}", json=body))

    def disable_token(self, token_id: str, reason: str = "disabled by an admin") -> dict[str, Any]:
        path = f"/v1/tokens/{token_id}/disable"
        return dict(self.request("POST", path, json={"reason": reason}))

    def enable_token(self, token_id: str, note: str = "") -> dict[str, Any]:
        return dict(self.request("POST", f"/v1/tokens/{token_id}/enable", json={"note": note}))

    def get_token(self, token_id: str) -> dict[str, Any]:
        return dict(self.request("GET", f"/v1/tokens/{token_id}"))

    def revoke_token(self, token_id: str, reason: str = "") -> dict[str, Any]:
        return dict(self.request("POST", f"/v1/tokens/{token_id}/revoke", json={"reason": reason}))

    def rotate_token(self, token_id: str, grace: str = "1h") -> dict[str, Any]:
        return dict(self.request("POST", f"/v1/tokens/{token_id}/rotate", json={"grace": grace}))

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
