"""Running the API and the gateway side by side: two uvicorn servers, one process.

Both share one set of services (store, verifier cache, limiter, event bus), so a revocation
seen by the API is seen by the gateway at once. One SIGINT/SIGTERM stops both gracefully.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Generator
from typing import Any

import uvicorn

from tokenward.settings import Settings


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signal handling to :func:`serve_with_gateway`."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


async def serve_with_gateway(settings: Settings, **uvicorn_options: Any) -> None:
    """Serve the API on ``settings.port`` and the gateway on ``settings.gateway_port``."""
    from tokenward.app import create_asgi, open_services
    from tokenward.gateway.proxy import Gateway

    services = await open_services(settings)
    assert services.enforcement is not None
    gateway = Gateway(services.enforcement)
    servers = [
        _Server(
            uvicorn.Config(
                create_asgi(settings, services=services),
                host=settings.host,
                port=settings.port,
                **uvicorn_options,
            )
        ),
        _Server(
            uvicorn.Config(
                gateway, host=settings.host, port=settings.gateway_port, **uvicorn_options
            )
        ),
    ]

    def stop() -> None:
        for server in servers:
            if server.should_exit:
                server.force_exit = True
            server.should_exit = True

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
    try:
        await asyncio.gather(*(server.serve() for server in servers))
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await gateway.aclose()
        await services.close()
