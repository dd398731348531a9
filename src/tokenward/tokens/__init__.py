"""The pure token domain: format, keyed hashing, scopes, durations and lifecycle rules.

Nothing here does I/O or imports a web framework or a database driver.
"""

from tokenward.tokens.format import (
    TOKEN_PATTERN,
    Environment,
    ParsedToken,
    TokenFormatError,
    find_tokens,
    generate_token,
    parse_token,
    token_hint,
)
from tokenward.tokens.hashing import ServerKey, TokenHasher
from tokenward.tokens.model import Reason, TokenKind, TokenRecord, TokenState
from tokenward.tokens.scopes import ScopeError, ScopeSet, is_narrower, scopes_allow

__all__ = [
    "TOKEN_PATTERN",
    "Environment",
    "ParsedToken",
    "Reason",
    "ScopeError",
    "ScopeSet",
    "ServerKey",
    "TokenFormatError",
    "TokenHasher",
    "TokenKind",
    "TokenRecord",
    "TokenState",
    "find_tokens",
    "generate_token",
    "is_narrower",
    "parse_token",
    "scopes_allow",
    "token_hint",
]
