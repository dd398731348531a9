"""The admin API client, synchronous (:class:`AsyncAdminClient` is its asyncio twin).

Every answer is a typed dict of :mod:`tokenward_client.models`; every error the server sends
is an :class:`AdminAPIError` with its stable ``code``. An id or a name that would go into a
URL and is a token secret is refused before anything is sent (:class:`TokenSecretAsId`).
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator, Sequence
from typing import Any, cast

import httpx

from tokenward_client._secrets import looks_like_secret
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

USER_AGENT = "tokenward-client"


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


class AdminAPIError(Exception):
    """The server answered with an error: ``status``, stable ``code``, human ``message``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message


def trust(verify: bool | str) -> bool | ssl.SSLContext:
    """``verify`` for httpx: a CA file becomes an SSL context (httpx deprecates a path)."""
    return ssl.create_default_context(cafile=verify) if isinstance(verify, str) else verify


def answer(response: httpx.Response) -> Any:
    """The decoded body of a success, or the server's error as an :class:`AdminAPIError`."""
    if response.status_code >= 400:
        try:
            body = response.json()
            code, message = str(body.get("error")), str(body.get("message"))
        except (ValueError, AttributeError):
            code, message = "http_error", f"HTTP {response.status_code}"
        raise AdminAPIError(response.status_code, code, message)
    if response.status_code == 204:
        return None
    return response.json()


def refuse_secrets(path: str, params: Any = None) -> None:
    """Raise :class:`TokenSecretAsId`, before anything is sent, for a secret in the URL."""
    parts = path.split("/")
    if isinstance(params, dict):
        for value in params.values():
            values = value if isinstance(value, list | tuple) else [value]
            parts.extend(str(v) for v in values)
    if any(looks_like_secret(part) for part in parts):
        raise TokenSecretAsId


def given(fields: dict[str, Any]) -> dict[str, Any]:
    """The fields that were given (``None`` means "not given", so the server's default)."""
    return {k: v for k, v in fields.items() if v is not None}


def token_body(
    project: str | None,
    scopes: Sequence[str],
    environment: str | None,
    name: str | None,
    principal: str | None,
    ttl: str | None,
    expires_at: str | None,
    not_before: str | None,
    ip_allowlist: Sequence[str] | None,
    rate_limit: str | None,
    uses: int | None,
    metadata: dict[str, str] | None,
    strict: bool | None,
    more: dict[str, Any],
) -> dict[str, Any]:
    """The body of ``POST /v1/tokens`` (shared by the sync and the async client)."""
    fields = {
        "project": project,
        "scopes": list(scopes),
        "environment": environment,
        "name": name,
        "principal": principal,
        "ttl": ttl,
        "expires_at": expires_at,
        "not_before": not_before,
        "ip_allowlist": None if ip_allowlist is None else list(ip_allowlist),
        "rate_limit": rate_limit,
        "uses": uses,
        "metadata": metadata,
        "strict": strict,
    }
    return given({**fields, **more})


def token_filters(
    project: str | None, state: str | None, limit: int, filters: dict[str, Any]
) -> dict[str, Any]:
    """The query of ``GET /v1/tokens``: ``metadata`` as a dict becomes ``key=value`` pairs,
    datetimes ISO text (shared by the sync and the async client)."""
    meta = filters.pop("metadata", None) or {}
    for name in ("expires_before", "last_used_before"):
        if hasattr(filters.get(name), "isoformat"):
            filters[name] = filters[name].isoformat()
    pairs = [f"{k}={v}" for k, v in meta.items()] or None
    return given({"project": project, "state": state, "limit": limit, "metadata": pairs, **filters})


def change_body(changes: dict[str, Any]) -> dict[str, Any]:
    """The body of ``PATCH /v1/tokens/{id}`` (a datetime ``expires_at`` as ISO text)."""
    body = given(changes)
    if hasattr(body.get("expires_at"), "isoformat"):
        body["expires_at"] = body["expires_at"].isoformat()
    return body


