"""How fast the token search answers on a large project (SQLite and PostgreSQL).

    .venv/bin/python bench/token_search.py [tokens] [database-url]

Loads ``tokens`` tokens (default 100,000) into one project of a fresh database (bulk rows,
not the service: the load is not what is measured), then times ``TokenService.search_tokens``
(what ``GET /v1/tokens`` runs) for each filter, first page and a deep page (by cursor), and
prints p50/p95 in ms. Without a database URL: a SQLite file in a temporary directory.
"""

from __future__ import annotations

import asyncio
import secrets
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from tokenward.app import open_services
from tokenward.service import issue_bootstrap_record
from tokenward.settings import Settings
from tokenward.store.repository import TokenQuery
from tokenward.store.tables import tokens

ROUNDS = 30


def rows(project_id: str, n: int, now: datetime) -> list[dict[str, object]]:
    out = []
    for i in range(n):
        out.append(
            {
                "id": f"tok_{i:016d}",
                "project_id": project_id,
                "environment": "test" if i % 10 == 0 else "live",
                "name": f"{['billing', 'search', 'mail', 'batch'][i % 4]}-{i}",
                "kind": "canary" if i % 1000 == 0 else "api_key",
                "principal": f"svc-{i % 500}",
                "scopes": ["records:read"],
                "token_hash": secrets.token_hex(32),
                "key_id": "k1",
                "hint": "tw_live_…abcd",
                "created_at": now - timedelta(seconds=n - i),
                "expires_at": now + timedelta(days=i % 400) if i % 3 else None,
                "ip_allowlist": [],
                "metadata": {"team": f"t{i % 50}"},
                "last_used_at": now - timedelta(days=i % 200) if i % 2 else None,
            }
        )
    return out


async def main(n: int, database_url: str | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        extra = {"database_url": database_url} if database_url else {}
        settings = Settings(
            data_dir=Path(tmp),
            secret_key=secrets.token_hex(32),
            anomaly_enabled=False,
            access_log=False,
            **extra,
        )
        services = await open_services(settings)
        try:
            admin = issue_bootstrap_record(services.hasher, services.verifier.clock())
            await services.store.insert_token(admin.record, services.hasher.hash(admin.secret))
            name = f"bench{secrets.token_hex(3)}"
            project = await services.tokens.create_project(admin.record, name)
            now = datetime.now(UTC)
            batch = rows(project.id, n, now)
            for start in range(0, n, 5000):
                async with services.engine.begin() as conn:
                    await conn.execute(tokens.insert(), batch[start : start + 5000])
            if services.engine.dialect.name == "postgresql":
                async with services.engine.begin() as conn:
                    await conn.exec_driver_sql("ANALYZE tokens")
            searches = {
                "newest 100": TokenQuery(),
                "name prefix": TokenQuery(name_prefix="billing-1"),
                "principal": TokenQuery(principal="svc-42"),
                "metadata team=t7": TokenQuery(metadata={"team": "t7"}),
                "state active": TokenQuery(state="active"),
                "kind canary": TokenQuery(kind="canary"),
                "expires within 7d": TokenQuery(expires_before=now + timedelta(days=7)),
                "unused 180d": TokenQuery(last_used_before=now - timedelta(days=180)),
            }
            service = services.tokens
            print(f"{services.engine.dialect.name}, {n:,} tokens in one project")
            print(f"{'search':<22}{'page 1 p50':>12}{'p95':>8}{'page 20 p50':>13}{'p95':>8}")
            for label, query in searches.items():
                figures = []
                for deep in (False, True):
                    times = []
                    for _ in range(ROUNDS):
                        started = time.perf_counter()
                        page = await service.search_tokens(admin.record, query, project=name)
                        for _ in range(19 if deep else 0):
                            if page.next_cursor is None:
                                break
                            page = await service.search_tokens(
                                admin.record, query, project=name, cursor=page.next_cursor
                            )
                        elapsed = time.perf_counter() - started
                        times.append(elapsed / (20 if deep else 1) * 1000)
                    times.sort()
                    figures += [statistics.median(times), times[int(len(times) * 0.95) - 1]]
                print(f"{label:<22}" + "".join(f"{f:>10.1f}ms" for f in figures))
        finally:
            await services.close()


if __name__ == "__main__":
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    asyncio.run(main(count, sys.argv[2] if len(sys.argv) > 2 else None))
