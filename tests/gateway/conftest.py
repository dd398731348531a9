"""The built-in gateway's tests run on asyncio's loop and on uvloop (what ``tokenward serve``
runs): the two loops' transports differ in ways a protocol class can trip over."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

import pytest
import uvloop

_ON_BOTH_LOOPS = ("test_proxy.py", "test_upstream.py", "test_postgres.py")


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    if item.path.name in _ON_BOTH_LOOPS:
        return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}
