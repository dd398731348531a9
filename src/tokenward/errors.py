"""Every error tokenward raises on purpose.

::

    TokenwardError            status, stable ``code``, human ``message``
    ├── BadRequest            400  malformed input the schema could not catch
    ├── Unauthorized          401  no credential, or one that does not verify
    ├── Forbidden             403  a valid credential without the needed scope or project
    ├── NotFound              404  no such thing (or not visible to this credential)
    ├── Conflict              409  the thing exists, or is in a state that forbids the change
    ├── Invalid               422  well-formed JSON with values that break a rule
    ├── TooManyRequests       429  rate limited
    └── Unavailable           503  a dependency is down: fail closed

The API turns each into ``{"error": code, "message": message}`` with its status. Messages
never contain a presented secret.

A secret typed into a text that would be stored (a name, a reason, a note, a URL) is refused
with ``400 token_in_field`` by :func:`refuse_pasted_tokens`, wherever it is typed.
"""

from __future__ import annotations

from typing import Any, ClassVar

from tokenward.tokens.format import texts_hold_token


class TokenwardError(Exception):
    status: ClassVar[int] = 500

    def __init__(self, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {"error": self.code, "message": self.message, **self.extra}


class BadRequest(TokenwardError):
    status = 400


class Unauthorized(TokenwardError):
    status = 401


class Forbidden(TokenwardError):
    status = 403
    #: for a credential that is valid but lacks the scope: who it is (else ``None``)
    caller: Any = None
    #: the scope(s) it lacks, for the RFC 6750 challenge (else ``None``)
    scope: str | None = None


class NotFound(TokenwardError):
    status = 404


class Conflict(TokenwardError):
    status = 409


class UnsupportedMediaType(TokenwardError):
    status = 415


class Invalid(TokenwardError):
    status = 422


class TooManyRequests(TokenwardError):
    status = 429
    #: seconds for the ``Retry-After`` header, when known
    retry_after: int | None = None


class Unavailable(TokenwardError):
    status = 503


def refuse_pasted_tokens(**fields: object) -> None:
    """Refuse text that holds a token (``400 token_in_field``): a secret pasted into a name,
    a reason, a note or a URL would be stored, logged and shown in clear.

    Values may be text or JSON-like data (every string in it, keys included, is read);
    a token is found glued to other text and through percent-encoding
    (:func:`~tokenward.tokens.format.holds_token`). The message names the field, never
    what was in it.
    """
    for name, value in fields.items():
        if texts_hold_token(value):
            raise BadRequest(
                "token_in_field", f"{name} contains a tokenward token; tokens are never stored"
            )
