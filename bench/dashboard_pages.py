"""How fast the dashboard's pages render with a realistic amount of data (SQLite, in process).

    .venv/bin/python bench/dashboard_pages.py [tokens] [decisions] [requests-per-page]

Prints p50/p95 latency per page and, as the baseline, the JSON admin API listing the same
tokens (``GET /v1/tokens?limit=1000``): the ratio is what server-side rendering, charts and
the audit queries cost on top of reading the tokens.
"""

from __future__ import annotations

import asyncio
import secrets
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tokenward.app import create_app, open_services
from tokenward.dashboard.accounts import Role
from tokenward.service import TokenSpec, issue_bootstrap_record
from tokenward.settings import Settings


async def main(n_tokens: int, n_decisions: int, n_requests: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(
            data_dir=Path(tmp),
            secret_key=secrets.token_hex(32),
            anomaly_enabled=False,
            access_log=False,
        )
        services = await open_services(settings)
        app = create_app(services=services)
        admin = issue_bootstrap_record(services.hasher, services.verifier.clock())
        await services.store.insert_token(admin.record, services.hasher.hash(admin.secret))
        await services.tokens.create_project(admin.record, "shop")
        secrets_ = []
        for i in range(n_tokens):
            issued = await services.tokens.create_token(
                admin.record, TokenSpec(project="shop", scopes=["records:read"], name=f"t{i}")
            )
            secrets_.append(issued.secret)
        from tokenward.events import AccessEvent

        for i in range(n_decisions):
            decision = await services.verifier.verify(secrets_[i % 20], scope="records:read")
            await services.events.access(
                AccessEvent(services.verifier.clock(), "verify_api", decision, f"req_{i}")
            )
        if services.audit is not None:
            await services.audit.flush()
        accounts = app.state.dashboard.accounts
        user, _ = await accounts.create_user("owner", Role.OWNER)
        session_id = await accounts.open_session(user, "127.0.0.1", "bench")
        session = await accounts.load_session(session_id)
        session_id = await accounts.complete_mfa(session)
        token_id = (
            await services.store.list_tokens(
                project_ids=None, state=None, now=services.verifier.clock(), limit=2
            )
        )[1].id
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 1))
        pages = {
            "baseline: GET /v1/tokens (JSON)": "/v1/tokens?limit=1000",
            "overview": "/dashboard/",
            "tokens list (filtered)": "/dashboard/p/shop/tokens?q=t1",
            "token detail": f"/dashboard/p/shop/tokens/{token_id}",
            "audit log": "/dashboard/audit",
        }
        async with httpx.AsyncClient(transport=transport, base_url="https://tw.bench") as c:
            c.cookies.set("tw_session", session_id, domain="tw.bench", path="/dashboard")
            c.headers["Authorization"] = f"Bearer {admin.secret}"
            results = {}
            for name, path in pages.items():
                assert (await c.get(path)).status_code == 200, path
                times = []
                for _ in range(n_requests):
                    t = time.perf_counter()
                    response = await c.get(path)
                    times.append((time.perf_counter() - t) * 1000)
                    assert response.status_code == 200
                times.sort()
                results[name] = (statistics.median(times), times[int(len(times) * 0.95) - 1])
        base = results["baseline: GET /v1/tokens (JSON)"][0]
        print(f"{n_tokens} tokens, {n_decisions} audited decisions, {n_requests} requests/page")
        for name, (p50, p95) in results.items():
            print(f"  {name:34s} p50 {p50:7.1f} ms  p95 {p95:7.1f} ms  x{p50 / base:4.1f}")
        await services.close()


if __name__ == "__main__":
    args = [int(a) for a in sys.argv[1:]] + [1000, 500, 30][len(sys.argv) - 1 :]
    asyncio.run(main(*args[:3]))
