"""Clients for tokenward: the admin API client (and, later, the app SDK)."""

from tokenward.client.admin import AdminAPIError, AdminClient

__all__ = ["AdminAPIError", "AdminClient"]
