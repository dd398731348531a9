"""One-shot calls to the token endpoint (the CLI's ``token exchange``), and a CI job's identity."""

from __future__ import annotations

import os
from typing import cast

import httpx

from tokenward_client.admin import USER_AGENT, AdminAPIError, trust
from tokenward_client.auth import GRANT_EXCHANGE, TOKEN_PATH, TYPE_ACCESS, TYPE_ID_TOKEN
from tokenward_client.models import TokenResponse


def exchange_token(
    url: str,
    subject: str,
    *,
    identity: bool = False,
    scope: list[str] | None = None,
    expires_in: int | None = None,
    audience: str | None = None,
    verify: bool | str = True,
    timeout: float = 10.0,
    user_agent: str = USER_AGENT,
) -> TokenResponse:
    """Exchange an API key (or, with ``identity``, a CI identity token) for an access token."""
    form = {
        "grant_type": GRANT_EXCHANGE,
        "subject_token_type": TYPE_ID_TOKEN if identity else TYPE_ACCESS,
        "subject_token": subject,
    }
    if scope:
        form["scope"] = " ".join(scope)
    if expires_in:
        form["expires_in"] = str(expires_in)
    if audience:
        form["audience"] = audience
    response = httpx.post(
        url.rstrip("/") + TOKEN_PATH,
        data=form,
        verify=trust(verify),
        timeout=timeout,
        headers={"User-Agent": user_agent},
    )
    try:
        body = response.json()
    except ValueError:
        body = {}
    if response.status_code != 200:
        raise AdminAPIError(
            response.status_code,
            str(body.get("error", "http_error")),
            str(body.get("message", f"HTTP {response.status_code}")),
        )
    return cast(TokenResponse, body)


def github_actions_identity(audience: str, environ: dict[str, str] | None = None) -> str:
    """The OIDC ID token of the running GitHub Actions job (needs ``id-token: write``)."""
    env = environ if environ is not None else dict(os.environ)
    url = env.get("ACTIONS_ID_TOKEN_REQUEST_URL")
    bearer = env.get("ACTIONS_ID_TOKEN_REQUEST_TOKEN")
    if not url or not bearer:
        raise RuntimeError(
            "no GitHub Actions OIDC environment: give the job the 'id-token: write' permission"
        )
    response = httpx.get(
        url, params={"audience": audience}, headers={"Authorization": f"Bearer {bearer}"}
    )
    response.raise_for_status()
    return str(response.json()["value"])
