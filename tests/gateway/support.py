"""Helpers of the gateway tests: a real upstream, a policy, a collecting event sink."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import uvicorn
from aiohttp import web

from tests.conftest import listening_socket, port_of
from tokenward.app import Services
from tokenward.events import AccessEvent
from tokenward.gateway import build_enforcement, parse_policy
from tokenward.service import Issued, TokenSpec

POLICY = """
[gateway]
max_request_bytes = 2000000
max_response_bytes = 3000000

[[upstreams]]
name = "records"
url = "http://127.0.0.1:{port}"
timeout = 0.5

[[upstreams]]
name = "down"
url = "http://127.0.0.1:{dead_port}"

[[routes]]
upstream = "records"
path = "/records/{{rest:path}}"
methods = ["GET"]
scope = "records:read"

[[routes]]
upstream = "records"
path = "/records/{{rest:path}}"
methods = ["POST", "PUT"]
scope = "records:write"

[[routes]]
upstream = "records"
path = "/functions/{{name}}"
methods = ["POST"]
scope = "functions:invoke:{{name}}"
rate_limit = "2/minute"

[[routes]]
upstream = "records"
path = "/shop/{{rest:path}}"
methods = ["*"]
scope = "records:read"
project = "shop"
environment = "live"

[[routes]]
upstream = "down"
path = "/down"
methods = ["GET"]
scope = "records:read"

[[routes]]
path = "/authz-only/{{rest:path}}"
methods = ["GET"]
scope = "records:read"
"""


class Sink:
    """Collects events, as the audit writer would."""

    def __init__(self) -> None:
        self.access_events: list[AccessEvent] = []

    async def access(self, event: AccessEvent) -> None:
        self.access_events.append(event)

    async def admin(self, event: object) -> None:
        pass

    async def security(self, event: object) -> None:
        pass


def use_policy(services: Services, text: str, **settings: object) -> Sink:
    """Give ``services`` the route policy ``text`` (and settings); return an event sink."""
    config = services.settings.model_copy(update=settings)
    services.enforcement = build_enforcement(
        config,
        services.verifier,
        services.limiter,
        services.events,
        services.hasher,
        policy=parse_policy(text, "test.toml"),
    )
    sink = Sink()
    services.events.subscribe(sink)
    return sink


async def make_token(services: Services, admin: Issued, project: str = "shop", **fields) -> Issued:
    if await services.store.get_project(project) is None:
        await services.tokens.create_project(admin.record, project)
    fields.setdefault("scopes", ["records:read"])
    return await services.tokens.create_token(admin.record, TokenSpec(project=project, **fields))


async def _echo(request: web.Request) -> web.StreamResponse:
    if request.path == "/records/slow":
        await asyncio.sleep(1)
    if request.path.startswith("/records/big/"):
        size = int(request.path.rsplit("/", 1)[1])
        response = web.StreamResponse()
        await response.prepare(request)
        chunk = b"x" * 65536
        left = size
        while left > 0:
            await response.write(chunk[: min(left, len(chunk))])
            left -= len(chunk)
        await response.write_eof()
        return response
    received = 0
    async for data in request.content.iter_any():
        received += len(data)
    body = {
        "method": request.method,
        "path": request.raw_path.split("?", 1)[0],
        "query": request.raw_path.partition("?")[2],
        "peer_port": request.transport.get_extra_info("peername")[1],
        "headers": {k.lower(): v for k, v in request.headers.items()},
        "body_bytes": received,
    }
    return web.json_response(body, headers={"X-Upstream": "yes"})


@contextlib.asynccontextmanager
async def upstream_server() -> AsyncIterator[int]:
    """The echoing upstream, on a loopback port of its own; yields the port."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", _echo)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = listening_socket()
    site = web.SockSite(runner, sock)
    await site.start()
    try:
        yield port_of(sock)
    finally:
        await runner.cleanup()
        sock.close()


@contextlib.asynccontextmanager
async def uvicorn_server(app: object) -> AsyncIterator[int]:
    """``app`` served by uvicorn on a loopback port of its own; yields the port."""
    sock = listening_socket()
    server = uvicorn.Server(uvicorn.Config(app, log_level="error", lifespan="off"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    for _ in range(200):
        if server.started:
            break
        await asyncio.sleep(0.02)
    try:
        yield port_of(sock)
    finally:
        server.should_exit = True
        await task
        sock.close()


def body_json(response) -> dict:
    return json.loads(response.content)
