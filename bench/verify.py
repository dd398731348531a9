"""In-process verification speed, side by side with the floor, in one run.

    .venv/bin/python bench/verify.py [--n 20000]

* floor: HMAC-SHA256 of the token + dict lookup + expiry and scope checks (what any verifier
  must at least do);
* cache hit: `Verifier.verify` with the token's state cached;
* cache miss on SQLite and on PostgreSQL (cache TTL 0: every call reads the store);
* cache miss on PostgreSQL with 32 verifications at once (as 32 client connections make
  them): CPU µs per verification (this process's, all threads) and the PostgreSQL sessions
  opened per 1,000 verifications at steady state (``pg_stat_database.sessions``). Targets:
  <= 500 µs of CPU, no new session per request.

PostgreSQL is the server named by TOKENWARD_BENCH_PG_URL (default: the local test server); a
scratch database is created and dropped.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import os
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from sqlalchemy.engine import make_url

from tokenward.app import Services, open_services
from tokenward.service import TokenSpec, issue_bootstrap_record
from tokenward.settings import Settings
from tokenward.tokens.format import generate_token

PG_URL = os.environ.get(
    "TOKENWARD_BENCH_PG_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)


def summarize(name: str, samples_ns: list[int], total_s: float) -> dict[str, float]:
    samples_ns.sort()
    n = len(samples_ns)
    return {
        "name": name,  # type: ignore[dict-item]
        "ops": n / total_s,
        "p50": samples_ns[n // 2] / 1000,
        "p99": samples_ns[int(n * 0.99)] / 1000,
        "mean": statistics.fmean(samples_ns) / 1000,
    }


def floor(n: int) -> dict[str, float]:
    key = secrets.token_bytes(32)
    token = generate_token("live")
    table = {
        hmac.new(key, token.encode(), hashlib.sha256).hexdigest(): (
            datetime.now(UTC) + timedelta(days=1),
            ("records:read",),
        )
    }
    samples = []
    start = time.perf_counter()
    for _ in range(n):
        t0 = time.perf_counter_ns()
        h = hmac.new(key, token.encode(), hashlib.sha256).hexdigest()
        expires, scopes = table[h]
        ok = datetime.now(UTC) < expires and "records:read" in scopes
        samples.append(time.perf_counter_ns() - t0)
        assert ok
    return summarize("floor (hmac + dict + checks)", samples, time.perf_counter() - start)


async def timed(name: str, n: int, fn: Callable[[], Awaitable[bool]]) -> dict[str, float]:
    for _ in range(min(200, n)):
        assert await fn()
    samples = []
    start = time.perf_counter()
    for _ in range(n):
        t0 = time.perf_counter_ns()
        ok = await fn()
        samples.append(time.perf_counter_ns() - t0)
        assert ok
    return summarize(name, samples, time.perf_counter() - start)


async def prepare(settings: Settings) -> tuple[Services, str]:
    services = await open_services(settings)
    admin = issue_bootstrap_record(services.hasher, services.verifier.clock())
    await services.store.insert_token(admin.record, services.hasher.hash(admin.secret))
    await services.tokens.create_project(admin.record, "bench")
    issued = await services.tokens.create_token(
        admin.record, TokenSpec(project="bench", scopes=["records:*"], ttl=timedelta(days=1))
    )
    return services, issued.secret


async def pg_exec(statement: str) -> None:
    await pg_value(statement)


async def pg_value(statement: str) -> object:
    import asyncpg

    u = make_url(PG_URL)
    conn = await asyncpg.connect(
        host=u.host, port=u.port or 5432, user=u.username, password=u.password, database=u.database
    )
    try:
        return await conn.fetchval(statement)
    finally:
        await conn.close()


async def concurrent_misses(
    db: str, n: int, verify: Callable[[], Awaitable[bool]], at_once: int = 32
) -> tuple[float, float]:
    """CPU µs per verification and sessions opened per 1,000, ``at_once`` in flight."""
    sessions = f"SELECT sessions FROM pg_stat_database WHERE datname = '{db}'"

    async def worker(count: int) -> None:
        for _ in range(count):
            assert await verify()

    await asyncio.gather(*(worker(50) for _ in range(at_once)))  # warm: the pool fills
    await asyncio.sleep(1.5)
    opened = int(await pg_value(sessions))  # type: ignore[call-overload]
    cpu = time.process_time()
    await asyncio.gather(*(worker(n // at_once) for _ in range(at_once)))
    cpu = time.process_time() - cpu
    done = (n // at_once) * at_once
    await asyncio.sleep(1.5)  # the server's statistics are flushed about once a second
    opened = int(await pg_value(sessions)) - opened  # type: ignore[call-overload]
    return cpu * 1e6 / done, opened * 1000 / done


async def main(n: int) -> None:
    rows = [floor(n * 5)]
    miss_cpu: float | None = None
    miss_sessions = 0.0
    key = secrets.token_hex(32)
    with tempfile.TemporaryDirectory() as tmp:
        base = Settings(data_dir=Path(tmp), secret_key=key)
        services, secret = await prepare(base)
        verify = services.verifier.verify
        rows.append(
            await timed(
                "verify, cache hit", n * 5, lambda: _ok(verify(secret, scope="records:read"))
            )
        )
        services.verifier.cache_ttl = 0
        services.verifier.clear()
        rows.append(
            await timed(
                "verify, cache miss, SQLite", n, lambda: _ok(verify(secret, scope="records:read"))
            )
        )
        await services.close()

        db = f"tw_bench_{secrets.token_hex(3)}"
        try:
            await pg_exec(f'CREATE DATABASE "{db}"')
            url = make_url(PG_URL).set(database=db).render_as_string(hide_password=False)
            services, secret = await prepare(base.model_copy(update={"database_url": url}))
            services.verifier.cache_ttl = 0
            verify = services.verifier.verify
            rows.append(
                await timed(
                    "verify, cache miss, PostgreSQL",
                    n,
                    lambda: _ok(verify(secret, scope="records:read")),
                )
            )
            miss_cpu, miss_sessions = await concurrent_misses(
                db, n, lambda: _ok(verify(secret, scope="records:read"))
            )
            await services.close()
        except OSError as exc:
            print(f"(PostgreSQL skipped: {exc})", file=sys.stderr)
        finally:
            await pg_exec(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')

    base_ops = rows[0]["ops"]
    print(f"{'case':34} {'verifications/s':>16} {'p50 us':>8} {'p99 us':>8} {'vs floor':>9}")
    for row in rows:
        print(
            f"{row['name']:34} {row['ops']:16,.0f} {row['p50']:8.1f} {row['p99']:8.1f} "
            f"{row['p50'] / rows[0]['p50']:8.1f}x"
        )
    if miss_cpu is not None:
        print(
            f"\ncache miss, PostgreSQL, 32 at once: {miss_cpu:.0f} CPU µs per verification"
            f" (target <= 500), {miss_sessions:.1f} sessions opened per 1,000 (target 0)"
        )
    hit = rows[1]
    print(
        f"\ncache hit p50 is {hit['p50'] / rows[0]['p50']:.1f}x the floor's p50 "
        f"(target <= 3x); throughput {hit['ops'] / base_ops:.2f}x the floor's"
    )


async def _ok(awaitable: Awaitable[object]) -> bool:
    decision = await awaitable
    return bool(decision.allowed)  # type: ignore[attr-defined]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=20000, help="calls per store-backed case")
    asyncio.run(main(parser.parse_args().n))
