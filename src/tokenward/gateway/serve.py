"""Running the API and the gateway side by side, in one process and one event loop.

The API is served by uvicorn, the gateway by aiohttp's server, the ``[[postgres]]`` listeners
by :mod:`~tokenward.gateway.postgres`. Both share one set of services
(store, verifier cache, limiter, event bus), so a revocation seen by the API is seen by the
gateway at once. SIGINT/SIGTERM stops both gracefully (a second one forces the API down).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import socket
import ssl
from collections.abc import Coroutine, Generator
from typing import Any

import uvicorn

from tokenward.settings import Settings


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signal handling to :func:`serve_with_gateway`."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def _ssl_context(options: dict[str, Any]) -> ssl.SSLContext | None:
    cert, key = options.get("ssl_certfile"), options.get("ssl_keyfile")
    if not cert or not key:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


async def serve_with_gateway(
    settings: Settings,
    *,
    api_socket: socket.socket | None = None,
    gateway_socket: socket.socket | None = None,
    **uvicorn_options: Any,
) -> None:
    """Serve the API on ``settings.port`` and the gateway on ``settings.gateway_port`` (or on
    sockets the caller bound already: it can then tell a taken port before anything runs)."""
    from tokenward.app import create_asgi, open_services
    from tokenward.gateway.postgres import PostgresGateway
    from tokenward.gateway.proxy import Gateway

    services = await open_services(settings)
    assert services.enforcement is not None
    gateway = Gateway(services.enforcement, services.metrics)
    tls = _ssl_context(uvicorn_options)
    databases = PostgresGateway(
        services.enforcement,
        services.enforcement.policy.postgres,
        tls,
        allow_insecure=settings.allow_insecure_http,
        reuse_port=settings.worker_count > 1,
    )
    api = _Server(
        uvicorn.Config(
            create_asgi(settings, services=services),
            host=settings.host,
            port=settings.port,
            **uvicorn_options,
        )
    )
    stopping = asyncio.Event()
    # Everything built so far lives as long as the process: keep it out of the collector's
    # scans, which otherwise pause the loop in proportion to the heap on every full pass.
    gc.collect()
    gc.freeze()

    def stop() -> None:
        if api.should_exit:
            api.force_exit = True
        api.should_exit = True
        stopping.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
    try:
        await gateway.start(settings.host, settings.gateway_port, tls, sock=gateway_socket)
        await databases.start()
        await api.serve(sockets=[api_socket] if api_socket is not None else None)
        stop()  # the API stopped on its own (e.g. its port was taken): stop the gateway too
        await stopping.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await databases.aclose()
        await gateway.aclose()
        await services.close()


def run(main: Coroutine[Any, Any, None]) -> None:
    """Run ``main`` on uvloop when it is installed (as uvicorn would), else on asyncio."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard]
        asyncio.run(main)
        return
    uvloop.run(main)
