"""A TCP proxy in front of PostgreSQL that a test can freeze or make refuse connections.

``freeze()`` keeps every connection open but forwards nothing more, in either direction,
and accepts new connections without forwarding them: a database behind a silent network
(the failure nobody answers). ``refuse()`` closes every connection and refuses new ones.
``restore()`` forwards again (new connections only; frozen ones stay dead).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading


class FaultProxy:
    def __init__(self, target_host: str = "127.0.0.1", target_port: int = 5432) -> None:
        self.target = (target_host, target_port)
        self.mode = "forward"  # forward | freeze | refuse
        self.loop = asyncio.new_event_loop()
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.base_events.Server | None = None
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = int(sock.getsockname()[1])
        self._sock = sock
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._client, sock=self._sock)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        if self.mode == "refuse":
            writer.close()
            return
        if self.mode == "freeze":
            return  # accepted, never answered
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers.add(up_writer)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    while self.mode == "freeze":
                        await asyncio.sleep(0.05)
                    if self.mode == "refuse":
                        break
                    dst.write(data)
                    await dst.drain()
            if self.mode != "freeze":
                with contextlib.suppress(Exception):
                    dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def url(self, database_url: str) -> str:
        from sqlalchemy.engine import make_url

        return (
            make_url(database_url)
            .set(host="127.0.0.1", port=self.port)
            .render_as_string(hide_password=False)
        )

    def _set(self, mode: str) -> None:
        def apply() -> None:
            self.mode = mode
            if mode == "refuse":
                for w in list(self._writers):
                    w.close()
                self._writers.clear()

        self.loop.call_soon_threadsafe(apply)

    def freeze(self) -> None:
        self._set("freeze")

    def refuse(self) -> None:
        self._set("refuse")

    def restore(self) -> None:
        self._set("forward")

    def close(self) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()
            for w in list(self._writers):
                w.close()
            others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        self.loop.close()
