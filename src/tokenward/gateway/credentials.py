"""Upstream credentials held by the gateway: the provider's key that clients never see.

An ``[[upstreams]]`` entry may name a credential that the gateway adds to every request it
forwards there, as a header (``Authorization: Bearer …``, ``x-api-key: …``) or as a query
parameter (for providers that insist). The secret is read once, when the policy is loaded,
from a file (``credential_file``) or an environment variable (``credential_env``); a policy
that writes the secret itself is refused. The value is never logged, never in an error, an
audit event or a ``repr``, and an upstream answer that echoes it back gets it masked.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from multidict import CIMultiDict

#: ``[[upstreams]]`` keys of a credential.
KEYS = frozenset(
    {
        "credential_header",
        "credential_query",
        "credential_prefix",
        "credential_file",
        "credential_env",
    }
)
#: Keys that would hold the secret itself: refused with a pointer to the right way.
INLINE_KEYS = frozenset(
    {"credential", "credential_value", "secret", "api_key", "key", "token", "password"}
)
INLINE_PROBLEM = (
    "the secret must not be written in the policy file: "
    "name a file (credential_file) or an environment variable (credential_env)"
)
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}$")
_QUERY_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
#: Header names the gateway sets or reads itself, or that frame the message.
_RESERVED = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        "expect",
        "forwarded",
        "x-request-id",
        "x-real-ip",
    }
)
_MAX_SECRET = 8192


class CredentialError(ValueError):
    """A credential setting is not valid (the message never holds the secret)."""


@dataclass(frozen=True, slots=True)
class Credential:
    """Where the secret goes (``header`` or ``query``) and, hidden from ``repr``, the secret."""

    header: str | None
    query: str | None
    source: str  # "file /run/secrets/x" or "env PROVIDER_KEY": safe to show
    secret: str = field(repr=False)
    prefix: str = field(default="", repr=False)
    #: the header line (``Name: prefix+secret``) or the query pair (``name=secret``), as bytes
    wire: bytes = field(init=False, repr=False)
    #: the lower-case header name the client's copy of is dropped
    drops: bytes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.header is not None:
            line = f"{self.header}: {self.prefix}{self.secret}\r\n".encode("latin-1")
            object.__setattr__(self, "wire", line)
            object.__setattr__(self, "drops", self.header.lower().encode("ascii"))
        else:
            assert self.query is not None
            pair = f"{quote(self.query, safe='')}={quote(self.secret, safe='')}"
            object.__setattr__(self, "wire", pair.encode("ascii"))
            object.__setattr__(self, "drops", quote(self.query, safe="").encode("ascii"))

    def apply(self, forward: list[bytes], target: bytes) -> tuple[list[bytes], bytes]:
        """The header lines (name, ": ", value, CRLF quads) and request target for the
        upstream: the client's copies of the credential removed, the gateway's added."""
        if self.header is not None:
            kept = []
            for i in range(0, len(forward), 4):
                if forward[i].lower() != self.drops:
                    kept += forward[i : i + 4]
            kept.append(self.wire)
            return kept, target
        path, _, query = target.partition(b"?")
        pairs = [p for p in query.split(b"&") if p and p.partition(b"=")[0] != self.drops]
        return forward, path + b"?" + b"&".join([*pairs, self.wire])

    def mask(self, data: bytes) -> bytes:
        """``data`` with every echo of the secret masked (same length: lengths stay true)."""
        needle = self.secret.encode("latin-1")
        if needle in data:
            data = data.replace(needle, b"*" * len(needle))
        return data

    def answer_mask(self) -> AnswerMask:
        return AnswerMask(self.secret.encode("latin-1"))


class AnswerMask:
    """Masks echoes of a secret in an answer's headers and body, also across chunk boundaries
    (the gateway's body filter).

    Only a tail that could be the start of the secret is held back for the next chunk, so a
    stream (server-sent events) is not delayed by the masking.
    """

    __slots__ = ("carry", "needle")

    def __init__(self, needle: bytes) -> None:
        self.needle = needle
        self.carry = b""

    def start(self, status: int, headers: CIMultiDict[str]) -> int:
        text = self.needle.decode("latin-1")
        if any(text in value for value in headers.values()):
            items = [(k, v.replace(text, "*" * len(text))) for k, v in headers.items()]
            headers.clear()
            headers.extend(items)
        return status

    async def feed(self, chunk: bytes) -> bytes:
        needle = self.needle
        data = self.carry + chunk
        if needle in data:
            data = data.replace(needle, b"*" * len(needle))
        keep = 0
        for size in range(min(len(needle) - 1, len(data)), 0, -1):
            if data.endswith(needle[:size]):
                keep = size
                break
        if keep:
            self.carry, data = data[-keep:], data[:-keep]
        else:
            self.carry = b""
        return data

    async def end(self) -> bytes:
        carry, self.carry = self.carry, b""
        return carry


def load_credential(
    settings: dict[str, object], environ: dict[str, str] | None = None
) -> Credential:
    """The credential of an upstream's ``credential_*`` keys; :class:`CredentialError` names
    the key at fault as ``key: problem``."""
    header = settings.get("credential_header")
    query = settings.get("credential_query")
    prefix = settings.get("credential_prefix")
    file = settings.get("credential_file")
    env = settings.get("credential_env")
    if (header is None) == (query is None):
        raise CredentialError(
            "credential_header: set exactly one of credential_header and credential_query"
        )
    if (file is None) == (env is None):
        raise CredentialError(
            "credential_file: set exactly one of credential_file and credential_env"
        )
    if header is not None:
        if not isinstance(header, str) or not _HEADER_NAME.match(header):
            raise CredentialError("credential_header: must be an HTTP header name")
        lower = header.lower()
        if lower in _RESERVED or lower.startswith(("x-tokenward-", "x-forwarded-", "proxy-")):
            raise CredentialError(f"credential_header: the gateway sets {header} itself")
    if query is not None and (not isinstance(query, str) or not _QUERY_NAME.match(query)):
        raise CredentialError("credential_query: letters, digits, '.', '_' and '-' only")
    if prefix is None:
        prefix = "Bearer " if isinstance(header, str) and header.lower() == "authorization" else ""
    if not isinstance(prefix, str) or not _printable(prefix) or len(prefix) > 64:
        raise CredentialError("credential_prefix: must be printable text of at most 64 characters")
    if query is not None and prefix:
        raise CredentialError("credential_prefix: only for a header credential")
    if file is not None:
        if not isinstance(file, str) or not file:
            raise CredentialError("credential_file: must be a file path")
        source = f"file {file}"
        try:
            raw = Path(file).read_text(encoding="utf-8")
        except OSError as exc:
            raise CredentialError(f"credential_file: cannot read {file} ({exc.strerror})") from None
        except UnicodeDecodeError:
            raise CredentialError(f"credential_file: {file} is not UTF-8 text") from None
        key = "credential_file"
    else:
        if not isinstance(env, str) or not _ENV_NAME.match(env):
            raise CredentialError("credential_env: must be an environment variable name")
        source = f"env {env}"
        raw = (os.environ if environ is None else environ).get(env, "")
        key = "credential_env"
    secret = raw.strip()
    if not secret:
        raise CredentialError(f"{key}: {source.partition(' ')[2]} is empty or not set")
    if len(secret) > _MAX_SECRET or not _printable(secret):
        raise CredentialError(
            f"{key}: the secret in {source.partition(' ')[2]} must be one line of printable "
            f"ASCII of at most {_MAX_SECRET} characters"
        )
    return Credential(
        header=header if isinstance(header, str) else None,
        query=query if isinstance(query, str) else None,
        source=source,
        secret=secret,
        prefix=prefix,
    )


def _printable(text: str) -> bool:
    return text.isascii() and all(" " <= c <= "~" for c in text)
