"""Run a tokenward server for a benchmark, with the audit writer on or off.

``python bench/audit_serve.py DATA_DIR PORT on|off``. "off" unsubscribes the audit writer from
the event bus (nothing else changes), which is the baseline the audit cost is measured from.
"""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import uvicorn

from tokenward.app import create_asgi, open_services
from tokenward.settings import Settings


class _App:
    def __init__(self, settings: Settings, audit: bool) -> None:
        self.settings = settings
        self.audit = audit
        self.app = None

    async def __call__(self, scope, receive, send):  # type: ignore[no-untyped-def]
        if self.app is None:
            services = await open_services(self.settings)
            if not self.audit:
                services.events.subscribers.remove(services.audit)
            self.app = create_asgi(services=services)
            self.services = services
        if scope["type"] == "lifespan":
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            message = await receive()
            await self.services.close()
            await send({"type": "lifespan.shutdown.complete"})
            return
        await self.app(scope, receive, send)


def main() -> None:
    data_dir, port, audit = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "on"
    settings = Settings.load(data_dir=data_dir, access_log=False)
    gc.freeze()  # as 'tokenward serve' does
    gc.set_threshold(10_000, 20, 20)
    uvicorn.run(
        _App(settings, audit),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="on",
    )


if __name__ == "__main__":
    main()
