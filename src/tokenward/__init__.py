"""tokenward: a self-hosted API token service and gateway.

The public surface: what applications import. Everything else is internal. The verifier
(and with it the database layer) is imported only when first used, so the CLI starts fast.
"""

from typing import TYPE_CHECKING, Any

from tokenward.tokens import (
    TOKEN_PATTERN,
    Reason,
    ScopeSet,
    TokenFormatError,
    TokenKind,
    TokenRecord,
    TokenState,
    find_tokens,
    generate_token,
    parse_token,
)

__version__ = "0.1.0"

if TYPE_CHECKING:
    from tokenward.verify import Decision, Verifier


def __getattr__(name: str) -> Any:
    if name in ("Decision", "Verifier"):
        from tokenward import verify

        return getattr(verify, name)
    raise AttributeError(f"module 'tokenward' has no attribute {name!r}")


__all__ = [
    "TOKEN_PATTERN",
    "Decision",
    "Reason",
    "ScopeSet",
    "TokenFormatError",
    "TokenKind",
    "TokenRecord",
    "TokenState",
    "Verifier",
    "__version__",
    "find_tokens",
    "generate_token",
    "parse_token",
]