class AdminClient:
    """``AdminClient(url, admin_token)``; use it as a context manager (it holds connections)."""

    def __init__(
        self,
        url: str,
        token: str,
        *,
        verify: bool | str = True,
        timeout: float = 10.0,
        user_agent: str = USER_AGENT,
    ) -> None:
        self._http = httpx.Client(
            base_url=url.rstrip("/"),
            headers={"Authorization": f"Bearer {token}", "User-Agent": user_agent},
            verify=trust(verify),
            timeout=timeout,
        )

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """Send one request; ids and names in ``path`` or ``params`` must not be secrets."""
        refuse_secrets(path, kwargs.get("params"))
        return answer(self._http.request(method, path, **kwargs))

    refuse_secrets = staticmethod(refuse_secrets)

    # -- projects
    def create_project(self, name: str) -> Project:
        return cast(Project, self.request("POST", "/v1/projects", json={"name": name}))

    def pages(self, path: str, key: str, **params: Any) -> Iterator[Any]:
        """Every item of a list endpoint, page after page (its ``next_cursor``): the one
        pagination of the API (tokens, projects, audit, alerts). ``None`` values are left
        out; a list value is sent as a repeated parameter."""
        query = given(params)
        while True:
            page = self.request("GET", path, params=query)
            yield from page[key]
            if not page.get("next_cursor"):
                return
            query["cursor"] = page["next_cursor"]

    def list_projects(self) -> list[Project]:
        return cast(list[Project], list(self.pages("/v1/projects", "projects", limit=1000)))

    def update_project(self, name: str, ip_allowlist: list[str]) -> Project:
        body = {"ip_allowlist": ip_allowlist}
        return cast(Project, self.request("PATCH", f"/v1/projects/{name}", json=body))

    # -- tokens
    def create_token(
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
        """A new token (``ttl="90d"``, ``rate_limit="100/minute"``, …); its secret is in
        ``token``, shown this once, and ``warnings`` says what may be a mistake (a scope
        nothing uses, no expiry); ``strict=True`` refuses an unknown scope instead.
        ``more`` passes fields of newer servers through."""
        body = token_body(
            project, scopes, environment, name, principal, ttl, expires_at, not_before,
            ip_allowlist, rate_limit, uses, metadata, strict, more,
        )  # fmt: skip
        return cast(IssuedToken, self.request("POST", "/v1/tokens", json=body))

    def iter_tokens(
        self,
        project: str | None = None,
        state: str | None = None,
        limit: int = 1000,
        **filters: Any,
    ) -> Iterator[Token]:
        """Tokens matching the filters of ``GET /v1/tokens`` (``name_prefix``,
        ``principal``, ``metadata`` as a dict, ``kind``, ``environment``, ``expires_before``,
        ``last_used_before``, ``disabled``, ``quarantined``), newest first, a page at a time
        as the iteration goes; never their secrets."""
        params = token_filters(project, state, limit, filters)
        yield from self.pages("/v1/tokens", "tokens", **params)

    def list_tokens(
        self, project: str | None = None, state: str | None = None, **filters: Any
    ) -> list[Token]:
        """Every token matching the filters (all pages, see :meth:`iter_tokens`)."""
        return list(self.iter_tokens(project, state, **filters))

    def update_token(self, token_id: str, **changes: Any) -> Token:
        """``PATCH /v1/tokens/{id}``: ``name``, ``metadata``, ``ip_allowlist``,
        ``rate_limit`` (``""``: none), and narrower ``scopes``, ``expires_at``, ``uses``."""
        path = f"/v1/tokens/{token_id}"
        return cast(Token, self.request("PATCH", path, json=change_body(changes)))

    def disable_token(self, token_id: str, reason: str = "disabled by an admin") -> Token:
        path = f"/v1/tokens/{token_id}/disable"
        return cast(Token, self.request("POST", path, json={"reason": reason}))

    def enable_token(self, token_id: str, note: str = "") -> Token:
        path = f"/v1/tokens/{token_id}/enable"
        return cast(Token, self.request("POST", path, json={"note": note}))

    def get_token(self, token_id: str) -> Token:
        return cast(Token, self.request("GET", f"/v1/tokens/{token_id}"))

    def revoke_token(self, token_id: str, reason: str = "") -> Token:
        body = {"reason": reason}
        return cast(Token, self.request("POST", f"/v1/tokens/{token_id}/revoke", json=body))

    def rotate_token(self, token_id: str, grace: str = "1h") -> RotatedToken:
        path = f"/v1/tokens/{token_id}/rotate"
        return cast(RotatedToken, self.request("POST", path, json={"grace": grace}))

    # -- short-lived tokens: trust policies, project policy, automatic rotation
    def add_trust_policy(self, project: str, **fields: Any) -> TrustPolicy:
        path = f"/v1/projects/{project}/trust-policies"
        return cast(TrustPolicy, self.request("POST", path, json=given(fields)))

    def list_trust_policies(self, project: str | None = None) -> list[TrustPolicy]:
        params = {"project": project} if project else {}
        page = self.request("GET", "/v1/trust-policies", params=params)
        return cast(list[TrustPolicy], page["trust_policies"])

    def remove_trust_policy(self, project: str, name: str) -> None:
        self.request("DELETE", f"/v1/projects/{project}/trust-policies/{name}")

    def get_policy(self, project: str) -> ProjectPolicy:
        return cast(ProjectPolicy, self.request("GET", f"/v1/projects/{project}/policy"))

    def set_policy(self, project: str, **fields: Any) -> ProjectPolicy:
        path = f"/v1/projects/{project}/policy"
        return cast(ProjectPolicy, self.request("PUT", path, json=fields))

    def set_rotation(self, token_id: str, **fields: Any) -> Rotation:
        path = f"/v1/tokens/{token_id}/rotation"
        return cast(Rotation, self.request("PUT", path, json=given(fields)))

    def verify(
        self, token: str, scope: str | None = None, ip: str | None = None, cost: int | None = None
    ) -> VerifyResult:
        """``POST /v1/verify``; ``cost``: the credits the request spends (default 1)."""
        body: dict[str, Any] = {"token": token, "scope": scope, "ip": ip}
        if cost is not None:
            body["cost"] = cost
        return cast(VerifyResult, self.request("POST", "/v1/verify", json=body))

    # -- identities (owners of tokens)
    def create_identity(self, project: str, external_id: str, **fields: Any) -> dict[str, Any]:
        """A new identity (``metadata={…}``, ``rate_limit="1000/hour"``)."""
        body = {"external_id": external_id, **given(fields)}
        return dict(self.request("POST", f"/v1/projects/{project}/identities", json=body))

    def list_identities(self, project: str, limit: int = 1000) -> list[dict[str, Any]]:
        """Every identity of a project (all pages)."""
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
        path = f"/v1/projects/{project}/identities/{external_id}"
        return dict(self.request("PATCH", path, json=given(fields)))

    def delete_identity(self, project: str, external_id: str) -> dict[str, Any]:
        """Delete an identity and revoke all its tokens (the caller has confirmed it)."""
        path = f"/v1/projects/{project}/identities/{external_id}"
        return dict(self.request("DELETE", path, params={"confirm": "true"}))

    # -- audit and alerts
    def audit_page(self, **params: Any) -> AuditPage:
        """One page of ``GET /v1/audit`` (``events``, ``next_cursor``)."""
        return cast(AuditPage, self.request("GET", "/v1/audit", params=given(params)))

    def audit_export(self, **params: Any) -> Iterator[str]:
        """Stream ``GET /v1/audit/export`` line by line (JSON lines)."""
        query = given(params)
        refuse_secrets("/v1/audit/export", query)
        with self._http.stream("GET", "/v1/audit/export", params=query) as response:
            if response.status_code >= 400:
                response.read()
                answer(response)
            yield from response.iter_lines()

    def alerts_page(self, **params: Any) -> AlertPage:
        return cast(AlertPage, self.request("GET", "/v1/alerts", params=given(params)))

    def get_alert(self, alert_id: str) -> Alert:
        return cast(Alert, self.request("GET", f"/v1/alerts/{alert_id}"))

    def ack_alert(self, alert_id: str, note: str = "") -> Alert:
        path = f"/v1/alerts/{alert_id}/ack"
        return cast(Alert, self.request("POST", path, json={"note": note}))

    def quarantine_token(self, token_id: str, reason: str) -> Token:
        path = f"/v1/tokens/{token_id}/quarantine"
        return cast(Token, self.request("POST", path, json={"reason": reason}))

    def release_token(self, token_id: str, note: str = "") -> Token:
        path = f"/v1/tokens/{token_id}/release"
        return cast(Token, self.request("POST", path, json={"note": note}))

    # -- usage and webhooks
    def usage(self, **params: Any) -> dict[str, Any]:
        """``GET /v1/usage``: counts per bucket (``from_`` is sent as ``from``)."""
        query = {k.rstrip("_"): v for k, v in given(params).items()}
        return dict(self.request("GET", "/v1/usage", params=query))

    def add_webhook(self, **fields: Any) -> dict[str, Any]:
        return dict(self.request("POST", "/v1/webhooks", json=given(fields)))

    def list_webhooks(self, project: str | None = None) -> list[dict[str, Any]]:
        params = given({"project": project})
        return list(self.request("GET", "/v1/webhooks", params=params)["webhooks"])

    def remove_webhook(self, webhook_id: str) -> None:
        self.request("DELETE", f"/v1/webhooks/{webhook_id}")

    def test_webhook(self, webhook_id: str) -> dict[str, Any]:
        return dict(self.request("POST", f"/v1/webhooks/{webhook_id}/test"))

    def webhook_deliveries(self, webhook_id: str, limit: int = 50) -> list[dict[str, Any]]:
        path = f"/v1/webhooks/{webhook_id}/deliveries"
        return list(self.request("GET", path, params={"limit": limit})["deliveries"])

    # -- leak response
    def lookup_tokens(self, secrets: list[str]) -> list[TokenLookup]:
        """What the server knows of each secret (in a POST body, never a URL), in order."""
        found: list[TokenLookup] = []
        for start in range(0, len(secrets), 100):  # the endpoint takes 100 at a time
            body = {"tokens": secrets[start : start + 100]}
            found.extend(self.request("POST", "/v1/tokens/lookup", json=body)["tokens"])
        return found

    def report_leaked(self, token_id: str, location: str = "") -> LeakReport:
        """Report a token as leaked: the server revokes or quarantines it per its project's
        ``leak_action``, raises an alert and emits ``token.leaked``."""
        path = f"/v1/tokens/{token_id}/leaked"
        return cast(LeakReport, self.request("POST", path, json={"location": location}))
