"""tokenward: a self-hosted API token service and gateway.

The public surface: what applications import. Everything else is internal.
"""

__version__ = "0.1.0"

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
from tokenward.verify import Decision, Verifier

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
