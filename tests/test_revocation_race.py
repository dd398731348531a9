"""Invariant 2: a change to a token wins over any store read that started before it.

A read in flight when a revocation lands (on the revoking replica, or through the fan-out
message on another) must not put the pre-revoke state in the cache. Each test holds a real
store read open across the revoke, or races many of them, and asserts that no replica
answers ``ok`` once the revoke has returned (and the fan-out message has arrived).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REDIS_URL, truncate_all
from tokenward.app import Services, open_services
from tokenward.service import Issued, TokenSpec, issue_bootstrap_record
from tokenward.settings import Settings
from tokenward.tokens.model import Reason


async def _admin(services: Services) -> Issued:
    admin = issue_bootstrap_record(services.hasher, services.verifier.clock())
    await services.store.insert_token(admin.record, services.hasher.hash(admin.secret))
    await services.tokens.create_project(admin.record, "app")
    return admin


class HeldRead:
    """Makes a replica's next token lookup read the store, then wait before returning."""

    def __init__(self, services: Services) -> None:
        self.read_done = asyncio.Event()
        self.release = asyncio.Event()
        store = services.store
        real = store.find_by_hash

        async def held(hashes: Any) -> Any:
            found = await real(hashes)
            store.find_by_hash = real  # type: ignore[method-assign]
            self.read_done.set()
            await self.release.wait()
            return found

        store.find_by_hash = held  # type: ignore[method-assign]


class InvalidationSeen:
    """Notes when a replica's verifier is told a token changed (locally or by fan-out)."""

    def __init__(self, services: Services) -> None:
        self.ids: set[str] = set()
        self.event = asyncio.Event()
        verifier = services.verifier
        real = verifier.invalidate

        def seen(token_id: str) -> None:
            real(token_id)
            self.ids.add(token_id)
            self.event.set()

        verifier.invalidate = seen  # type: ignore[method-assign]

    async def wait_for(self, token_id: str, timeout: float = 2.0) -> None:
        async with asyncio.timeout(timeout):
            while token_id not in self.ids:
                self.event.clear()
                await self.event.wait()


async def test_a_read_in_flight_during_the_revoke_is_not_cached(services: Services) -> None:
    services.verifier.cache_ttl = 300.0
    admin = await _admin(services)
    issued = await services.tokens.create_token(
        admin.record, TokenSpec(project="app", scopes=["x:y"])
    )

    held = HeldRead(services)
    in_flight = asyncio.create_task(services.verifier.verify(issued.secret))
    await held.read_done.wait()  # the store answered with the token still active
    await services.tokens.revoke_token(admin.record, issued.record.id, "leaked")
    held.release.set()
    await in_flight  # started before the revoke: either answer is fair for it

    decision = await services.verifier.verify(issued.secret)
    assert decision.reason is Reason.REVOKED


async def test_a_request_that_joins_a_read_in_flight_after_the_revoke_sees_it(
    services: Services,
) -> None:
    services.verifier.cache_ttl = 300.0
    admin = await _admin(services)
    issued = await services.tokens.create_token(
        admin.record, TokenSpec(project="app", scopes=["x:y"])
    )

    held = HeldRead(services)
    first = asyncio.create_task(services.verifier.verify(issued.secret))
    await held.read_done.wait()
    await services.tokens.revoke_token(admin.record, issued.record.id, "leaked")
    # Arrives after the revoke returned, while the first lookup is still open: it waits for
    # that lookup instead of reading the store itself, and must not get its stale answer.
    late = asyncio.create_task(services.verifier.verify(issued.secret))
    await asyncio.sleep(0)
    held.release.set()
    await first
    assert (await late).reason is Reason.REVOKED


async def test_a_project_change_wins_over_a_read_in_flight(services: Services) -> None:
    """Project settings (here its IP allowlist) invalidate by project, not by token."""
    services.verifier.cache_ttl = 300.0
    admin = await _admin(services)
    issued = await services.tokens.create_token(
        admin.record, TokenSpec(project="app", scopes=["x:y"])
    )

    held = HeldRead(services)
    in_flight = asyncio.create_task(services.verifier.verify(issued.secret, ip="192.0.2.7"))
    await held.read_done.wait()
    await services.tokens.set_project_ip_allowlist(admin.record, "app", ["10.0.0.0/8"])
    held.release.set()
    await in_flight

    decision = await services.verifier.verify(issued.secret, ip="192.0.2.7")
    assert decision.reason is Reason.IP_NOT_ALLOWED


async def test_reenabling_the_cache_forgets_what_was_filled_while_it_was_off(
    services: Services,
) -> None:
    """While unsubscribed a replica may miss invalidations: nothing read then is served
    from the cache once it is subscribed again."""
    services.verifier.cache_ttl = 300.0
    admin = await _admin(services)
    issued = await services.tokens.create_token(
        admin.record, TokenSpec(project="app", scopes=["x:y"])
    )
    services.verifier.cache_enabled = False
    assert (await services.verifier.verify(issued.secret)).allowed
    # Revoked behind this replica's back (another replica; the message was missed).
    await services.store.revoke(issued.record.id, "leaked", services.tokens.now)
    services.verifier.cache_enabled = True
    assert (await services.verifier.verify(issued.secret)).reason is Reason.REVOKED


@contextlib.asynccontextmanager
async def _replicas(settings: Settings, count: int) -> AsyncIterator[list[Services]]:
    first = await open_services(settings)
    await truncate_all(first)
    replicas = [first]
    try:
        for _ in range(count - 1):
            replicas.append(await open_services(settings))
        for replica in replicas:
            await asyncio.wait_for(replica.fanout.subscribed.wait(), 5.0)
        yield replicas
    finally:
        for replica in replicas:
            await replica.close()


