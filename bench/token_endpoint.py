"""Token endpoint throughput: exchanges and refreshes per second, against plain minting.

    .venv/bin/python bench/token_endpoint.py [count]

In-process (SQLite in a temp dir, no HTTP): ``TokenService.create_token`` alone is the
baseline (one insert); an exchange verifies the API key and mints an access and a refresh
token; a refresh looks up the refresh token, rotates it and mints an access token.
"""

from __future__ import annotations

import asyncio
import secrets
import sys
import tempfile
import time
from pathlib import Path

from tokenward.app import open_services
from tokenward.oauth.exchange import GRANT_EXCHANGE, GRANT_REFRESH, TYPE_ACCESS, TokenRequest
from tokenward.service import TokenSpec, issue_bootstrap_record
from tokenward.settings import Settings


async def main(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(data_dir=Path(tmp), secret_key=secrets.token_hex(32))
        services = await open_services(settings)
        try:
            admin = issue_bootstrap_record(services.hasher, services.verifier.clock())
            await services.store.insert_token(admin.record, services.hasher.hash(admin.secret))
            await services.tokens.create_project(admin.record, "bench")
            spec = TokenSpec(project="bench", scopes=["records:*"])
            key = await services.tokens.create_token(admin.record, spec)
            assert services.sessions is not None
            exchange = services.sessions.exchange

            started = time.perf_counter()
            for _ in range(n):
                await services.tokens.create_token(admin.record, spec)
            mint_rate = n / (time.perf_counter() - started)

            refresh_tokens = []
            started = time.perf_counter()
            for _ in range(n):
                request = TokenRequest(GRANT_EXCHANGE, key.secret, TYPE_ACCESS)
                response = await exchange.handle(request)
                assert response.refresh is not None
                refresh_tokens.append(response.refresh.secret)
            exchange_rate = n / (time.perf_counter() - started)

            started = time.perf_counter()
            for token in refresh_tokens:
                await exchange.handle(TokenRequest(GRANT_REFRESH, refresh_token=token))
            refresh_rate = n / (time.perf_counter() - started)
        finally:
            await services.close()
    print(f"mint one token (baseline): {mint_rate:8.0f}/s")
    print(f"exchange (API key):        {exchange_rate:8.0f}/s  {exchange_rate / mint_rate:.2f}x")
    print(f"refresh (with rotation):   {refresh_rate:8.0f}/s  {refresh_rate / mint_rate:.2f}x")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 300))
