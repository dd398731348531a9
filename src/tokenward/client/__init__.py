"""Clients for tokenward: the app SDK (:class:`TokenwardAuth`) and the admin API client."""

from tokenward.client.admin import AdminAPIError, AdminClient
from tokenward.client.auth import TokenwardAuth, TokenwardAuthError
from tokenward.client.oauth import exchange_token, github_actions_identity
from tokenward.webhooks.signing import verify_signature as verify_webhook_signature

__all__ = [
    "AdminAPIError",
    "AdminClient",
    "TokenwardAuth",
    "TokenwardAuthError",
    "exchange_token",
    "github_actions_identity",
    "verify_webhook_signature",
]
