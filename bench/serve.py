"""The server the benchmarks measure: tokenward as `tokenward serve` runs it, one process.

``python bench/serve.py api|gateway PORT TOKEN_FILE``: makes a project and a token with
``records:read`` (rate limit from BENCH_RATE, if set), writes the token to TOKEN_FILE (mode
0600, deleted with the bench's temp dir) and serves:

* ``api``: the API app with ``/authz``, and ``/bare``, a 200 answered by a plain ASGI
  function in front of it, on the same uvicorn (the "bare endpoint, same stack" baseline);
* ``gateway``: the built-in gateway (as ``tokenward serve --config`` runs it, on uvloop).

The admin credential goes to TOKEN_FILE with the suffix ``.admin`` (for ``POST /v1/verify``).
``BENCH_AUDIT=off`` takes the audit writer off the event bus: a diagnostic only (it breaks
the rule that every decision is logged), to measure what the rest of a decision costs.
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
from pathlib import Path
from typing import Any

import uvicorn

from tokenward.app import create_asgi, open_services
from tokenward.gateway.proxy import Gateway
from tokenward.server import uvicorn_options
from tokenward.service import TokenSpec, issue_bootstrap_record
from tokenward.settings import Settings


def bare(app: Any) -> Any:
    async def asgi(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == "/bare":
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-length", b"3")],
                }
            )
            await send({"type": "http.response.body", "body": b"ok\n"})
            return
        await app(scope, receive, send)

    return asgi


async def main(mode: str, port: int, token_file: Path) -> None:
    settings = Settings.load()
    services = await open_services(settings)
    admin = issue_bootstrap_record(services.hasher, services.verifier.clock())
    await services.store.insert_token(admin.record, services.hasher.hash(admin.secret))
    await services.tokens.create_project(admin.record, "bench")
    rate = os.environ.get("BENCH_RATE")
    issued = await services.tokens.create_token(
        admin.record,
        TokenSpec(project="bench", scopes=["records:read"], rate_limit=[rate] if rate else []),
    )
    secrets = ((token_file.with_suffix(".admin"), admin.secret), (token_file, issued.secret))
    for path, secret in secrets:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secret)
    if os.environ.get("BENCH_AUDIT") == "off" and services.audit is not None:
        services.events.subscribers.remove(services.audit)
    assert services.enforcement is not None
    gc.collect()
    gc.freeze()  # as `tokenward serve --config` does
    gc.set_threshold(10_000, 20, 20)
    if mode == "gateway":
        gateway = Gateway(services.enforcement)
        gateway.metrics = services.metrics  # as serve runs it
        await gateway.start("127.0.0.1", port)
        try:
            await asyncio.Event().wait()  # until terminated
        finally:
            await gateway.aclose()
            await services.close()
        return
    config = uvicorn.Config(
        bare(create_asgi(settings, services=services)),
        host="127.0.0.1",
        port=port,
        **uvicorn_options(),  # as `tokenward serve` runs it
    )
    try:
        await uvicorn.Server(config).serve()
    finally:
        await services.close()


if __name__ == "__main__":
    import signal

    import uvloop

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    uvloop.run(main(sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])))
