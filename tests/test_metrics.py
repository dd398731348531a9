"""Prometheus metrics: conventional names and types, per route and status, no secret."""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator

import httpx
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import closed_port, listening_socket, port_of
from tests.gateway.support import POLICY, Sink, make_token, upstream_server, use_policy
from tokenward.app import Services
from tokenward.gateway.proxy import Gateway
from tokenward.tokens.format import generate_token


@contextlib.asynccontextmanager
async def observed_gateway(
    services: Services, upstream_port: int | None = None
) -> AsyncIterator[tuple[httpx.AsyncClient, Sink]]:
    """The gateway, as ``serve`` runs it (with the services' metrics), before the test
    upstream (or the one on ``upstream_port``)."""
    sock = listening_socket()
    async with contextlib.AsyncExitStack() as stack:
        dead_port = stack.enter_context(closed_port())
        if upstream_port is None:
            upstream_port = await stack.enter_async_context(upstream_server())
        sink = use_policy(services, POLICY.format(port=upstream_port, dead_port=dead_port))
        stack.callback(sock.close)  # after the gateway stopped
        gateway = Gateway(services.enforcement, services.metrics)
        await gateway.start("127.0.0.1", 0, sock=sock)
        stack.push_async_callback(gateway.aclose)
        base = f"http://127.0.0.1:{port_of(sock)}"
        client = await stack.enter_async_context(httpx.AsyncClient(base_url=base))
        yield client, sink


def families(text: str) -> dict[str, object]:
    return {family.name: family for family in text_string_to_metric_families(text)}


async def test_metrics_count_decisions_latency_cache_audit_and_alerts(services, api):
    await api.put("/v1/anomaly/settings", json={"brute_force": {"threshold": 2}})
    await api.post("/v1/projects", json={"name": "m"})
    created = (
        await api.post(
            "/v1/tokens", json={"project": "m", "scopes": ["a:b"], "rate_limit": "1/minute"}
        )
    ).json()
    for body in (
        {"token": created["token"]},
        {"token": created["token"]},  # rate limited
        {"token": generate_token("live"), "ip": "192.0.2.1"},
        {"token": generate_token("live"), "ip": "192.0.2.1"},
    ):
        await api.post("/v1/verify", json=body)
    response = await api.get("/metrics")
    assert response.status_code == 200
    # No Accept: prometheus-client's compatibility format (what it serves itself)
    assert response.headers["content-type"] == CONTENT_TYPE_PLAIN_0_0_4
    text = response.text
    assert 'tokenward_decisions_total{outcome="allow",reason="ok",source="verify_api"} 1.0' in text
    assert 'reason="rate_limited",source="verify_api"} 1.0' in text
    assert (
        'tokenward_decisions_total{outcome="deny",reason="unknown",source="verify_api"} 2.0' in text
    )
    assert "tokenward_rate_limit_rejections_total 1.0" in text
    assert 'tokenward_decision_latency_seconds_count{source="verify_api",status="200"} 1.0' in text
    assert 'tokenward_decision_latency_seconds_count{source="verify_api",status="429"} 1.0' in text
    assert "tokenward_cache_hit_ratio" in text and "tokenward_audit_queue_depth 0.0" in text
    assert 'tokenward_alerts_total{detector="brute_force",severity="warning"} 1.0' in text
    assert 'tokenward_admin_actions_total{action="token.create"} 1.0' in text
    written = next(
        line
        for line in text.splitlines()
        if line.startswith("tokenward_audit_events_written_total")
    )
    assert float(written.split()[1]) >= 10
    assert "tokenward_audit_write_seconds_bucket" in text
    assert created["token"] not in text and created["id"] not in text


async def test_names_and_types_follow_prometheus_conventions(services, api):
    """Counters end in ``_total`` (the cache's too), durations are ``_seconds`` histograms,
    the process and platform collectors are there; the text parses as Prometheus'."""
    await api.post("/v1/projects", json={"name": "m"})
    created = (await api.post("/v1/tokens", json={"project": "m", "scopes": ["a:b"]})).json()
    for _ in range(3):
        await api.post("/v1/verify", json={"token": created["token"]})
    text = (await api.get("/metrics")).text
    found = families(text)
    for name, family in found.items():
        kind = family.type  # type: ignore[attr-defined]
        if kind == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples), name  # type: ignore[attr-defined]
        if name.startswith("tokenward_") and name.endswith("_seconds"):
            assert kind == "histogram", name
    assert found["tokenward_cache_hits"].type == "counter"  # type: ignore[attr-defined]
    assert found["tokenward_cache_misses"].type == "counter"  # type: ignore[attr-defined]
    hits = [line for line in text.splitlines() if line.startswith("tokenward_cache_hits_total")]
    misses = [line for line in text.splitlines() if line.startswith("tokenward_cache_misses_total")]
    assert float(hits[0].split()[1]) >= 2 and float(misses[0].split()[1]) >= 1
    assert "process_cpu_seconds_total" in found or "process_cpu_seconds" in found
    assert "python_info" in found and "python_gc_objects_collected" in found


