"""The server's corked transport: a response's writes of one loop turn leave in one send."""

from __future__ import annotations

import asyncio

from tokenward.server import CorkedTransport


class _Transport:
    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.closed = False
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.sent.append(data)

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: object = None) -> object:
        return {"peername": ("127.0.0.1", 5)}.get(name, default)

    def pause_reading(self) -> None:
        self.sent.append(b"<paused>")


async def test_head_and_body_written_in_one_turn_leave_in_one_send():
    inner = _Transport()
    corked = CorkedTransport(inner, asyncio.get_running_loop())
    corked.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
    corked.write(b"ok")
    assert inner.sent == [] and corked.get_write_buffer_size() == 40
    await asyncio.sleep(0)
    assert inner.sent == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"]
    corked.write(b"next")  # a later turn: a send of its own
    await asyncio.sleep(0)
    assert inner.sent[-1] == b"next"


async def test_close_sends_what_waits_and_abort_drops_it():
    inner = _Transport()
    corked = CorkedTransport(inner, asyncio.get_running_loop())
    corked.write(b"last words")
    corked.close()
    assert inner.sent == [b"last words"] and inner.closed
    await asyncio.sleep(0)  # the scheduled send finds nothing more
    assert inner.sent == [b"last words"]
    other = _Transport()
    corked = CorkedTransport(other, asyncio.get_running_loop())
    corked.write(b"dropped")
    corked.abort()
    await asyncio.sleep(0)
    assert other.sent == [] and other.aborted


async def test_everything_else_is_the_transport_itself():
    inner = _Transport()
    corked = CorkedTransport(inner, asyncio.get_running_loop())
    assert corked.get_extra_info("peername") == ("127.0.0.1", 5)
    assert corked.get_extra_info("sslcontext") is None
    corked.pause_reading()
    assert inner.sent == [b"<paused>"]
