"""The gateway's upstream connections, against an upstream that answers byte by byte as told:
framing (length, chunked, until close), interim answers, reuse and its limits, broken and
slow upstreams, bodies both ways."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import httpx
import pytest

from tests.conftest import closed_port, listening_socket, port_of
from tests.gateway.support import POLICY, make_token, use_policy
from tokenward.gateway.proxy import Gateway
from tokenward.server import self_signed

OK = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"


@pytest.fixture
def database_url(tmp_path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'tokenward.db'}"  # the store is not under test


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    connection: int  # which upstream connection (1, 2, …) it came on


Script = Callable[["RawUpstream", asyncio.StreamWriter, Seen], Awaitable[bool]]


@dataclass
class RawUpstream:
    """An HTTP/1.1 server whose answers are scripts that write raw bytes (keyed by path)."""

    scripts: dict[str, Script]
    read_body: bool = True
    connections: int = 0
    seen: list[Seen] = field(default_factory=list)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number = self.connections
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                line, *lines = head.decode("latin-1").split("\r\n")[:-2]
                method, path, _ = line.split(" ")
                headers = {}
                for item in lines:
                    name, _, value = item.partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = b""
                script = self.scripts[path.split("?")[0]]
                if self.read_body and "content-length" in headers:
                    body = await reader.readexactly(int(headers["content-length"]))
                elif self.read_body and headers.get("transfer-encoding") == "chunked":
                    while size := int((await reader.readuntil(b"\r\n"))[:-2], 16):
                        body += (await reader.readexactly(size + 2))[:-2]
                    await reader.readuntil(b"\r\n")
                seen = Seen(method, path, headers, body, number)
                self.seen.append(seen)
                if not await script(self, writer, seen):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def answer(data: bytes, keep: bool = True) -> Script:
    async def script(upstream: RawUpstream, writer: asyncio.StreamWriter, seen: Seen) -> bool:
        writer.write(data)
        await writer.drain()
        return keep

    return script


@contextlib.asynccontextmanager
async def gateway_before(
    services, upstream: RawUpstream, policy: str = POLICY, tls: ssl.SSLContext | None = None
) -> AsyncIterator[tuple[httpx.AsyncClient, Gateway]]:
    upstream_sock, gateway_sock = listening_socket(), listening_socket()
    with closed_port() as dead_port:
        use_policy(services, policy.format(port=port_of(upstream_sock), dead_port=dead_port))
        server = await asyncio.start_server(upstream.serve, sock=upstream_sock, ssl=tls)
        gateway = Gateway(services.enforcement)
        await gateway.start("127.0.0.1", 0, sock=gateway_sock)
        try:
            base = f"http://127.0.0.1:{port_of(gateway_sock)}"
            async with httpx.AsyncClient(base_url=base) as client:
                yield client, gateway
        finally:
            await gateway.aclose()
            server.close()
            gateway_sock.close()


@pytest.fixture
async def auth(services, admin) -> dict[str, str]:
    issued = await make_token(services, admin, scopes=["records:*"])
    return {"Authorization": f"Bearer {issued.secret}"}


async def test_chunked_and_until_close_answers_are_passed_on_whole(services, auth):
    chunked = (
        b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\nX-Kind: chunked\r\n\r\n"
        b"3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n"
    )
    until_close = b"HTTP/1.1 200 OK\r\nX-Kind: eof\r\n\r\nthe end is the close"
    upstream = RawUpstream(
        {"/records/chunked": answer(chunked), "/records/eof": answer(until_close, keep=False)}
    )
    async with gateway_before(services, upstream) as (gw, _):
        r = await gw.get("/records/chunked", headers=auth)
        assert (r.status_code, r.content, r.headers["x-kind"]) == (201, b"abcdefg", "chunked")
        r = await gw.get("/records/eof", headers=auth)
        assert (r.status_code, r.content) == (200, b"the end is the close")
        r = await gw.get("/records/chunked", headers=auth)
        assert r.content == b"abcdefg"
    # The first connection served two answers; the one closed by the upstream was replaced.
    assert [s.connection for s in upstream.seen] == [1, 1, 2]


async def test_a_slow_answer_streams_chunk_by_chunk(services, auth):
    async def slow(upstream: RawUpstream, writer: asyncio.StreamWriter, seen: Seen) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.write(b"6\r\nsecond\r\n0\r\n\r\n")
        await writer.drain()
        return True

    upstream = RawUpstream({"/records/slow": slow})
    async with (
        gateway_before(services, upstream) as (gw, _),
        gw.stream("GET", "/records/slow", headers=auth) as r,
    ):
        parts = [chunk async for chunk in r.aiter_raw()]
    assert b"".join(parts) == b"firstsecond"
    assert parts[0] == b"first"  # the first chunk came before the second was written


async def test_interim_answers_are_skipped(services, auth):
    data = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n" + OK
    )
    async with gateway_before(services, RawUpstream({"/records/x": answer(data)})) as (gw, _):
        r = await gw.get("/records/x", headers=auth)
    assert (r.status_code, r.content) == (200, b"ok")
    assert "link" not in r.headers


async def test_hop_by_hop_answer_headers_are_dropped(services, auth):
    data = (
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n"
        b"X-Tokenward-Upstream: kept\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n"
        b"Content-Length: 2\r\n\r\nok"
    )
    async with gateway_before(services, RawUpstream({"/records/x": answer(data)})) as (gw, _):
        r = await gw.get("/records/x", headers=auth)
    assert r.status_code == 200 and "keep-alive" not in r.headers
    assert r.headers.get_list("set-cookie") == ["a=1", "b=2"]
    assert r.headers["x-tokenward-upstream"] == "kept"  # the upstream's own headers pass
    assert r.headers["x-request-id"].startswith("req_")


async def test_connection_close_and_head_answers_are_not_reused(services, auth):
    closing = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n"
    upstream = RawUpstream({"/records/close": answer(closing), "/records/head": answer(head)})
    async with gateway_before(services, upstream) as (gw, _):
        assert (await gw.get("/records/close", headers=auth)).content == b"ok"
        r = await gw.head("/records/head", headers=auth)
        assert r.status_code == 200 and r.headers["content-length"] == "1234"
        assert (await gw.get("/records/close", headers=auth)).status_code == 200
    assert [s.connection for s in upstream.seen] == [1, 2, 3]


async def test_no_body_answers(services, auth):
    upstream = RawUpstream(
        {
            "/records/204": answer(b"HTTP/1.1 204 No Content\r\n\r\n"),
            "/records/304": answer(b'HTTP/1.1 304 Not Modified\r\nETag: "x"\r\n\r\n'),
        }
    )
    async with gateway_before(services, upstream) as (gw, _):
        r = await gw.get("/records/204", headers=auth)
        assert (r.status_code, r.content) == (204, b"")
        r = await gw.get("/records/304", headers=auth)
        assert (r.status_code, r.content, r.headers["etag"]) == (304, b"", '"x"')
        r = await gw.get("/records/204", headers=auth)
        assert r.status_code == 204
    assert {s.connection for s in upstream.seen} == {1}


async def test_broken_answers_are_502_never_passed_on(services, auth):
    upstream = RawUpstream(
        {
            "/records/garbage": answer(b"SMTP ready\r\n\r\n", keep=False),
            "/records/short": answer(
                b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this", keep=False
            ),
            "/records/upgrade": answer(
                b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\n"
                b"Upgrade: websocket\r\n\r\n",
                keep=False,
            ),
            "/records/silent": answer(b"", keep=False),
            "/records/huge-head": answer(
                b"HTTP/1.1 200 OK\r\n" + b"X-Big: " + b"b" * 70_000 + b"\r\n\r\n", keep=False
            ),
        }
    )
    async with gateway_before(services, upstream) as (gw, _):
        for path in upstream.scripts:
            r = await gw.get(path, headers=auth)
            assert r.status_code == 502, path
            assert r.json()["error"] == "upstream_unavailable"


async def test_a_large_answer_streams_and_the_connection_serves_the_next(services, auth):
    size = 2_500_000  # well past the read-ahead: reading pauses and resumes
    big = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"y" * size
    upstream = RawUpstream({"/records/big": answer(big), "/records/x": answer(OK)})
    async with gateway_before(services, upstream) as (gw, _):
        async with gw.stream("GET", "/records/big", headers=auth) as r:
            received = 0
            async for chunk in r.aiter_raw():
                received += len(chunk)
                await asyncio.sleep(0.001)  # a client slower than the upstream
        assert (r.status_code, received) == (200, size)
        assert (await gw.get("/records/x", headers=auth)).content == b"ok"
    assert [s.connection for s in upstream.seen] == [1, 1]


async def test_a_long_answer_cut_short_cuts_the_client_connection(services, auth):
    async def cut(upstream: RawUpstream, writer: asyncio.StreamWriter, seen: Seen) -> bool:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 100_000)
        await writer.drain()
        return False

    async with gateway_before(services, RawUpstream({"/records/cut": cut})) as (gw, _):
        with pytest.raises(httpx.HTTPError):
            async with gw.stream("GET", "/records/cut", headers=auth) as r:
                async for _ in r.aiter_bytes():
                    pass


async def test_a_dropped_pooled_connection_is_retried_once_for_idempotent_requests(services, auth):
    async def drop_second(upstream: RawUpstream, writer: asyncio.StreamWriter, s: Seen) -> bool:
        # The first request on each connection is answered, the second one is dropped
        # unanswered, as when an upstream closes an idle connection as a request arrives.
        if sum(1 for other in upstream.seen if other.connection == s.connection) == 1:
            writer.write(OK)
            await writer.drain()
            return True
        return False

    upstream = RawUpstream({"/records/x": drop_second})
    async with gateway_before(services, upstream) as (gw, _):
        assert (await gw.get("/records/x", headers=auth)).status_code == 200
        assert (await gw.get("/records/x", headers=auth)).status_code == 200  # retried
        r = await gw.post("/records/x", headers=auth, content=b"{}")
        assert r.status_code == 502  # not idempotent: never sent twice
    assert [(s.method, s.connection) for s in upstream.seen] == [
        ("GET", 1),
        ("GET", 1),
        ("GET", 2),
        ("POST", 2),
    ]


async def test_the_pool_bounds_connections_and_waiting_for_one_times_out(services, auth):
    async def slow(upstream: RawUpstream, writer: asyncio.StreamWriter, seen: Seen) -> bool:
        await asyncio.sleep(0.4)
        writer.write(OK)
        await writer.drain()
        return True

    policy = POLICY.replace("timeout = 0.5", "timeout = 2\npool_size = 1\nconnect_timeout = 0.2")
    upstream = RawUpstream({"/records/slow": slow, "/records/x": answer(OK)})
    async with gateway_before(services, upstream, policy) as (gw, _):
        first = asyncio.ensure_future(gw.get("/records/slow", headers=auth))
        while not upstream.seen:  # until the slow request holds the only connection
            await asyncio.sleep(0.01)
        r = await gw.get("/records/x", headers=auth)
        assert r.status_code == 504 and r.json()["error"] == "upstream_timeout"
        assert (await first).status_code == 200
        assert (await gw.get("/records/x", headers=auth)).status_code == 200
    assert upstream.connections == 1


async def test_request_bodies_pass_through_as_sent(services, auth):
    upstream = RawUpstream({"/records/upload": answer(OK)})
    packed = gzip.compress(b'{"a": 1}' * 100)

    async def chunks():
        yield b"part one, "
        await asyncio.sleep(0.05)
        yield b"part two"

    async with gateway_before(services, upstream) as (gw, _):
        r = await gw.post(
            "/records/upload",
            headers={**auth, "Content-Encoding": "gzip", "Content-Type": "application/json"},
            content=packed,
        )
        assert r.status_code == 200
        r = await gw.put("/records/upload", headers=auth, content=chunks())
        assert r.status_code == 200
    gzipped, streamed = upstream.seen
    assert gzipped.body == packed  # not inflated on the way
    assert gzipped.headers["content-encoding"] == "gzip"
    assert gzipped.headers["content-length"] == str(len(packed))
    assert streamed.headers["transfer-encoding"] == "chunked"
    assert streamed.body == b"part one, part two"


async def test_an_early_answer_ends_the_upload(services, auth):
    refuse = b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 4\r\nConnection: close\r\n\r\nnope"
    upstream = RawUpstream({"/records/upload": answer(refuse, keep=False)}, read_body=False)

    async def endless():
        for _ in range(200):
            yield b"z" * 8192
            await asyncio.sleep(0.001)

    async with gateway_before(services, upstream) as (gw, _):
        r = await gw.put("/records/upload", headers=auth, content=endless())
    assert (r.status_code, r.content) == (413, b"nope")


def _raw_exchange(port: int, head: bytes, body: bytes | None) -> tuple[bytes, bytes]:
    """Send ``head``, read what comes first; then send ``body`` and read until the close."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(head)
        first = sock.recv(65536)
        if body is None:
            return first, b""
        sock.sendall(body)
        rest = b""
        while data := sock.recv(65536):
            rest += data
        return first, rest


