"""The audit log: one event per decision and admin action, chained, queryable, verifiable."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta

import pytest
from sqlalchemy import delete, select, update

from tokenward.audit.chain import prune, verify_chain
from tokenward.audit.query import AuditFilter, list_events
from tokenward.audit.records import AuditRecord, ChainKeys
from tokenward.audit.tables import audit_events
from tokenward.audit.writer import AuditWriter
from tokenward.service import TokenSpec
from tokenward.tokens.format import generate_token


async def make_token(services, admin, project="app", **fields):
    if await services.store.get_project(project) is None:
        await services.tokens.create_project(admin.record, project)
    fields.setdefault("scopes", ["records:read"])
    return await services.tokens.create_token(admin.record, TokenSpec(project=project, **fields))


async def all_events(services, **filters):
    page = await list_events(services.engine, AuditFilter(**filters), limit=1000, order="asc")
    return page.events


async def write_n(services, n, now=None):
    now = now or services.verifier.clock()
    records = [
        AuditRecord(at=now + timedelta(seconds=i), kind="admin", action=f"test.{i}")
        for i in range(n)
    ]
    await services.audit.append(records)


def keys(services):
    return ChainKeys.from_hasher(services.hasher)


async def test_every_verify_writes_exactly_one_event_without_the_secret(services, admin, api):
    issued = await make_token(services, admin, scopes=["records:read"])
    bad = generate_token("live")
    for body in (
        {"token": issued.secret, "scope": "records:read", "ip": "203.0.113.9"},
        {"token": issued.secret, "scope": "records:write", "ip": "203.0.113.9"},
        {"token": bad, "ip": "203.0.113.9"},
        {"token": bad, "ip": "203.0.113.9"},
    ):
        response = await api.post("/v1/verify", json=body, headers={"User-Agent": "probe/1"})
        assert response.status_code == 200
    events = await all_events(services, kind="access", client_ip="203.0.113.9")
    assert [(e.values["decision"], e.values["reason"]) for e in events] == [
        ("allow", "ok"),
        ("deny", "insufficient_scope"),
        ("deny", "unknown"),
        ("deny", "unknown"),
    ]
    first = events[0].public()
    assert first["token_id"] == issued.record.id and first["project_id"] == issued.record.project_id
    assert first["principal"] == issued.record.principal and first["user_agent"] == "probe/1"
    assert first["resource"] == "/v1/verify" and first["method"] == "POST"
    assert first["request_id"].startswith("req_") and first["latency_ms"] >= 0
    assert first["actor_id"] == admin.record.id  # who asked: the verify API's caller
    # The same bad token twice: the same keyed fingerprint, so attempts can be correlated.
    assert events[2].values["fingerprint"] == events[3].values["fingerprint"] is not None
    async with services.engine.connect() as conn:
        dump = json.dumps(
            [list(r) for r in (await conn.execute(select(audit_events))).all()], default=str
        )
    assert issued.secret not in dump and bad not in dump and admin.secret not in dump


async def test_admin_actions_are_audited_with_actor(services, admin, api):
    await api.post("/v1/projects", json={"name": "shop"})
    created = (await api.post("/v1/tokens", json={"project": "shop", "scopes": ["a:b"]})).json()
    await api.post(f"/v1/tokens/{created['id']}/rotate", json={"grace": "0"})
    await api.post(f"/v1/tokens/{created['id']}/revoke", json={"reason": "leaked"})
    events = await all_events(services, kind="admin")
    assert [e.values["action"] for e in events] == [
        "project.create",
        "token.create",
        "token.rotate",
        "token.revoke",
    ]
    assert {e.values["actor_id"] for e in events} == {admin.record.id}
    assert events[3].values["detail"] == {"reason": "leaked"}
    assert all(e.values["request_id"] for e in events)


async def test_concurrent_requests_are_group_committed_and_chained(services, admin):
    issued = await make_token(services, admin)
    batches = []
    services.audit.observe = lambda n, _s: batches.append(n)

    async def one():
        await services.verifier.verify(issued.secret)
        await services.audit.submit(
            AuditRecord(at=services.verifier.clock(), kind="access", action="access.test")
        )

    await asyncio.gather(*[one() for _ in range(200)])
    assert sum(batches) == 200 and max(batches) > 1  # several events per transaction
    report = await verify_chain(services.engine, keys(services))
    assert report.ok and report.checked == 202  # + project.create and token.create


async def test_full_queue_applies_back_pressure_and_drops_nothing(services):
    writer = AuditWriter(services.engine, keys(services), queue_size=2, batch_size=2)
    now = services.verifier.clock()
    await asyncio.gather(
        *[writer.submit(AuditRecord(at=now, kind="admin", action="bp")) for _ in range(50)]
    )
    await writer.close()
    assert writer.written == 50
    assert len(await all_events(services, action="bp")) == 50


async def test_async_mode_is_flushed_on_close(services):
    writer = AuditWriter(services.engine, keys(services), mode="async", queue_size=1000)
    now = services.verifier.clock()
    for _ in range(30):
        await writer.submit(AuditRecord(at=now, kind="admin", action="async"))
    await writer.close()
    assert len(await all_events(services, action="async")) == 30


async def test_verify_catches_an_edited_event(services):
    await write_n(services, 10)
    assert (await verify_chain(services.engine, keys(services))).ok
    async with services.engine.begin() as conn:
        await conn.execute(update(audit_events).where(audit_events.c.seq == 4).values(reason="ok"))
    report = await verify_chain(services.engine, keys(services))
    assert not report.ok and report.problem == "edited" and report.first_bad_seq == 4


async def test_verify_catches_an_edit_even_with_a_recomputed_plain_hash(services):
    """Without the server key, an attacker cannot rebuild the chain after an edit."""
    import hashlib

    await write_n(services, 3)
    async with services.engine.begin() as conn:
        await conn.execute(
            update(audit_events)
            .where(audit_events.c.seq == 2)
            .values(action="forged", hash=hashlib.sha256(b"x").hexdigest())
        )
    report = await verify_chain(services.engine, keys(services))
    assert report.problem == "edited" and report.first_bad_seq == 2


async def test_verify_catches_a_deleted_event(services):
    await write_n(services, 10)
    async with services.engine.begin() as conn:
        await conn.execute(delete(audit_events).where(audit_events.c.seq == 6))
    report = await verify_chain(services.engine, keys(services))
    assert not report.ok and report.problem == "deleted" and report.first_bad_seq == 7


async def test_verify_catches_deleted_newest_events(services):
    await write_n(services, 10)
    async with services.engine.begin() as conn:
        await conn.execute(delete(audit_events).where(audit_events.c.seq > 8))
    report = await verify_chain(services.engine, keys(services))
    # The writer's checkpoint (taken with its first batch) recorded seq 10 as its head.
    assert not report.ok and report.problem == "truncated" and report.first_bad_seq == 9


async def test_verify_catches_reordered_events(services):
    await write_n(services, 10)
    async with services.engine.begin() as conn:  # swap events 3 and 5
        await conn.execute(update(audit_events).where(audit_events.c.seq == 3).values(seq=-3))
        await conn.execute(update(audit_events).where(audit_events.c.seq == 5).values(seq=3))
        await conn.execute(update(audit_events).where(audit_events.c.seq == -3).values(seq=5))
    report = await verify_chain(services.engine, keys(services))
    assert not report.ok and report.problem == "reordered" and report.first_bad_seq == 3


async def test_anchor_catches_a_rewound_head(services):
    """A chain's newest events cut off together with every checkpoint that saw them: only
    an anchor kept elsewhere tells."""
    from tokenward.audit.tables import audit_chain_checkpoints

    await write_n(services, 5)
    [head] = (await verify_chain(services.engine, keys(services))).public()["heads"]
    chain, seq, digest = head.split(":")
    async with services.engine.begin() as conn:
        await conn.execute(delete(audit_events).where(audit_events.c.seq > 3))
        await conn.execute(delete(audit_chain_checkpoints))
    assert (await verify_chain(services.engine, keys(services))).ok  # undetectable alone
    report = await verify_chain(services.engine, keys(services), anchor=(chain, int(seq), digest))
    assert not report.ok and report.problem == "truncated" and report.first_bad_seq == 5


async def test_prune_keeps_the_rest_verifiable_from_a_checkpoint(services):
    now = services.verifier.clock()
    await write_n(services, 10, now)
    result = await prune(services.engine, now + timedelta(seconds=4), now)
    assert result.pruned == 4 and result.cuts == {services.audit.chain_id: 4}
    report = await verify_chain(services.engine, keys(services))
    assert report.ok and report.checked == 6
    assert report.chain(services.audit.chain_id).base_seq == 4
    await write_n(services, 2)  # the chain goes on after the prune
    assert (await verify_chain(services.engine, keys(services))).checked == 8
    async with services.engine.begin() as conn:
        await conn.execute(delete(audit_events).where(audit_events.c.seq == 5))
    assert (await verify_chain(services.engine, keys(services))).problem == "deleted"


async def test_query_filters_and_cursor_pagination(services, admin, api):
    issued = await make_token(services, admin)
    for i in range(7):
        await api.post("/v1/verify", json={"token": issued.secret, "ip": f"198.51.100.{i % 2}"})
    seen, cursor = [], None
    while True:
        params = {"token": issued.record.id, "limit": 3, "kind": "access"}
        if cursor:
            params["cursor"] = cursor
        page = (await api.get("/v1/audit", params=params)).json()
        seen += [e["seq"] for e in page["events"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == 7 and seen == sorted(seen, reverse=True)
    only = (await api.get("/v1/audit", params={"ip": "198.51.100.1", "kind": "access"})).json()
    assert len(only["events"]) == 3
    assert (await api.get("/v1/audit", params={"cursor": "abc"})).json()[
        "error"
    ] == "invalid_cursor"
    assert (await api.get("/v1/audit", params={"decision": "maybe"})).status_code == 422
    assert (await api.get("/v1/audit", params={"since": "yesterday"})).status_code == 422
    export = await api.get("/v1/audit/export", params={"token": issued.record.id})
    lines = [json.loads(line) for line in export.text.splitlines()]
    assert export.headers["content-type"].startswith("application/x-ndjson")
    assert len(lines) == 8 and lines[0]["action"] == "token.create"
    chain = (await api.get("/v1/audit/verify")).json()
    assert chain["ok"] and chain["checked"] >= 8


async def test_project_bound_admin_sees_only_its_project(services, admin, api):
    mine = await make_token(services, admin, project="mine")
    theirs = await make_token(services, admin, project="theirs")
    for t in (mine, theirs):
        await api.post("/v1/verify", json={"token": t.secret})
    bound = (
        await api.post("/v1/tokens", json={"project": "mine", "scopes": ["admin:read"]})
    ).json()
    headers = {"Authorization": f"Bearer {bound['token']}"}
    events = (await api.get("/v1/audit", headers=headers, params={"limit": 1000})).json()["events"]
    assert events and {e["project_id"] for e in events} == {mine.record.project_id}
    other = await api.get("/v1/audit", headers=headers, params={"project": "theirs"})
    assert other.status_code == 404
    filtered = await api.get("/v1/audit", headers=headers, params={"token": theirs.record.id})
    assert filtered.json()["events"] == []
    assert (await api.get("/v1/audit/verify", headers=headers)).status_code == 403


async def test_audit_write_failure_fails_the_request_closed(services, admin, api):
    from tokenward.store.engine import create_engine

    dead = (
        "postgresql+asyncpg://postgres@127.0.0.1:9/none"
        if services.engine.dialect.name == "postgresql"
        else "sqlite+aiosqlite:////nonexistent/dir/x.db"
    )
    dead_engine = create_engine(dead)
    failing = AuditWriter(dead_engine, keys(services), give_up_after=0.2)
    healthy = services.audit
    services.events.subscribers[services.events.subscribers.index(healthy)] = failing
    try:
        response = await api.get("/v1/projects")
        assert response.status_code == 503
        assert response.json()["error"] == "audit_unavailable"
    finally:
        services.events.subscribers[services.events.subscribers.index(failing)] = healthy
        await failing.close()
        await dead_engine.dispose()


async def test_a_bad_event_does_not_take_its_batch_down(services):
    from tokenward.errors import Unavailable

    now = services.verifier.clock()
    writer = AuditWriter(services.engine, keys(services), give_up_after=1)
    good = [AuditRecord(at=now, kind="admin", action="good") for _ in range(5)]
    # Longer than the column allows: PostgreSQL refuses it (SQLite stores it).
    bad = AuditRecord(at=now, kind="admin", action="bad", resource="x" * 600)
    results = await asyncio.gather(
        *[writer.submit(r) for r in [*good[:2], bad, *good[2:]]], return_exceptions=True
    )
    await writer.close()
    assert len(await all_events(services, action="good")) == 5
    if services.engine.dialect.name == "postgresql":
        assert isinstance(results[2], Unavailable)
    assert (await verify_chain(services.engine, keys(services))).ok


async def test_nul_characters_are_stored_escaped(services):
    from tokenward.audit.records import from_access
    from tokenward.events import AccessEvent
    from tokenward.tokens.model import Reason
    from tokenward.verify import Decision

    event = AccessEvent(
        at=services.verifier.clock(),
        source="gateway",
        decision=Decision(False, Reason.MALFORMED),
        request_id="req_nul",
        path="/records/a\x00b",
        user_agent="ua\x00",
    )
    await services.audit.submit(from_access(event))
    [stored] = await all_events(services, request_id="req_nul")
    assert stored.values["resource"] == "/records/a\\x00b"
    assert stored.values["user_agent"] == "ua\\x00"


async def test_the_writer_reconnects_when_its_connection_is_killed(services):
    """PostgreSQL: a writer whose connection the server dropped reconnects and loses nothing."""
    if services.engine.dialect.name != "postgresql":
        pytest.skip("a PostgreSQL connection and row lock; SQLite has neither")
    now = services.verifier.clock()
    writer = AuditWriter(services.engine, keys(services), give_up_after=10)
    await writer.submit(AuditRecord(at=now, kind="admin", action="before"))
    async with services.engine.connect() as conn:
        killed = (
            await conn.exec_driver_sql(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                " AND application_name = 'tokenward-audit-writer'"
            )
        ).all()
    assert killed == [(True,)]  # the writer's own connection, and only it
    await asyncio.gather(
        *[writer.submit(AuditRecord(at=now, kind="admin", action="after")) for _ in range(20)]
    )
    await writer.close()
    assert len(await all_events(services, action="after")) == 20
    assert (await verify_chain(services.engine, keys(services))).ok


async def test_a_table_locked_elsewhere_fails_closed_in_time(services):
    """PostgreSQL: a writer that cannot append (the events table locked, as a migration
    would) answers 503 within its promise, and recovers."""
    if services.engine.dialect.name != "postgresql":
        pytest.skip("a PostgreSQL connection and table lock")
    from tokenward.errors import Unavailable

    now = services.verifier.clock()
    writer = AuditWriter(services.engine, keys(services), give_up_after=1)
    await writer.submit(AuditRecord(at=now, kind="admin", action="first"))
    async with services.engine.connect() as holder:
        await holder.exec_driver_sql("BEGIN")
        await holder.exec_driver_sql("LOCK TABLE audit_events IN EXCLUSIVE MODE")
        started = asyncio.get_running_loop().time()
        try:
            await writer.submit(AuditRecord(at=now, kind="admin", action="blocked"))
        except Unavailable:
            pass
        else:
            raise AssertionError("an event was acknowledged that could not be written")
        assert asyncio.get_running_loop().time() - started < 5
        await holder.exec_driver_sql("ROLLBACK")
    await writer.submit(AuditRecord(at=now, kind="admin", action="after"))  # and it recovers
    await writer.close()
    assert len(await all_events(services, action="after")) == 1
    assert (await verify_chain(services.engine, keys(services))).ok


async def test_an_event_that_cannot_be_encoded_fails_alone(services):
    from tokenward.errors import Unavailable

    now = services.verifier.clock()
    writer = AuditWriter(services.engine, keys(services), give_up_after=2)
    good = [AuditRecord(at=now, kind="admin", action="good") for _ in range(4)]
    surrogate = AuditRecord(at=now, kind="admin", action="bad", detail={"note": "a\udcffb"})
    huge = AuditRecord(at=now, kind="admin", action="bad", latency_us=2**70)
    results = await asyncio.gather(
        *[writer.submit(r) for r in [good[0], surrogate, good[1], huge, *good[2:]]],
        return_exceptions=True,
    )
    await writer.close()
    assert [type(r).__name__ for r in results] == [
        "NoneType",
        "Unavailable",
        "NoneType",
        "Unavailable",
        "NoneType",
        "NoneType",
    ]
    assert isinstance(results[1], Unavailable)
    assert len(await all_events(services, action="good")) == 4
    assert (await verify_chain(services.engine, keys(services))).ok


async def test_a_writer_that_dies_fails_its_waiters_and_a_new_one_takes_over(services):
    from tokenward.errors import Unavailable

    now = services.verifier.clock()
    writer = AuditWriter(services.engine, keys(services), linger=0.2)
    waiting = asyncio.ensure_future(writer.submit(AuditRecord(at=now, kind="admin", action="x")))
    await asyncio.sleep(0.05)  # the writer lingers with the event in its batch
    assert writer._task is not None
    writer._task.cancel()
    try:
        await asyncio.wait_for(waiting, 2)
    except Unavailable:
        pass
    else:
        raise AssertionError("an event was acknowledged that no writer wrote")
    writer.linger = 0.0
    await writer.submit(AuditRecord(at=now, kind="admin", action="after"))
    await asyncio.wait_for(writer.close(), 5)
    assert writer.depth == 0
    assert len(await all_events(services, action="after")) == 1


def test_admin_detail_keeps_its_text_and_loses_only_what_no_store_takes():
    from tokenward.audit.records import normalize

    assert normalize({"note": "see C:\\u0000 path"}) == {"note": "see C:\\u0000 path"}
    assert normalize({"a\x00": "b\x00c"}) == {"a\\x00": "b\\x00c"}
    assert normalize({"n": [1, 2.5, {"k": "\udcff"}]}) == {"n": [1, 2.5, {"k": "?"}]}


async def test_a_cancelled_waiter_leaves_its_batch_and_the_others_alone(services):
    now = services.verifier.clock()
    writer = AuditWriter(services.engine, keys(services), linger=0.1)
    first = asyncio.ensure_future(writer.submit(AuditRecord(at=now, kind="admin", action="c")))
    second = asyncio.ensure_future(writer.submit(AuditRecord(at=now, kind="admin", action="c")))
    await asyncio.sleep(0.02)
    first.cancel()
    await asyncio.wait_for(second, 5)  # still answered, once its event is written
    await writer.close()
    assert first.cancelled()
    assert len(await all_events(services, action="c")) == 2  # a cancelled caller un-writes nothing