async def test_requests_are_timed_per_route_template_and_status(services, api):
    await api.post("/v1/projects", json={"name": "m"})
    created = (await api.post("/v1/tokens", json={"project": "m", "scopes": ["a:b"]})).json()
    await api.post("/v1/verify", json={"token": created["token"]})
    await api.get(f"/v1/tokens/{created['id']}")
    await api.get("/v1/tokens/tok_doesnotexist")
    await api.get("/no/such/route")
    await api.get("/authz/whatever")  # no policy: answered by the hot path all the same
    text = (await api.get("/metrics")).text
    count = "tokenward_http_request_duration_seconds_count"
    assert f'{count}{{route="/v1/verify",server="api",status="200"}} 1.0' in text
    assert f'{count}{{route="/v1/tokens/{{token_id}}",server="api",status="200"}} 1.0' in text
    assert f'{count}{{route="/v1/tokens/{{token_id}}",server="api",status="404"}} 1.0' in text
    assert f'{count}{{route="unmatched",server="api",status="404"}} 1.0' in text
    assert 'route="/authz"' in text
    assert created["id"] not in text and "/no/such/route" not in text
    assert 'route="/metrics"' not in text


async def test_the_format_a_scraper_asks_for(api):
    """As prometheus-client's own exposition negotiates it: Prometheus 3's Accept gets the
    1.0.0 text format (``CONTENT_TYPE_LATEST``), OpenMetrics when asked for."""
    prometheus3 = "text/plain;version=1.0.0;escaping=underscores;q=0.5,*/*;q=0.1"
    response = await api.get("/metrics", headers={"Accept": prometheus3})
    assert response.headers["content-type"].startswith(CONTENT_TYPE_LATEST)
    assert "tokenward_decisions" in response.text or "process_" in response.text
    response = await api.get("/metrics", headers={"Accept": "application/openmetrics-text"})
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.rstrip().endswith("# EOF")


async def test_the_gateway_times_requests_and_upstreams_per_route_and_status(services, admin):
    issued = await make_token(services, admin)
    auth = {"Authorization": f"Bearer {issued.secret}"}
    assert services.metrics is not None
    async with observed_gateway(services) as (gw, _sink):
        assert (await gw.get("/records/1", headers=auth)).status_code == 200
        assert (await gw.get("/records/2", headers=auth)).status_code == 200
        assert (await gw.get("/records/1")).status_code == 401
        assert (await gw.get("/nowhere", headers=auth)).status_code == 404
        assert (await gw.get("/down", headers=auth)).status_code == 502
    text, _ = services.metrics.render()
    text = text.decode()
    count = "tokenward_http_request_duration_seconds_count"
    route = "/records/{rest:path}"
    assert f'{count}{{route="{route}",server="gateway",status="200"}} 2.0' in text
    assert f'{count}{{route="{route}",server="gateway",status="401"}} 1.0' in text
    assert f'{count}{{route="unmatched",server="gateway",status="404"}} 1.0' in text
    assert f'{count}{{route="/down",server="gateway",status="502"}} 1.0' in text
    upstream = "tokenward_upstream_latency_seconds_count"
    assert f'{upstream}{{route="{route}",status="200",upstream="records"}} 2.0' in text
    assert 'upstream="down"' not in text  # it never answered: no upstream latency
    assert issued.secret not in text and issued.record.id not in text


def test_the_docs_list_every_metric_and_only_those(services):
    """docs/observability.md names each ``tokenward_`` metric there is, and no other."""
    from tests.conftest import ROOT

    documented = set(re.findall(r"`(tokenward_[a-z_]+)`", (ROOT / OBSERVABILITY).read_text()))
    documented = {name.removesuffix("_total") for name in documented}
    assert services.metrics is not None
    exposed = {
        family.name
        for family in services.metrics.registry.collect()
        if family.name.startswith("tokenward_")
    }
    assert exposed == documented


OBSERVABILITY = "docs/observability.md"


def test_the_hot_path_histogram_exposes_what_prometheus_clients_would():
    """Same observations, same exposition as prometheus-client's own Histogram (bar the
    ``_created`` sample it adds), bounds and the +Inf bucket included."""
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from tokenward.metrics import LATENCY_BUCKETS, LatencyHistogram

    theirs, ours = CollectorRegistry(), CollectorRegistry()
    reference = Histogram("t_seconds", "doc", ["route"], buckets=LATENCY_BUCKETS, registry=theirs)
    mine = LatencyHistogram("t_seconds", "doc", ["route"], LATENCY_BUCKETS)
    ours.register(mine)
    for route, value in [("/a", 0.0005), ("/a", 0.0004), ("/a", 0.3), ("/b", 9.0), ("/b", 0.0)]:
        reference.labels(route).observe(value)
        mine.labels(route).observe(value)

    def lines(registry: CollectorRegistry) -> list[str]:
        text = generate_latest(registry).decode()
        return [line for line in text.splitlines() if "_created" not in line]

    assert lines(ours) == lines(theirs)
