"""The rotation scheduler runs by itself inside a real server."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.webhook_receiver import Receiver


@pytest.fixture
def live_overrides():
    return {"rotation_interval": 0.2}


async def test_server_rotates_due_tokens_by_itself(live):
    receiver = Receiver()
    try:
        key = live.admin.create_token(project="shop", scopes=["records:read"], ttl="1d")
        # Period 1 minute, grace 59 s: the first rotation is due a second after creation.
        live.admin.set_rotation(key["id"], period="1m", grace="59s", webhook_url=receiver.url)
        deadline = time.monotonic() + 15
        while not receiver.received and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert receiver.received, "the scheduler did not rotate the token"
        delivered = receiver.received[0]["body"]["data"]
        assert delivered["previous_id"] == key["id"]
        assert live.admin.verify(delivered["token"])["valid"]
        assert live.admin.verify(key["token"])["valid"]  # in its grace window
        assert live.admin.get_token(key["id"])["replaced_by"] == delivered["token_id"]
    finally:
        receiver.close()