@pytest.fixture(params=["redis", "postgres-notify"])
def scaled_settings(request: pytest.FixtureRequest, pg_database: str, tmp_path: Path) -> Settings:
    """Replicas share a PostgreSQL database (SQLite is one process's store) and fan out
    through Redis or PostgreSQL NOTIFY; the cache TTL is far above any propagation bound."""
    return Settings(
        data_dir=tmp_path,
        database_url=pg_database,
        secret_key=secrets.token_hex(32),
        cache_ttl=300.0,
        redis_url=REDIS_URL if request.param == "redis" else None,
    )


async def test_a_read_in_flight_on_another_replica_loses_to_the_fanout(scaled_settings) -> None:
    async with _replicas(scaled_settings, 2) as (a, b):
        admin = await _admin(a)
        issued = await a.tokens.create_token(admin.record, TokenSpec(project="app", scopes=["x:y"]))
        seen = InvalidationSeen(b)

        held = HeldRead(b)
        in_flight = asyncio.create_task(b.verifier.verify(issued.secret))
        await held.read_done.wait()
        await a.tokens.revoke_token(admin.record, issued.record.id, "leaked")
        await seen.wait_for(issued.record.id)  # B got the fan-out message mid-read
        held.release.set()
        await in_flight

        assert (await b.verifier.verify(issued.secret)).reason is Reason.REVOKED


class JitteredReads:
    """Every lookup of a replica returns 0-4 ms after the store answered, so reads that
    started before a revoke often finish after it, as they do under load."""

    def __init__(self, services: Services, rng: random.Random) -> None:
        real = services.store.find_by_hash

        async def jittered(hashes: Any) -> Any:
            found = await real(hashes)
            await asyncio.sleep(rng.random() * 0.004)
            return found

        services.store.find_by_hash = jittered  # type: ignore[method-assign]


@pytest.mark.slow
async def test_reads_raced_against_revokes_on_three_replicas(scaled_settings) -> None:
    """Many rounds of: a token no replica has cached; one verify sent to each replica at the
    moment of the revoke. Once the revoke has returned and every replica has its message,
    no replica answers ``ok`` — a stale fill would keep answering it for the 300 s TTL."""
    rng = random.Random(7)
    rounds = 60
    async with _replicas(scaled_settings, 3) as replicas:
        admin = await _admin(replicas[0])
        seen = [InvalidationSeen(r) for r in replicas]
        for r in replicas:
            JitteredReads(r, rng)
        stale: list[tuple[int, int]] = []
        for n in range(rounds):
            issued = await replicas[0].tokens.create_token(
                admin.record, TokenSpec(project="app", scopes=["x:y"], name=f"race {n}")
            )
            revoker = replicas[n % 3]

            async def revoke(delay: float, revoker: Services = revoker) -> None:
                await asyncio.sleep(delay)
                await revoker.tokens.revoke_token(admin.record, issued.record.id, "race")

            verifies = [r.verifier.verify(issued.secret) for r in replicas]
            await asyncio.gather(revoke(rng.random() * 0.003), *verifies)
            for s in seen:
                await s.wait_for(issued.record.id)
            # Reads started before the message may still be settling: give them a moment.
            await asyncio.sleep(0.01)
            for index, r in enumerate(replicas):
                for _ in range(3):
                    decision = await r.verifier.verify(issued.secret)
                    if decision.reason is not Reason.REVOKED:
                        stale.append((n, index))
        assert stale == [], f"replicas served revoked tokens after the revoke: {stale}"


async def test_a_project_change_reaches_every_replica(scaled_settings) -> None:
    """A project's IP allowlist binds its tokens on every replica at once, not after the
    other replicas' cache TTL (300 s here)."""
    async with _replicas(scaled_settings, 2) as (a, b):
        admin = await _admin(a)
        issued = await a.tokens.create_token(admin.record, TokenSpec(project="app", scopes=["x:y"]))
        assert (await b.verifier.verify(issued.secret, ip="192.0.2.7")).allowed  # cached on B
        await a.tokens.set_project_ip_allowlist(admin.record, "app", ["10.0.0.0/8"])
        async with asyncio.timeout(2.0):
            while True:
                decision = await b.verifier.verify(issued.secret, ip="192.0.2.7")
                if decision.reason is Reason.IP_NOT_ALLOWED:
                    break
                await asyncio.sleep(0.005)
        assert (await b.verifier.verify(issued.secret, ip="10.1.2.3")).allowed


async def test_the_invalidation_history_is_bounded_and_still_wins(services: Services) -> None:
    """A flood of changes while one read is in flight keeps at most EPOCH_HISTORY entries,
    and the read in flight still does not cache what it read before them."""
    from tokenward.verify import EPOCH_HISTORY

    services.verifier.cache_ttl = 300.0
    admin = await _admin(services)
    issued = await services.tokens.create_token(
        admin.record, TokenSpec(project="app", scopes=["x:y"])
    )
    verifier = services.verifier
    held = HeldRead(services)
    in_flight = asyncio.create_task(verifier.verify(issued.secret))
    await held.read_done.wait()
    await services.tokens.revoke_token(admin.record, issued.record.id, "leaked")
    for n in range(EPOCH_HISTORY * 2):
        verifier.invalidate(f"tok_other{n}")
        assert len(verifier._changed) + len(verifier._project_changed) <= EPOCH_HISTORY
    held.release.set()
    await in_flight
    assert (await verifier.verify(issued.secret)).reason is Reason.REVOKED
