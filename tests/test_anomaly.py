"""Each detector fires on real traffic through the API; alerts, webhooks and responses."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta

import pytest

from tokenward.anomaly.store import GLOBAL
from tokenward.anomaly.webhooks import SIGNATURE_HEADER, verify_signature
from tokenward.events import SecurityEvent
from tokenward.tokens.format import generate_token


class Receiver:
    """A webhook endpoint on a free loopback port; answers with ``statuses`` in turn."""

    def __init__(self, statuses=(200,)):
        self.statuses = list(statuses)
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.arrived = asyncio.Event()

    async def handle(self, reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        self.requests.append((headers, body))
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        writer.write(
            f"HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n".encode()
        )
        await writer.drain()
        writer.close()
        self.arrived.set()

    async def start(self):
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/hook"
        return self


@pytest.fixture
async def receiver():
    r = await Receiver().start()
    yield r
    r.server.close()
    await r.server.wait_closed()


async def configure(api, overrides, project=None):
    params = {"project": project} if project else {}
    if project and (await api.get(f"/v1/projects/{project}")).status_code == 404:
        await api.post("/v1/projects", json={"name": project})
    response = await api.put("/v1/anomaly/settings", json=overrides, params=params)
    assert response.status_code == 200, response.text
    return response.json()


async def new_token(api, project="app", **fields):
    if (await api.get(f"/v1/projects/{project}")).status_code == 404:
        await api.post("/v1/projects", json={"name": project})
    body = {"project": project, "scopes": ["records:read"], **fields}
    response = await api.post("/v1/tokens", json=body)
    assert response.status_code == 201, response.text
    return response.json()


async def verify(api, token, **fields):
    response = await api.post("/v1/verify", json={"token": token, **fields})
    return response.json()


async def alerts(api, **params):
    return (await api.get("/v1/alerts", params=params)).json()["alerts"]


async def test_brute_force_alerts_signs_webhook_and_blocks_the_network(services, api, receiver):
    settings = await configure(
        api,
        {
            "brute_force": {
                "threshold": 5,
                "actions": ["alert", "webhook", "block_ip"],
                "block_seconds": 600,
                "ipv4_prefix": 24,
            },
            "webhook_url": receiver.url,
        },
    )
    secret = settings["webhook_secret"]
    good = await new_token(api)
    for i in range(4):
        assert (await verify(api, generate_token("live"), ip=f"203.0.113.{i}"))[
            "reason"
        ] == "unknown"
    assert await alerts(api, detector="brute_force") == []
    await verify(api, "tw_live_garbage", ip="203.0.113.99")  # malformed counts too
    [alert] = await alerts(api, detector="brute_force")
    assert alert["evidence"]["failures"] == 5 and alert["actions"] == [
        "block_ip:203.0.113.0/24",
        "webhook",
    ]
    # The network is refused now, even with a valid token; other networks are not.
    assert (await verify(api, good["token"], ip="203.0.113.200"))["reason"] == "ip_blocked"
    assert (await verify(api, good["token"], ip="198.51.100.1"))["valid"] is True
    await services.anomaly.webhooks.drain()
    headers, body = receiver.requests[0]
    assert verify_signature(secret, headers[SIGNATURE_HEADER.lower()], body)
    assert not verify_signature("whsec_wrong", headers[SIGNATURE_HEADER.lower()], body)
    assert json.loads(body)["alert"]["id"] == alert["id"]
    assert headers["x-tokenward-delivery"] == alert["id"]
    # An admin lifts the block.
    [block] = (await api.get("/v1/ip-blocks")).json()["blocks"]
    assert block["alert_id"] == alert["id"]
    assert (await api.delete(f"/v1/ip-blocks/{block['id']}")).status_code == 200
    assert (await verify(api, good["token"], ip="203.0.113.200"))["valid"] is True
    blocked = (await api.get("/v1/audit", params={"reason": "ip_blocked"})).json()["events"]
    assert len(blocked) == 1


async def test_loopback_is_never_blocked(services, api):
    await configure(api, {"brute_force": {"threshold": 3, "actions": ["alert", "block_ip"]}})
    for _ in range(3):
        await verify(api, generate_token("live"), ip="127.0.0.1")
    [alert] = await alerts(api, detector="brute_force")
    assert alert["actions"] == []
    assert (await api.get("/v1/projects")).status_code == 200


async def test_leaked_token_use_after_revoke_and_rotation(services, api, receiver):
    await configure(api, {"webhook_url": receiver.url})
    token = await new_token(api)
    await api.post(f"/v1/tokens/{token['id']}/revoke", json={"reason": "test"})
    assert (await verify(api, token["token"], ip="198.51.100.7"))["reason"] == "revoked"
    other = await new_token(api)
    await api.post(f"/v1/tokens/{other['id']}/rotate", json={"grace": "0"})
    assert (await verify(api, other["token"]))["reason"] == "rotated"
    found = await alerts(api, detector="leaked_token")
    assert {a["token_id"] for a in found} == {token["id"], other["id"]}
    assert {a["severity"] for a in found} == {"critical"}
    await services.anomaly.webhooks.drain()
    assert len(receiver.requests) == 2


async def test_new_network_after_learning(services, api):
    await configure(api, {"new_network": {"learning_seconds": 3600}}, project="app")
    token = await new_token(api)
    await verify(api, token["token"], ip="10.1.1.1")
    await verify(api, token["token"], ip="192.0.2.5")  # still learning: no alert
    assert await alerts(api, detector="new_network") == []
    start = services.verifier.clock()
    services.verifier.clock = lambda: start + timedelta(hours=2)
    await verify(api, token["token"], ip="10.1.1.77")  # same /24: known
    await verify(api, token["token"], ip="192.0.2.200")  # known
    assert await alerts(api, detector="new_network") == []
    await verify(api, token["token"], ip="2001:db8:5::1")
    await verify(api, token["token"], ip="2001:db8:5::2")  # same /64: one alert
    [alert] = await alerts(api, detector="new_network")
    assert alert["evidence"]["network"] == "2001:db8:5::/64"
    assert alert["evidence"]["known_networks"] == ["10.1.1.0/24", "192.0.2.0/24"]
    assert alert["token_id"] == token["id"] and alert["client_ip"] == "2001:db8:5::1"


async def test_volume_spike_quarantines_and_admin_releases(services, api):
    await configure(
        api,
        {
            "volume_spike": {
                "interval_seconds": 10,
                "warmup_intervals": 5,
                "min_count": 5,
                "deviations": 3,
                "actions": ["alert", "quarantine"],
            }
        },
        project="app",
    )
    token = await new_token(api)
    start = services.verifier.clock()
    for interval in range(6):  # a steady 2 requests per 10 s
        services.verifier.clock = lambda i=interval: start + timedelta(seconds=10 * i + 1)
        for _ in range(2):
            assert (await verify(api, token["token"]))["valid"]
    services.verifier.clock = lambda: start + timedelta(seconds=65)
    results = [await verify(api, token["token"]) for _ in range(12)]
    [alert] = await alerts(api, detector="volume_spike")
    assert alert["evidence"]["baseline"] == pytest.approx(2, abs=0.5)
    assert alert["actions"] == ["quarantine"]
    assert [r["reason"] for r in results].count("ok") == alert["evidence"]["count"]
    assert results[-1]["reason"] == "quarantined"
    shown = (await api.get(f"/v1/tokens/{token['id']}")).json()
    assert shown["quarantined_at"] and alert["id"] in shown["quarantine_reason"]
    released = await api.post(f"/v1/tokens/{token['id']}/release", json={"note": "load test"})
    assert released.status_code == 200 and released.json()["quarantined_at"] is None
    assert (await verify(api, token["token"]))["valid"]
    actions = [
        e["action"]
        for e in (
            await api.get("/v1/audit", params={"token": token["id"], "kind": "admin"})
        ).json()["events"]
    ]
    assert actions[:2] == ["token.release", "token.quarantine"]


async def test_scope_probing(services, api):
    await configure(api, {"scope_probing": {"threshold": 3}}, project="app")
    token = await new_token(api)
    for scope in ("records:write", "admin:write", "records:delete"):
        assert (await verify(api, token["token"], scope=scope))["reason"] == "insufficient_scope"
    [alert] = await alerts(api, detector="scope_probing")
    assert alert["evidence"]["scopes_tried"] == ["admin:write", "records:delete", "records:write"]
    assert alert["severity"] == "warning"


async def test_canary_use_is_a_critical_alert(services, api, receiver):
    await configure(api, {"webhook_url": receiver.url})
    canary = await new_token(api, kind="canary", name="aws-backup-key")
    answer = await verify(api, canary["token"], ip="192.0.2.66")
    assert answer["valid"] is False and answer["reason"] == "unknown"
    assert answer["token_id"] is None  # the presenter learns nothing
    [alert] = await alerts(api, detector="canary")
    assert alert["severity"] == "critical" and alert["token_id"] == canary["id"]
    assert alert["client_ip"] == "192.0.2.66" and alert["evidence"]["name"] == "aws-backup-key"
    await services.anomaly.webhooks.drain()
    assert json.loads(receiver.requests[0][1])["alert"]["detector"] == "canary"


async def test_security_events_become_alerts(services, api):
    token = await new_token(api)
    await services.events.security(
        SecurityEvent(
            at=services.verifier.clock(),
            kind="refresh_token_reuse",
            severity="critical",
            project_id=token["project"] and (await services.store.get_project("app")).id,
            token_id=token["id"],
            evidence={"family": "fam_1"},
        )
    )
    [alert] = await alerts(api, detector="refresh_token_reuse")
    assert alert["evidence"] == {"family": "fam_1"}


async def test_webhook_is_retried_with_backoff_and_logged(services, api):
    receiver = await Receiver(statuses=[500, 503, 200]).start()
    try:
        services.anomaly.webhooks.backoff = 0.01
        await configure(api, {"webhook_url": receiver.url})
        canary = await new_token(api, kind="canary")
        await verify(api, canary["token"])
        await services.anomaly.webhooks.drain()
        [alert] = await alerts(api, detector="canary")
        detail = (await api.get(f"/v1/alerts/{alert['id']}")).json()
        assert [(d["attempt"], d["status_code"], d["delivered"]) for d in detail["deliveries"]] == [
            (1, 500, False),
            (2, 503, False),
            (3, 200, True),
        ]
        assert [h["x-tokenward-attempt"] for h, _ in receiver.requests] == ["1", "2", "3"]
    finally:
        receiver.server.close()


async def test_alerts_are_tenant_isolated_and_acknowledged(services, api):
    await configure(api, {"scope_probing": {"threshold": 2}})
    mine = await new_token(api, project="mine")
    theirs = await new_token(api, project="theirs")
    for t in (mine, theirs):
        for _ in range(2):
            await verify(api, t["token"], scope="x:y")
    bound = await new_token(api, project="mine", scopes=["admin:*"])
    headers = {"Authorization": f"Bearer {bound['token']}"}
    seen = (await api.get("/v1/alerts", headers=headers)).json()["alerts"]
    assert [a["token_id"] for a in seen] == [mine["id"]]
    [their_alert] = await alerts(api, token=theirs["id"])
    assert (
        await api.post(f"/v1/alerts/{their_alert['id']}/ack", headers=headers)
    ).status_code == 404
    assert (await api.get("/v1/ip-blocks", headers=headers)).status_code == 403
    assert (await api.get("/v1/anomaly/settings", headers=headers)).status_code == 403
    acked = await api.post(
        f"/v1/alerts/{seen[0]['id']}/ack", headers=headers, json={"note": "mine"}
    )
    assert acked.json()["acknowledged_by"] == bound["id"]
    assert (await api.get("/v1/alerts", headers=headers, params={"acknowledged": "false"})).json()[
        "alerts"
    ] == []


async def test_invalid_settings_are_refused(api):
    for bad in (
        {"brute_force": {"threshold": 0}},
        {"nonsense": {}},
        {"canary": {"actions": ["explode"]}},
        {"webhook_url": "not a url"},
    ):
        response = await api.put("/v1/anomaly/settings", json=bad)
        assert response.status_code == 422 and response.json()["error"] == "invalid_settings"
    assert (await api.get("/v1/alerts", params={"cursor": "zzz"})).json()[
        "error"
    ] == "invalid_cursor"
    assert (await api.post("/v1/tokens/tok_nope/quarantine")).status_code == 404


async def test_allowed_decisions_made_at_once_are_each_observed(services, api):
    """Allowed decisions are observed per batch (those of one turn of the event loop):
    every one is counted, a new network among them makes one alert, and each answer waits
    for its batch, so the alert is there as soon as the answers are."""
    await configure(api, {"new_network": {"learning_seconds": 0}}, project="app")
    token = await new_token(api)
    now = services.verifier.clock()
    services.verifier.clock = lambda: now  # one volume interval for all of them
    assert (await verify(api, token["token"], ip="10.1.1.1"))["valid"]  # the first network
    ips = ["10.1.1.2"] * 6 + ["192.0.2.9"] * 6
    results = await asyncio.gather(*(verify(api, token["token"], ip=ip) for ip in ips))
    assert all(r["valid"] for r in results)
    [alert] = await alerts(api, detector="new_network")
    assert alert["evidence"]["network"] == "192.0.2.0/24"
    assert alert["evidence"]["known_networks"] == ["10.1.1.0/24"]
    assert services.anomaly.volume_spike.rates[token["id"]].count == 1 + len(ips)


async def test_settings_are_read_by_one_load_at_a_time(services):
    """Concurrent batches needing a project's settings share one read of them; a change
    (which forgets them) is never undone by a read that started before it."""
    engine = services.anomaly
    reads: list[str] = []
    real = engine.store.get_settings

    async def counted(scope):
        reads.append(scope)
        return await real(scope)

    engine.store.get_settings = counted
    engine.forget_settings()
    first = await asyncio.gather(*(engine.resolved("app") for _ in range(10)))
    assert len({id(r) for r in first}) == 1
    assert reads == [GLOBAL, "app"]
    engine.forget_settings()
    reads.clear()
    before = asyncio.ensure_future(engine.resolved("app"))
    await asyncio.sleep(0)  # that read has started
    engine.forget_settings()
    after = await engine.resolved("app")
    assert (await before) is not after  # the change's read, not the one before it
    assert engine._configs["app"] is after
    assert reads.count(GLOBAL) == 2
