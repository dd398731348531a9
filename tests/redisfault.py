"""A redis-server of a test's own, on a unix socket: to freeze (SIGSTOP), thaw and stop.

A unix socket in the test's temporary directory needs no port, so two tests (or two
engineers' suites) never race for one; the shared Redis is never touched.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

needs_redis_server = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="no redis-server"
)


class SocketRedis:
    """``redis-server --port 0 --unixsocket <dir>/redis.sock``: no TCP listener at all."""

    def __init__(self, directory: Path) -> None:
        # a unix socket path is limited to ~100 bytes: keep it short when the directory is deep
        self.path = directory / "redis.sock"
        if len(str(self.path)) > 100:
            import tempfile

            self.path = Path(tempfile.mkdtemp(prefix="twr")) / "redis.sock"
        self.url = f"unix://{self.path}?db=0"
        self.process: subprocess.Popen[bytes] | None = None
        self.frozen = False

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                "redis-server",
                "--port",
                "0",
                "--unixsocket",
                str(self.path),
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}")
            with socket.socket(socket.AF_UNIX) as s:
                if s.connect_ex(str(self.path)) == 0:
                    return
            time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def freeze(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        if self.process is not None and self.frozen:
            os.kill(self.process.pid, signal.SIGCONT)
            self.frozen = False

    def stop(self) -> None:
        if self.process is None:
            return
        self.thaw()
        self.process.kill()
        self.process.wait()
        self.process = None


@pytest.fixture
def socket_redis(tmp_path: Path) -> Iterator[SocketRedis]:
    server = SocketRedis(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()
