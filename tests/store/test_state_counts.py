"""Token states counted by the database agree with ``TokenRecord.state``, check for check."""

from __future__ import annotations

from collections import Counter
from datetime import timedelta

from tokenward.service import TokenSpec


async def test_the_database_counts_states_as_the_record_decides_them(services, admin):
    tokens = services.tokens
    actor = admin.record
    await tokens.create_project(actor, "app")
    await tokens.create_project(actor, "other")
    now = services.verifier.clock()
    spec = {"project": "app", "scopes": ["records:read"]}
    await tokens.create_token(actor, TokenSpec(**spec))
    await tokens.create_token(actor, TokenSpec(**spec, ttl=timedelta(hours=1)))
    await tokens.create_token(actor, TokenSpec(**spec, not_before=now + timedelta(hours=2)))
    revoked = await tokens.create_token(actor, TokenSpec(**spec))
    await tokens.revoke_token(actor, revoked.record.id, "test")
    rotated = await tokens.create_token(actor, TokenSpec(**spec, ttl=timedelta(hours=3)))
    await tokens.rotate_token(actor, rotated.record.id, timedelta(hours=1))
    await tokens.create_token(actor, TokenSpec(project="other", scopes=["records:read"]))
    records = await services.store.list_tokens(project_ids=None, state=None, now=now, limit=100)
    for moment in (now, now + timedelta(minutes=90), now + timedelta(hours=2, minutes=30)):
        expected: dict[str | None, Counter[str]] = {}
        for record in records:
            expected.setdefault(record.project_id, Counter())[record.state(moment).value] += 1
        counted = await services.store.count_by_state(project_ids=None, now=moment)
        assert {k: Counter(v) for k, v in counted.items()} == expected, moment
    app = (await services.store.get_project("app")).id
    only = await services.store.count_by_state(project_ids=[app], now=now)
    assert list(only) == [app] and sum(only[app].values()) == 6
    assert len({s for c in expected.values() for s in c}) >= 4  # the states really differ
