"""PostgreSQL frontend/backend protocol v3: the framing and the few messages tokenward builds.

Only what the PostgreSQL gateway (:mod:`~tokenward.gateway.postgres`) needs: reading the
untyped startup packet, building the server's answers (authentication requests,
``ErrorResponse``, ``ParameterStatus``, ``BackendKeyData``, ``ReadyForQuery``) and the client
messages of the upstream login, and SCRAM-SHA-256 as a client (RFC 5802, RFC 7677), with the
salted password cached per salt so that a new upstream connection costs one HMAC, not 4096.

Every message after the startup packet is ``type (1 byte) | length (int32, itself included) |
body``; the startup packet, ``SSLRequest``, ``GSSENCRequest`` and ``CancelRequest`` have no
type byte. Reference: https://www.postgresql.org/docs/current/protocol-message-formats.html
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import struct
import unicodedata
from dataclasses import dataclass

#: startup packet codes (the int32 after the length)
PROTOCOL_3 = 196608  # 3.0
SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102
#: authentication request codes (``R`` messages)
AUTH_OK = 0
AUTH_CLEARTEXT = 3
AUTH_MD5 = 5
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12

_INT32 = struct.Struct("!i")
_HEADER = struct.Struct("!ci")
_PAIR = struct.Struct("!ii")


class ProtocolError(ValueError):
    """The peer sent something that is not the protocol; the session ends with 08P01."""


def message(kind: bytes, body: bytes = b"") -> bytes:
    return _HEADER.pack(kind, len(body) + 4) + body


def cstring(value: str) -> bytes:
    return value.encode() + b"\x00"


def read_cstring(body: bytes | bytearray, start: int) -> tuple[str, int]:
    """The NUL-terminated string at ``start`` and the offset after it."""
    end = body.find(b"\x00", start)
    if end < 0:
        raise ProtocolError("a string is not terminated")
    try:
        return body[start:end].decode(), end + 1
    except UnicodeDecodeError:
        raise ProtocolError("a string is not UTF-8") from None


def parse_startup(body: bytes) -> dict[str, str]:
    """The parameters of a startup packet (``body`` after its length and protocol code)."""
    params: dict[str, str] = {}
    pos = 0
    while pos < len(body) and body[pos] != 0:
        key, pos = read_cstring(body, pos)
        value, pos = read_cstring(body, pos)
        if key in params:
            raise ProtocolError(f"the startup parameter {key!r} is given twice")
        params[key] = value
    if pos != len(body) - 1:
        raise ProtocolError("the startup packet is not terminated")
    return params


def startup_packet(params: dict[str, str]) -> bytes:
    body = _INT32.pack(PROTOCOL_3) + b"".join(cstring(k) + cstring(v) for k, v in params.items())
    body += b"\x00"
    return _INT32.pack(len(body) + 4) + body


def cancel_packet(pid: int, key: int) -> bytes:
    return _INT32.pack(16) + _INT32.pack(CANCEL_REQUEST) + _PAIR.pack(pid, key)


def auth_request(code: int, data: bytes = b"") -> bytes:
    return message(b"R", _INT32.pack(code) + data)


def parameter_status(name: str, value: str) -> bytes:
    return message(b"S", cstring(name) + cstring(value))


def backend_key_data(pid: int, key: int) -> bytes:
    return message(b"K", _PAIR.pack(pid, key))


def ready_for_query(status: bytes = b"I") -> bytes:
    return message(b"Z", status)


def negotiate_protocol(minor: int, unknown: list[str]) -> bytes:
    body = _INT32.pack(minor) + _INT32.pack(len(unknown)) + b"".join(cstring(u) for u in unknown)
    return message(b"v", body)


def error_response(
    code: str, text: str, *, severity: str = "FATAL", detail: str | None = None
) -> bytes:
    """An ``ErrorResponse``: severity (both fields), SQLSTATE, message and an optional detail."""
    body = b"S" + cstring(severity) + b"V" + cstring(severity) + b"C" + cstring(code)
    body += b"M" + cstring(text)
    if detail:
        body += b"D" + cstring(detail)
    return message(b"E", body + b"\x00")


def error_fields(body: bytes | bytearray) -> dict[str, str]:
    """The fields of an ``ErrorResponse`` or ``NoticeResponse`` body, by their one-letter code."""
    fields: dict[str, str] = {}
    pos = 0
    while pos < len(body) and body[pos] != 0:
        code = chr(body[pos])
        end = body.find(b"\x00", pos + 1)
        if end < 0:
            break
        fields[code] = body[pos + 1 : end].decode(errors="replace")
        pos = end + 1
    return fields


def query(text: str) -> bytes:
    return message(b"Q", cstring(text))


def password_message(data: bytes) -> bytes:
    return message(b"p", data)


def md5_password(user: str, password: str, salt: bytes) -> bytes:
    inner = hashlib.md5(password.encode() + user.encode()).hexdigest()  # noqa: S324 - protocol
    outer = hashlib.md5(inner.encode() + salt).hexdigest()  # noqa: S324 - protocol
    return cstring("md5" + outer)


# -- SCRAM-SHA-256 as a client (RFC 5802 §3, RFC 7677) ---------------------------------------

SCRAM = "SCRAM-SHA-256"


def _saslprep(password: str) -> bytes:
    """RFC 4013's normalisation step (NFKC); PostgreSQL uses the raw bytes when SASLprep
    fails, so an unusual password still works the same way on both sides."""
    return unicodedata.normalize("NFKC", password).encode()


def _attributes(message_: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in message_.split(","):
        key, sep, value = part.partition("=")
        if not sep or len(key) != 1:
            raise ProtocolError("a SCRAM message is malformed")
        out[key] = value
    return out


@dataclass(slots=True)
class ScramClient:
    """One SCRAM-SHA-256 exchange. ``salted``: a cache of SaltedPassword by (salt, iterations)
    shared by the exchanges of one upstream (the server keeps one salt per role)."""

    password: str
    salted: dict[tuple[str, int], bytes]
    #: PostgreSQL takes the role from the startup packet and ignores this one
    user: str = ""
    nonce: str = ""
    first_bare: str = ""
    server_signature: bytes = b""

    def first(self, nonce: str | None = None) -> bytes:
        """The SASLInitialResponse body (``nonce``: a fixed one, for the RFC's test vector)."""
        self.nonce = nonce or base64.b64encode(secrets.token_bytes(18)).decode()
        self.first_bare = f"n={self.user},r={self.nonce}"
        initial = ("n,," + self.first_bare).encode()
        return cstring(SCRAM) + _INT32.pack(len(initial)) + initial

    def final(self, server_first: str) -> bytes:
        attrs = _attributes(server_first)
        nonce, salt, iterations = attrs.get("r", ""), attrs.get("s", ""), attrs.get("i", "")
        if not nonce.startswith(self.nonce) or len(nonce) <= len(self.nonce):
            raise ProtocolError("the server's SCRAM nonce does not extend ours")
        if not iterations.isdigit() or not 0 < int(iterations) <= 1_000_000:
            raise ProtocolError("the server's SCRAM iteration count is not acceptable")
        key = (salt, int(iterations))
        salted = self.salted.get(key)
        if salted is None:
            salted = hashlib.pbkdf2_hmac(
                "sha256", _saslprep(self.password), base64.b64decode(salt), int(iterations)
            )
            if len(self.salted) > 16:
                self.salted.clear()
            self.salted[key] = salted
        without_proof = f"c=biws,r={nonce}"  # biws = base64("n,,"): no channel binding
        auth_message = f"{self.first_bare},{server_first},{without_proof}".encode()
        client_key = hmac.digest(salted, b"Client Key", "sha256")
        stored_key = hashlib.sha256(client_key).digest()
        signature = hmac.digest(stored_key, auth_message, "sha256")
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        server_key = hmac.digest(salted, b"Server Key", "sha256")
        self.server_signature = hmac.digest(server_key, auth_message, "sha256")
        return f"{without_proof},p={base64.b64encode(proof).decode()}".encode()

    def verify(self, server_final: str) -> None:
        attrs = _attributes(server_final)
        if "e" in attrs:
            raise ProtocolError(f"the server refused the SCRAM exchange: {attrs['e']}")
        if not hmac.compare_digest(base64.b64decode(attrs.get("v", "")), self.server_signature):
            raise ProtocolError("the server's SCRAM signature is wrong")
