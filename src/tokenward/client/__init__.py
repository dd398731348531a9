"""Compatibility: the SDK is the ``tokenward-client`` distribution, :mod:`tokenward_client`.

New code imports ``tokenward_client``. Imports of ``tokenward.client``,
``tokenward.client.admin``, ``.auth`` and ``.oauth`` keep working: they are the same modules.
"""

import sys

import tokenward_client
from tokenward_client import (
    AdminAPIError,
    AdminClient,
    AsyncAdminClient,
    AsyncVerifyClient,
    TokenSecretAsId,
    TokenwardAuth,
    TokenwardAuthError,
    VerifyClient,
    admin,
    auth,
    exchange_token,
    github_actions_identity,
    oauth,
    verify_webhook_signature,
)

for _name in ("admin", "auth", "oauth"):
    sys.modules[f"{__name__}.{_name}"] = getattr(tokenward_client, _name)

__all__ = [
    "AdminAPIError",
    "AdminClient",
    "AsyncAdminClient",
    "AsyncVerifyClient",
    "TokenSecretAsId",
    "TokenwardAuth",
    "TokenwardAuthError",
    "VerifyClient",
    "admin",
    "auth",
    "exchange_token",
    "github_actions_identity",
    "oauth",
    "verify_webhook_signature",
]