async def test_expect_100_continue_is_answered_after_the_decision(services, auth):
    upstream = RawUpstream({"/records/upload": answer(OK)})
    async with gateway_before(services, upstream) as (gw, _):
        port = gw.base_url.port
        head = (
            b"POST /records/upload HTTP/1.1\r\nHost: gw\r\nContent-Length: 5\r\n"
            b"Expect: 100-continue\r\nConnection: close\r\n"
            + f"Authorization: {auth['Authorization']}\r\n\r\n".encode()
        )
        first, rest = await asyncio.to_thread(_raw_exchange, port, head, b"hello")
        assert first.startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        assert (first + rest).split(b"\r\n\r\n", 1)[1].startswith(b"HTTP/1.1 200 OK")
        denied = head.replace(auth["Authorization"].encode(), b"Bearer nope")
        first, _ = await asyncio.to_thread(_raw_exchange, port, denied, None)
        assert first.startswith(b"HTTP/1.1 401 ")  # no invitation to send the body
    [seen] = upstream.seen
    assert seen.body == b"hello" and "expect" not in seen.headers


async def test_an_unknown_expectation_is_417_after_the_decision(services, auth):
    upstream = RawUpstream({"/records/x": answer(OK)})
    async with gateway_before(services, upstream) as (gw, _):
        r = await gw.post("/records/x", headers={**auth, "Expect": "coffee"}, content=b"{}")
        assert r.status_code == 417 and r.json()["error"] == "expectation_failed"
        r = await gw.post("/records/x", headers={"Expect": "coffee"}, content=b"{}")
        assert r.status_code == 401  # a denial stays a denial
    assert upstream.seen == []


