"""OpenTelemetry traces: a span per request, a client's trace continued, the upstream told.

The spans are read with the SDK's in-memory exporter, from requests sent over real HTTP to
a running API (uvicorn) and gateway (aiohttp), in front of a real upstream that echoes the
headers it got. The ``OTEL_*`` variables are checked on a real ``tokenward serve``.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import uvicorn
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from tests.conftest import listening_socket, port_of, serve_tokenward, tokenward_cmd, truncate_all
from tests.gateway.support import POLICY, make_token, use_policy, uvicorn_server
from tests.test_metrics import observed_gateway
from tokenward import tracing
from tokenward.app import Services, create_asgi, open_services
from tokenward.bootstrap import issue_bootstrap_record
from tokenward.gateway.proxy import Gateway
from tokenward.service import Issued
from tokenward.settings import Settings
from tokenward.tokens.format import generate_token

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{CLIENT_SPAN}-01"


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    """Tracing on, into memory, for what is built during the test (then off again)."""
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    tracing.configure(provider)
    yield spans
    tracing.reset()
    provider.shutdown()


@pytest.fixture
async def traced(exporter: InMemorySpanExporter, settings: Settings) -> AsyncIterator[Services]:
    """Services opened while tracing is on (so decisions become span attributes)."""
    services = await open_services(settings)
    await truncate_all(services)
    try:
        yield services
    finally:
        await services.close()


@pytest.fixture
async def root(traced: Services) -> Issued:
    """A global admin credential of the traced services."""
    issued = issue_bootstrap_record(traced.hasher, traced.verifier.clock())
    await traced.store.insert_token(issued.record, traced.hasher.hash(issued.secret))
    return issued


def server_spans(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.kind is SpanKind.SERVER]


def no_secret_in(span: ReadableSpan, secret: str) -> None:
    values = [str(v) for v in (span.attributes or {}).values()]
    values += [str(v) for e in span.events for v in (e.attributes or {}).values()]
    assert all(secret not in value for value in values)


async def test_a_verify_request_continues_the_clients_trace(traced, root, exporter):
    issued = await make_token(traced, root)
    base = "http://127.0.0.1:{}"
    auth = {"Authorization": f"Bearer {root.secret}"}
    async with (
        uvicorn_server(create_asgi(services=traced)) as port,
        httpx.AsyncClient(base_url=base.format(port), headers=auth) as client,
    ):
        r = await client.post(
            "/v1/verify",
            json={"token": issued.secret},
            headers={"traceparent": TRACEPARENT, "tracestate": "vendor=x"},
        )
        assert r.status_code == 200 and r.json()["valid"]
        await client.post("/v1/verify", json={"token": generate_token("live")})
    allowed, denied = server_spans(exporter)
    assert allowed.name == "POST /v1/verify"
    assert f"{allowed.context.trace_id:032x}" == TRACE_ID  # the client's trace
    assert allowed.parent is not None and f"{allowed.parent.span_id:016x}" == CLIENT_SPAN
    assert allowed.parent.is_remote
    attributes = dict(allowed.attributes or {})
    assert attributes["tokenward.decision"] == "allow"
    assert attributes["tokenward.reason"] == "ok"
    assert attributes["tokenward.token.id"] == issued.record.id
    assert attributes["tokenward.project"] == "shop"
    assert attributes["tokenward.source"] == "verify_api"
    assert attributes["http.route"] == "/v1/verify"
    assert attributes["http.response.status_code"] == 200
    assert attributes["http.request.method"] == "POST"
    assert float(attributes["tokenward.audit.wait_ms"]) >= 0  # type: ignore[arg-type]
    no_secret_in(allowed, issued.secret)
    # No traceparent: a trace of its own (a root span); the denial and its reason.
    assert denied.parent is None and denied.context.trace_id != allowed.context.trace_id
    assert denied.attributes is not None
    assert denied.attributes["tokenward.decision"] == "deny"
    assert denied.attributes["tokenward.reason"] == "unknown"
    assert "tokenward.token.id" not in denied.attributes


async def test_other_routes_and_authz_get_a_span_named_by_their_template(traced, root, exporter):
    admin = root
    use_policy(traced, POLICY.format(port=9, dead_port=9))
    reader = await make_token(traced, root)
    async with uvicorn_server(create_asgi(services=traced)) as port:
        headers = {"Authorization": f"Bearer {admin.secret}"}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            r = await client.get(f"/v1/tokens/{reader.record.id}", headers=headers)
            assert r.status_code == 200
            nginx = {
                "Authorization": f"Bearer {reader.secret}",
                "X-Original-Method": "GET",
                "X-Original-URI": "/records/7",
                "traceparent": TRACEPARENT,
            }
            assert (await client.get("/authz", headers=nginx)).status_code == 200
            assert (await client.get("/nowhere/at/all")).status_code == 404
    read, authz, missing = server_spans(exporter)
    assert read.name == "GET /v1/tokens/{token_id}"
    assert read.attributes is not None and read.attributes["tokenward.source"] == "admin_auth"
    assert authz.name == "GET /authz" and authz.attributes is not None
    assert authz.attributes["tokenward.token.id"] == reader.record.id
    assert authz.attributes["tokenward.scope"] == "records:read"
    assert f"{authz.context.trace_id:032x}" == TRACE_ID
    assert missing.name == "GET unmatched"  # never the path: names stay a bounded set
    for span in (read, authz, missing):
        no_secret_in(span, admin.secret)
        no_secret_in(span, reader.secret)


async def test_the_gateway_passes_its_own_span_on_to_the_upstream(traced, root, exporter):
    issued = await make_token(traced, root)
    async with observed_gateway(traced) as (gw, _sink):
        r = await gw.get(
            "/records/1",
            headers={
                "Authorization": f"Bearer {issued.secret}",
                "traceparent": TRACEPARENT,
                "tracestate": "vendor=x",
            },
        )
        assert r.status_code == 200
        denied = await gw.get("/records/1")
        assert denied.status_code == 401
    [span, denial] = server_spans(exporter)
    assert span.name == "GET /records/{rest:path}"
    assert f"{span.context.trace_id:032x}" == TRACE_ID
    assert span.parent is not None and f"{span.parent.span_id:016x}" == CLIENT_SPAN
    seen = r.json()["headers"]
    # The upstream's parent is tokenward's span, in the client's trace; its state goes on.
    assert seen["traceparent"] == f"00-{TRACE_ID}-{span.context.span_id:016x}-01"
    assert seen["tracestate"] == "vendor=x"
    attributes = dict(span.attributes or {})
    assert attributes["tokenward.decision"] == "allow"
    assert attributes["tokenward.token.id"] == issued.record.id
    assert attributes["tokenward.project"] == "shop"
    assert str(attributes["tokenward.route"]).endswith(":/records/{rest:path}")
    assert attributes["tokenward.upstream"] == "records"
    assert attributes["tokenward.source"] == "gateway"
    assert float(attributes["tokenward.audit.wait_ms"]) >= 0  # type: ignore[arg-type]
    assert float(attributes["tokenward.upstream.latency_ms"]) > 0  # type: ignore[arg-type]
    assert attributes["http.response.status_code"] == 200
    no_secret_in(span, issued.secret)
    assert denial.attributes is not None
    assert denial.attributes["tokenward.reason"] == "missing_credential"
    assert "tokenward.upstream" not in denial.attributes


async def test_tracing_off_forwards_the_clients_trace_context_as_sent(services, admin):
    assert tracing.tracer() is None  # no OTEL_* variable: off
    issued = await make_token(services, admin)
    async with observed_gateway(services) as (gw, _sink):
        r = await gw.get(
            "/records/1",
            headers={"Authorization": f"Bearer {issued.secret}", "traceparent": TRACEPARENT},
        )
    assert r.json()["headers"]["traceparent"] == TRACEPARENT


def test_tracing_is_off_unless_an_exporter_or_endpoint_is_named():
    names = tracing.exporter_names
    assert names({}) == []
    assert names({"OTEL_TRACES_EXPORTER": "none"}) == []
    assert names({"OTEL_TRACES_EXPORTER": "console"}) == ["console"]
    assert names({"OTEL_TRACES_EXPORTER": "otlp, console"}) == ["otlp", "console"]
    assert names({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}) == ["otlp"]
    assert names({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "x"}) == []
    disabled = {"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "console"}
    assert names(disabled) == []


def test_the_sdk_reads_the_sampler_service_name_and_exporter(monkeypatch):
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    provider = tracing.provider_from_environment()
    assert provider is not None
    assert provider.sampler.get_description() == "AlwaysOffSampler"
    assert provider.resource.attributes["service.name"] == "tokenward"
    monkeypatch.setenv("OTEL_SERVICE_NAME", "edge-auth")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0.25")
    provider = tracing.provider_from_environment()
    assert provider is not None
    assert provider.resource.attributes["service.name"] == "edge-auth"
    assert "TraceIdRatioBased{0.25}" in provider.sampler.get_description()
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "no-such-exporter")
    with pytest.raises(tracing.TracingUnavailable, match="no-such-exporter"):
        tracing.provider_from_environment()


# -- the OTEL_* variables, on a real server ------------------------------------------------


class Collector:
    """An OTLP/HTTP receiver: keeps the spans posted to ``/v1/traces``."""

    def __init__(self) -> None:
        self.spans: list[object] = []
        self.arrived = asyncio.Event()

    async def traces(self, request: web.Request) -> web.Response:
        message = ExportTraceServiceRequest()
        message.ParseFromString(await request.read())
        for resource_spans in message.resource_spans:
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append((resource_spans.resource, span))
        self.arrived.set()
        return web.Response(status=200, content_type="application/x-protobuf")


async def test_a_served_server_exports_to_the_otlp_endpoint_it_is_given(tmp_path):
    collector = Collector()
    app = web.Application()
    app.router.add_post("/v1/traces", collector.traces)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = listening_socket()
    await web.SockSite(runner, sock).start()
    env = {
        **os.environ,
        "TOKENWARD_DATA_DIR": str(tmp_path),
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port_of(sock)}",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_SERVICE_NAME": "tokenward-test",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    init = await asyncio.to_thread(_run, tokenward_cmd("init", "--json"), env)
    admin = json.loads(init)["admin_token"]
    served = await asyncio.to_thread(serve_tokenward, env=env)
    try:
        async with httpx.AsyncClient(base_url=served.url) as client:
            r = await client.post(
                "/v1/verify",
                json={"token": admin},
                headers={"traceparent": TRACEPARENT, "Authorization": f"Bearer {admin}"},
            )
            assert r.status_code == 200
        async with asyncio.timeout(30):
            while not any(span.name == "POST /v1/verify" for _, span in collector.spans):  # type: ignore[attr-defined]
                collector.arrived.clear()
                await collector.arrived.wait()
    finally:
        served.stop()
        await runner.cleanup()
        sock.close()
    resource, span = next(
        (r, s)
        for r, s in collector.spans
        if s.name == "POST /v1/verify"  # type: ignore[attr-defined]
    )
    assert span.trace_id.hex() == TRACE_ID and span.parent_span_id.hex() == CLIENT_SPAN  # type: ignore[attr-defined]
    attributes = {a.key: a.value.string_value for a in span.attributes}  # type: ignore[attr-defined]
    assert attributes["tokenward.decision"] == "allow"
    assert admin not in repr(span)
    service = {a.key: a.value.string_value for a in resource.attributes}  # type: ignore[attr-defined]
    assert service["service.name"] == "tokenward-test"


def _run(command: list[str], env: dict[str, str]) -> str:
    import subprocess

    done = subprocess.run(command, env=env, capture_output=True, check=True, timeout=60)
    return done.stdout.decode()


async def test_an_mcp_route_passes_the_span_on_and_records_each_message(traced, root, exporter):
    from tests.gateway.test_mcp import AGENT, files_server
    from tests.gateway.test_mcp import POLICY as MCP_POLICY

    seen: list[dict[bytes, bytes]] = []
    mcp_app = files_server().streamable_http_app(json_response=True)

    async def recording(scope, receive, send):  # the MCP server, and the headers it got
        if scope["type"] == "http":
            seen.append(dict(scope["headers"]))
        await mcp_app(scope, receive, send)

    issued = await make_token(traced, root, scopes=AGENT)
    sock = listening_socket()
    server = uvicorn.Server(uvicorn.Config(recording, log_level="error", lifespan="on"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    use_policy(traced, MCP_POLICY.format(port=port_of(sock)))
    gateway = Gateway(traced.enforcement)
    gateway_sock = listening_socket()
    await gateway.start("127.0.0.1", 0, sock=gateway_sock)
    headers = {
        "Authorization": f"Bearer {issued.secret}",
        "Accept": "application/json, text/event-stream",
        "traceparent": TRACEPARENT,
    }
    initialize = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "test", "version": "1"},
        },
    }
    denied = {
        "jsonrpc": "2.0",
        "id": 2,
        "method": "tools/call",
        "params": {"name": "delete_records", "arguments": {"table": "users"}},
    }
    try:
        url = f"http://127.0.0.1:{port_of(gateway_sock)}/mcp"
        async with httpx.AsyncClient(headers=headers, timeout=10) as client:
            first = await client.post(url, json=initialize)
            assert first.status_code == 200, first.text
            session = {"Mcp-Session-Id": first.headers.get("mcp-session-id", "")}
            second = await client.post(url, json=denied, headers=session)
            assert second.json()["error"]["code"] < 0
    finally:
        await gateway.aclose()
        gateway_sock.close()
        server.should_exit = True
        await task
        sock.close()
    started, refused = server_spans_of(exporter, "POST /mcp")
    assert seen[0][b"traceparent"] == f"00-{TRACE_ID}-{started.context.span_id:016x}-01".encode()
    assert started.attributes is not None and started.attributes["tokenward.decision"] == "allow"
    # the HTTP request was allowed (base scope); its message was not: a span event
    assert refused.attributes is not None and refused.attributes["tokenward.decision"] == "allow"
    [event] = [e for e in refused.events if e.name == "tokenward.decision"]
    assert event.attributes is not None
    assert event.attributes["tokenward.decision"] == "deny"
    assert event.attributes["tokenward.reason"] == "insufficient_scope"
    assert event.attributes["tokenward.source"] == "mcp"
    no_secret_in(started, issued.secret)
    no_secret_in(refused, issued.secret)


def server_spans_of(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in server_spans(exporter) if s.name == name]
