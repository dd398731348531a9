"""What DPoP costs on the hot path: verifying a Bearer access token vs a DPoP-bound one.

    .venv/bin/python bench/dpop_verify.py [iterations]

In-process ``Verifier.verify`` on a cached token (SQLite, in-memory replay cache). Proofs are
made before the clock starts, so only the server-side work is measured: proof signature
check (ES256), claims, ``ath``, replay-cache insert. Prints verifications per second.
"""

from __future__ import annotations

import asyncio
import secrets
import sys
import tempfile
import time
from pathlib import Path

from joserfc.jwk import ECKey

from tokenward.app import open_services
from tokenward.oauth.dpop import DPoPRequest, make_proof
from tokenward.oauth.exchange import GRANT_EXCHANGE, TYPE_ACCESS, TokenRequest
from tokenward.service import TokenSpec, issue_bootstrap_record
from tokenward.settings import Settings

URL = "https://api.example.com/records"


async def main(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(data_dir=Path(tmp), secret_key=secrets.token_hex(32))
        services = await open_services(settings)
        try:
            admin = issue_bootstrap_record(services.hasher, services.verifier.clock())
            await services.store.insert_token(admin.record, services.hasher.hash(admin.secret))
            await services.tokens.create_project(admin.record, "bench")
            key = await services.tokens.create_token(
                admin.record, TokenSpec(project="bench", scopes=["records:*"])
            )
            assert services.sessions is not None
            exchange = services.sessions.exchange

            async def access(dpop: DPoPRequest | None) -> str:
                request = TokenRequest(
                    GRANT_EXCHANGE, key.secret, TYPE_ACCESS, dpop=dpop, client_ip="127.0.0.1"
                )
                return (await exchange.handle(request)).access.secret

            bearer = await access(None)
            client_key = ECKey.generate_key("P-256")
            bound = await access(DPoPRequest(make_proof(client_key, "POST", URL), "POST", URL))
            verify = services.verifier.verify
            await verify(bearer)
            started = time.perf_counter()
            for _ in range(n):
                assert (await verify(bearer, scope="records:read")).allowed
            bearer_rate = n / (time.perf_counter() - started)

            proofs = [make_proof(client_key, "GET", URL, access_token=bound) for _ in range(n)]
            started = time.perf_counter()
            for proof in proofs:
                decision = await verify(
                    bound, scope="records:read", dpop=DPoPRequest(proof, "GET", URL)
                )
                assert decision.allowed
            dpop_rate = n / (time.perf_counter() - started)
        finally:
            await services.close()
    print(f"Bearer access token: {bearer_rate:9.0f} verifications/s")
    print(f"DPoP-bound token:    {dpop_rate:9.0f} verifications/s")
    print(f"DPoP / Bearer:       {dpop_rate / bearer_rate:9.2f}x")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 2000))
