"""The verification pipeline, reason by reason, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from tokenward.app import Services
from tokenward.service import Issued, TokenSpec
from tokenward.tokens.format import generate_token
from tokenward.tokens.model import Reason


async def make(services: Services, admin: Issued, project: str = "app", **fields) -> Issued:
    if await services.store.get_project(project) is None:
        await services.tokens.create_project(admin.record, project)
    fields.setdefault("scopes", ["records:read"])
    return await services.tokens.create_token(admin.record, TokenSpec(project=project, **fields))


async def test_valid_token_is_allowed_with_its_identity(services, admin):
    issued = await make(services, admin, principal="svc-a", scopes=["records:*"])
    decision = await services.verifier.verify(issued.secret, scope="records:read")
    assert decision.allowed and decision.reason is Reason.OK
    body = decision.as_dict()
    assert body["project"] == "app" and body["principal"] == "svc-a"
    assert body["token_id"] == issued.record.id and body["scopes"] == ["records:*"]


@pytest.mark.parametrize(
    ("credential", "reason"),
    [
        ("", Reason.MALFORMED),
        ("Bearer x", Reason.MALFORMED),
        ("tw_live_short", Reason.MALFORMED),
        ("tw_prod_" + "a" * 38, Reason.MALFORMED),
    ],
)
async def test_malformed_is_rejected(services, credential, reason):
    assert (await services.verifier.verify(credential)).reason is reason


async def test_bad_checksum_touches_no_store(services, admin):
    issued = await make(services, admin)
    typo = issued.secret[:-1] + ("A" if issued.secret[-1] != "A" else "B")
    misses = services.verifier.misses
    assert (await services.verifier.verify(typo)).reason is Reason.BAD_CHECKSUM
    assert services.verifier.misses == misses


async def test_unknown_token(services):
    assert (await services.verifier.verify(generate_token("live"))).reason is Reason.UNKNOWN


async def test_revoked_is_denied_right_after_revoke_despite_cache(services, admin):
    issued = await make(services, admin)
    assert (await services.verifier.verify(issued.secret)).allowed  # now cached
    await services.tokens.revoke_token(admin.record, issued.record.id, "leaked")
    assert (await services.verifier.verify(issued.secret)).reason is Reason.REVOKED


async def test_expired_and_not_yet_valid(services, admin):
    now = services.verifier.clock()
    soon = await make(services, admin, ttl=timedelta(seconds=30))
    later = await make(services, admin, not_before=now + timedelta(hours=1))
    assert (await services.verifier.verify(later.secret)).reason is Reason.NOT_YET_VALID
    assert (await services.verifier.verify(soon.secret)).allowed
    services.verifier.clock = lambda: now + timedelta(minutes=1)
    assert (await services.verifier.verify(soon.secret)).reason is Reason.EXPIRED
    services.verifier.clock = lambda: now + timedelta(hours=2)
    assert (await services.verifier.verify(later.secret)).allowed


async def test_rotation_keeps_old_token_through_grace_then_denies_rotated(services, admin):
    now = services.verifier.clock()
    old = await make(services, admin)
    new, _ = await services.tokens.rotate_token(admin.record, old.record.id, timedelta(hours=1))
    assert (await services.verifier.verify(old.secret)).allowed
    assert (await services.verifier.verify(new.secret)).allowed
    services.verifier.clock = lambda: now + timedelta(hours=1, seconds=1)
    assert (await services.verifier.verify(old.secret)).reason is Reason.ROTATED
    assert (await services.verifier.verify(new.secret)).allowed
    assert new.record.rotated_from == old.record.id


async def test_scope_environment_project_and_ip(services, admin):
    issued = await make(
        services, admin, environment="test", ip_allowlist=["10.0.0.0/8", "2001:db8::/32"]
    )
    v = services.verifier
    assert (
        await v.verify(issued.secret, scope="records:write", ip="10.1.2.3")
    ).reason is Reason.INSUFFICIENT_SCOPE
    assert (
        await v.verify(issued.secret, environment="live", ip="10.1.2.3")
    ).reason is Reason.WRONG_ENVIRONMENT
    assert (
        await v.verify(issued.secret, project="other", ip="10.1.2.3")
    ).reason is Reason.WRONG_PROJECT
    assert (await v.verify(issued.secret, ip="192.168.1.1")).reason is Reason.IP_NOT_ALLOWED
    assert (await v.verify(issued.secret, ip=None)).reason is Reason.IP_NOT_ALLOWED
    assert (await v.verify(issued.secret, ip="not-an-ip")).reason is Reason.IP_NOT_ALLOWED
    assert (await v.verify(issued.secret, ip="::ffff:10.0.0.1")).allowed
    assert (await v.verify(issued.secret, ip="2001:db8::5", scope="records:read")).allowed


async def test_rate_limit(services, admin):
    issued = await make(services, admin, rate_limit=["3/minute"])
    results = [await services.verifier.verify(issued.secret) for _ in range(4)]
    assert [r.allowed for r in results] == [True, True, True, False]
    assert results[-1].reason is Reason.RATE_LIMITED
    assert results[0].ratelimit.limit == 3 and results[0].ratelimit.remaining == 2
    assert results[-1].ratelimit.reset > 0


async def test_remaining_uses_are_exact_under_concurrency(services, admin):
    issued = await make(services, admin, uses=10)
    decisions = await asyncio.gather(*[services.verifier.verify(issued.secret) for _ in range(40)])
    allowed = [d for d in decisions if d.allowed]
    assert len(allowed) == 10
    assert {d.reason for d in decisions if not d.allowed} == {Reason.USES_EXHAUSTED}
    assert sorted(d.remaining_uses for d in allowed) == list(range(10))
    assert (await services.store.get_token(issued.record.id)).remaining_uses == 0


async def test_denied_request_spends_no_use(services, admin):
    issued = await make(services, admin, uses=1)
    assert (
        await services.verifier.verify(issued.secret, scope="x:y")
    ).reason is Reason.INSUFFICIENT_SCOPE
    assert (await services.verifier.verify(issued.secret)).allowed


async def test_tenant_sees_other_projects_tokens_as_unknown(services, admin):
    mine = await make(services, admin, project="a")
    theirs = await make(services, admin, project="b")
    tenant = mine.record.project_id
    assert (await services.verifier.verify(theirs.secret, tenant=tenant)).reason is Reason.UNKNOWN
    assert (await services.verifier.verify(mine.secret, tenant=tenant)).allowed


async def test_last_used_is_recorded(services, admin):
    issued = await make(services, admin)
    await services.verifier.verify(issued.secret, ip="198.51.100.4")
    await services.verifier.flush_usage()
    record = await services.store.get_token(issued.record.id)
    assert record.last_used_ip == "198.51.100.4"
    assert record.last_used_at is not None
    assert abs(record.last_used_at - datetime.now(UTC)) < timedelta(minutes=1)


async def test_store_down_fails_closed(services, admin):
    from tokenward.store.engine import create_engine

    issued = await make(services, admin)
    services.verifier.clear()
    healthy = services.store.engine
    dead = (
        "postgresql+asyncpg://postgres@127.0.0.1:9/none"
        if healthy.dialect.name == "postgresql"
        else "sqlite+aiosqlite:////nonexistent/dir/x.db"
    )
    services.store.engine = create_engine(dead)
    try:
        decision = await services.verifier.verify(issued.secret)
        assert decision.reason is Reason.UNAVAILABLE and not decision.allowed
    finally:
        await services.store.engine.dispose()
        services.store.engine = healthy


async def test_concurrent_misses_share_one_store_lookup(services, admin):
    issued = await make(services, admin)
    services.verifier.clear()
    calls = 0
    find = services.store.find_by_hash

    async def counting(hashes):
        nonlocal calls
        calls += 1
        return await find(hashes)

    services.store.find_by_hash = counting
    decisions = await asyncio.gather(*[services.verifier.verify(issued.secret) for _ in range(20)])
    assert all(d.allowed for d in decisions)
    assert calls == 1


async def test_rotation_hands_remaining_uses_to_the_successor(services, admin):
    old = await make(services, admin, uses=5)
    assert (await services.verifier.verify(old.secret)).allowed  # 4 left
    new, _ = await services.tokens.rotate_token(admin.record, old.record.id, timedelta(hours=1))
    assert new.record.remaining_uses == 4
    # in its grace window the old token spends from the same budget as its successor
    assert (await services.verifier.verify(old.secret)).remaining_uses == 3
    newer, _ = await services.tokens.rotate_token(admin.record, new.record.id, timedelta(hours=1))
    assert newer.record.remaining_uses == 3
    results = [await services.verifier.verify(s) for s in (old.secret, new.secret, newer.secret)]
    assert [r.remaining_uses for r in results] == [2, 1, 0]
    assert all(r.allowed for r in results)
    assert (await services.verifier.verify(old.secret)).reason is Reason.USES_EXHAUSTED
    assert (await services.verifier.verify(newer.secret)).reason is Reason.USES_EXHAUSTED
