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


async def test_the_database_filters_the_token_list_as_the_dashboard_did(services, admin):
    """Every filter but scope, applied by the store, gives the page the Python filter gave."""
    from tokenward.dashboard.routes_tokens import _filter, _query

    tokens = services.tokens
    actor = admin.record
    await tokens.create_project(actor, "app")
    now = services.verifier.clock()
    made = []
    for n in range(24):
        spec = TokenSpec(
            project="app",
            scopes=["records:read"],
            name=f"{'Billing' if n % 3 == 0 else 'search'}-{n}_x%",
            principal=f"svc-{n % 4}",
            environment="test" if n % 5 == 0 else "live",
            ttl=timedelta(days=[1, 5, 40, 400][n % 4]) if n % 6 else None,
            not_before=now + timedelta(hours=3) if n % 7 == 0 else None,
            metadata={"team": "ab"[n % 2], "tier": "gold"} if n % 4 else {},
        )
        made.append(await tokens.create_token(actor, spec))
    for issued in made[::5]:
        await tokens.revoke_token(actor, issued.record.id, "test")
    await tokens.rotate_token(actor, made[1].record.id, timedelta(hours=1))
    await tokens.rotate_token(actor, made[2].record.id, timedelta(0))
    await services.store.touch_many({made[3].record.id: (now, "10.0.0.1")})
    app = (await services.store.get_project("app")).id
    everything = await services.store.list_tokens(project_ids=[app], state=None, now=now)
    later = now + timedelta(days=2)
    for moment in (now, later):
        for params in (
            {},
            {"q": "billing"},
            {"q": "_X%"},
            {"q": "svc-2", "env": "live"},
            {"state": "active"},
            {"state": "revoked"},
            {"state": "rotated_in_grace"},
            {"state": "not_yet_valid"},
            {"env": "test"},
            {"expiring": "7"},
            {"expiring": "60", "env": "live"},
            {"unused": "0"},
            {"unused": "1"},
            {"name": "Billing"},
            {"name": "billing"},  # a prefix is exact: the same on SQLite and PostgreSQL
            {"name": "search-1", "env": "live"},
            {"name": "_x"},
            {"principal": "svc-1"},
            {"principal": "svc-1", "state": "active"},
            {"kind": "api_key"},
            {"kind": "canary"},
            {"meta": "team=a"},
            {"meta": "tier=gold", "principal": "svc-2"},
            {"meta": "team=c"},
        ):
            expected = _filter(everything, params, moment)
            query = _query(params)
            query.project_ids = [app]
            first, total = await services.store.search_tokens(
                query, now=moment, limit=5, count=True
            )
            assert total == len(expected), params
            assert [r.id for r in first] == [r.id for r in expected[:5]], params
            if len(first) == 5:
                after = (first[-1].created_at, first[-1].id)
                page, _ = await services.store.search_tokens(
                    query, now=moment, limit=10, after=after
                )
                assert [r.id for r in page] == [r.id for r in expected[5:15]], params
