"""The PostgreSQL gateway's side towards the real server: connect (TLS when the listener's
URL asks for it) and log in as tokenward's own role, with SCRAM-SHA-256, MD5 or a cleartext
password as the server asks (docs/decisions/0026-postgres-gateway-authentication.md)."""

from __future__ import annotations

import asyncio
import ssl
import struct
from dataclasses import dataclass

from tokenward.gateway import pgwire as w
from tokenward.gateway.config import PostgresListener

_INT32 = struct.Struct("!i")
_PAIR = struct.Struct("!ii")


class UpstreamRefused(Exception):
    """The upstream server refused tokenward's login (its ErrorResponse fields)."""

    def __init__(self, fields: dict[str, str]) -> None:
        super().__init__(fields.get("M", "refused"))
        self.fields = fields


@dataclass(slots=True)
class Upstream:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    pid: int
    key: int
    status: bytes
    #: the server's ParameterStatus messages, as sent
    parameters: bytes


async def open_upstream(
    listener: PostgresListener, context: ssl.SSLContext | None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(listener.upstream_host, listener.upstream_port)
    if listener.upstream_sslmode != "disable":
        writer.write(_INT32.pack(8) + _INT32.pack(w.SSL_REQUEST))
        answer = await reader.readexactly(1)
        if answer != b"S":
            writer.close()
            raise UpstreamRefused({"M": "the upstream server does not accept TLS"})
        assert context is not None
        await writer.start_tls(context, server_hostname=listener.upstream_host)
    return reader, writer


async def login(
    listener: PostgresListener,
    password: str | None,
    params: dict[str, str],
    salted: dict[tuple[str, int], bytes],
    context: ssl.SSLContext | None,
) -> Upstream:
    """Connect and log in to the listener's upstream as tokenward's own role."""
    reader, writer = await open_upstream(listener, context)
    try:
        startup = {"user": listener.upstream_user, "database": listener.upstream_database}
        writer.write(w.startup_packet({**startup, **params}))
        scram: w.ScramClient | None = None
        parameters: list[bytes] = []
        pid = key = 0
        while True:
            header = await reader.readexactly(5)
            kind, length = header[:1], _INT32.unpack_from(header, 1)[0]
            if not 4 <= length <= 1 << 20:
                raise w.ProtocolError("the upstream sent a malformed message")
            body = await reader.readexactly(length - 4)
            if kind == b"R":
                code = _INT32.unpack_from(body)[0]
                if code == w.AUTH_OK:
                    continue
                if password is None:
                    raise UpstreamRefused(
                        {"M": "the upstream asks for a password: set password_file or password_env"}
                    )
                if code == w.AUTH_CLEARTEXT:
                    writer.write(w.password_message(w.cstring(password)))
                elif code == w.AUTH_MD5:
                    salt = body[4:8]
                    writer.write(
                        w.password_message(w.md5_password(listener.upstream_user, password, salt))
                    )
                elif code == w.AUTH_SASL:
                    if w.SCRAM.encode() not in body[4:].split(b"\x00"):
                        raise UpstreamRefused({"M": "the upstream offers no SCRAM-SHA-256"})
                    scram = w.ScramClient(password, salted)
                    writer.write(w.password_message(scram.first()))
                elif code == w.AUTH_SASL_CONTINUE and scram is not None:
                    writer.write(w.password_message(scram.final(body[4:].decode())))
                elif code == w.AUTH_SASL_FINAL and scram is not None:
                    scram.verify(body[4:].decode())
                else:
                    raise UpstreamRefused({"M": f"unsupported upstream authentication {code}"})
            elif kind == b"E":
                raise UpstreamRefused(w.error_fields(body))
            elif kind == b"S":
                parameters.append(header + body)
            elif kind == b"K":
                pid, key = _PAIR.unpack_from(body)
            elif kind == b"Z":
                return Upstream(reader, writer, pid, key, body[:1], b"".join(parameters))
            # NoticeResponse, NegotiateProtocolVersion: nothing to do
    except BaseException:
        writer.close()
        raise
