"""tokenward's client side, on its own (it needs httpx only).

* :class:`TokenwardAuth` — ``httpx.Auth`` that keeps a short-lived access token fresh;
* :class:`AdminClient` / :class:`AsyncAdminClient` — the admin API, answers typed as in
  :mod:`tokenward_client.models`; errors are :class:`AdminAPIError`;
* :class:`VerifyClient` / :class:`AsyncVerifyClient` — ``/v1/verify`` and introspection;
* :func:`verify_webhook_signature` — a webhook receiver's check;
* :func:`exchange_token`, :func:`github_actions_identity` — the token endpoint in one call.
"""

from tokenward_client.admin import AdminAPIError, AdminClient, TokenSecretAsId
from tokenward_client.async_admin import AsyncAdminClient
from tokenward_client.auth import TokenwardAuth, TokenwardAuthError
from tokenward_client.oauth import exchange_token, github_actions_identity
from tokenward_client.verify import AsyncVerifyClient, VerifyClient
from tokenward_client.webhooks import verify_webhook_signature

__version__ = "0.1.0"

__all__ = [
    "AdminAPIError",
    "AdminClient",
    "AsyncAdminClient",
    "AsyncVerifyClient",
    "TokenSecretAsId",
    "TokenwardAuth",
    "TokenwardAuthError",
    "VerifyClient",
    "exchange_token",
    "github_actions_identity",
    "verify_webhook_signature",
]
