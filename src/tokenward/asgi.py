"""Answering straight from ASGI, below the framework: one JSON response."""

from __future__ import annotations

from collections.abc import Iterable

import orjson
from starlette.types import Send

_JSON = (b"content-type", b"application/json")
_NO_STORE = (b"cache-control", b"no-store")


async def send_json(
    send: Send, status: int, body: object, extra: Iterable[tuple[bytes, bytes]] = ()
) -> None:
    """``body`` (already bytes, or anything orjson encodes) as a JSON answer, never cached."""
    payload = body if isinstance(body, bytes) else orjson.dumps(body)
    headers = [_JSON, _NO_STORE, (b"content-length", str(len(payload)).encode()), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