async def test_an_upstream_that_neither_reads_nor_answers_times_out(services, auth):
    async def stall(upstream: RawUpstream, writer: asyncio.StreamWriter, seen: Seen) -> bool:
        await asyncio.sleep(5)
        return False

    upstream = RawUpstream({"/records/upload": stall}, read_body=False)

    async def body():
        for _ in range(60):
            yield b"u" * 30_000

    async with gateway_before(services, upstream) as (gw, _):
        started = asyncio.get_running_loop().time()
        r = await gw.put("/records/upload", headers=auth, content=body())
        assert r.status_code == 504 and r.json()["error"] == "upstream_timeout"
        assert asyncio.get_running_loop().time() - started < 3


async def test_a_slow_upload_is_not_an_upstream_timeout(services, auth):
    upstream = RawUpstream({"/records/upload": answer(OK)})

    async def slowly():
        for _ in range(6):
            yield b"s" * 1000
            await asyncio.sleep(0.2)  # 1.2 s in all; the upstream's timeout is 0.5 s

    async with gateway_before(services, upstream) as (gw, _):
        r = await gw.put("/records/upload", headers=auth, content=slowly())
    assert r.status_code == 200
    assert upstream.seen[0].body == b"s" * 6000


async def test_tls_upstreams_are_verified(services, auth, tmp_path):
    cert, key, _ = self_signed(tmp_path / "tls", "127.0.0.1")
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert, key)
    policy = POLICY.replace('url = "http://127.0.0.1:{port}"', 'url = "https://127.0.0.1:{port}"')
    upstream = RawUpstream({"/records/x": answer(OK)})
    async with gateway_before(services, upstream, policy, tls) as (gw, gateway):
        r = await gw.get("/records/x", headers=auth)
        assert r.status_code == 502  # a certificate no trusted authority signed
        trusting = ssl.create_default_context(cafile=str(cert))
        gateway._pools["records"].ssl = trusting  # as if the system trusted it
        r = await gw.get("/records/x", headers=auth)
        assert (r.status_code, r.content) == (200, b"ok")
    assert upstream.seen[0].headers["host"].startswith("127.0.0.1:")


async def test_a_fresh_connection_makes_room_in_a_full_pool():
    from tokenward.gateway.config import Upstream
    from tokenward.gateway.upstream import UpstreamPool

    upstream = RawUpstream({"/x": answer(OK)})
    sock = listening_socket()
    port = port_of(sock)
    server = await asyncio.start_server(upstream.serve, sock=sock)
    pool = UpstreamPool(Upstream("u", f"http://127.0.0.1:{port}", 0.5, 1.0, 1))
    try:
        for fresh in (False, True):
            conn, reused = await pool.acquire(fresh=fresh)
            assert not reused
            conn.begin(b"GET /x HTTP/1.1\r\nHost: u\r\n\r\n", head_only=False, sent=True)
            await conn.read_head(1.0)
            await conn.read_all(1.0)
            assert (conn.status, conn.take()) == (200, b"ok")
            pool.release(conn)  # idle, and the pool (of one) is full
    finally:
        await pool.close()
        server.close()
    assert upstream.connections == 2
