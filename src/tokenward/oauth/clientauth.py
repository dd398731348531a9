"""OAuth client authentication (RFC 6749 §2.3) at the introspection and revocation endpoints.

tokenward has no client registry: a client's secret is a tokenward credential, and its
``client_id`` is that credential's public id (``tok_…``). A client may send them as

* ``Authorization: Basic base64(client_id:client_secret)`` (``client_secret_basic``), each
  part form-urlencoded first as §2.3.1 says;
* ``client_id`` and ``client_secret`` in the form body (``client_secret_post``);
* ``Authorization: Bearer <credential>`` (RFC 7662 §2.1 allows a bearer token instead);
* nothing but, at most, a ``client_id`` (a public client): enough to revoke the token it
  presents, since holding a token is the right to give it up.

Only one method per request (§2.3): a second one is an ``invalid_request``.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote_plus

from tokenward.errors import BadRequest, Unauthorized


@dataclass(frozen=True, slots=True)
class ClientCredentials:
    """What a request offered to authenticate its client with."""

    method: str  # "client_secret_basic", "client_secret_post", "bearer" or "none"
    secret: str | None = None
    client_id: str | None = None


def invalid_client(message: str) -> Unauthorized:
    """RFC 6749 §5.2: the client's credentials are missing, malformed or not valid."""
    return Unauthorized("invalid_client", message, error_description=message)


def _basic(value: str) -> ClientCredentials:
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise invalid_client("the Basic credentials are not valid base64") from None
    client_id, sep, secret = decoded.partition(":")
    if not sep or not secret:
        raise invalid_client("the Basic credentials have no client secret")
    return ClientCredentials(
        "client_secret_basic", unquote_plus(secret), unquote_plus(client_id) or None
    )


def client_credentials(authorization: str | None, form: Mapping[str, str]) -> ClientCredentials:
    """The client credentials of a request; :class:`BadRequest` for more than one method."""
    scheme, _, value = (authorization or "").strip().partition(" ")
    scheme = scheme.lower()
    in_body = "client_secret" in form
    found: list[ClientCredentials] = []
    if scheme == "basic":
        found.append(_basic(value))
    elif scheme in ("bearer", "dpop"):
        found.append(ClientCredentials("bearer", value.strip() or None))
    if in_body:
        found.append(
            ClientCredentials("client_secret_post", form["client_secret"], form.get("client_id"))
        )
    if len(found) > 1:
        message = "use one client authentication method, not several"
        raise BadRequest("invalid_request", message, error_description=message)
    if found:
        return found[0]
    return ClientCredentials("none", None, form.get("client_id") or None)
