"""The built-in gateway's tests run on asyncio's loop and on uvloop (what ``tokenward serve``
runs): the two loops' transports differ in ways a protocol class can trip over."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping

import pytest
import uvloop

from tests.gateway.support import upstream_server

_ON_BOTH_LOOPS = ("test_proxy.py", "test_upstream.py", "test_postgres.py")


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    if item.path.name in _ON_BOTH_LOOPS:
        return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}


@pytest.fixture
async def backend_port() -> AsyncIterator[int]:
    """The echoing upstream of :mod:`tests.gateway.support`, on a port of its own."""
    async with upstream_server() as port:
        yield port
