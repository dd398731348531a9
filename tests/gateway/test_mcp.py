"""A real MCP server (Streamable HTTP) behind the gateway, and the real MCP client through it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator

import httpx
import httpx2
import pytest
import uvicorn
from aiohttp import web
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.server.mcpserver import MCPServer
from mcp.shared.exceptions import MCPError

from tests.gateway.support import make_token, use_policy
from tokenward.anomaly.store import AlertFilter
from tokenward.gateway import ConfigError, parse_policy
from tokenward.gateway import mcp as mcp_gateway
from tokenward.gateway.mcp import DENIED, required_scope
from tokenward.gateway.proxy import Gateway

POLICY = """
[[upstreams]]
name = "files-mcp"
url = "http://127.0.0.1:{port}"

[[routes]]
upstream = "files-mcp"
path = "/mcp"
mcp = "files"
"""
AGENT = ["mcp:files:connect", "mcp:files:tools/call:search", "mcp:files:prompts/get:summary"]


def files_server() -> MCPServer:
    server = MCPServer("files")

    @server.tool()
    async def search(query: str) -> str:
        """Find records."""
        return f"found {query}"

    @server.tool()
    async def delete_records(table: str) -> str:
        """Delete every record of a table."""
        return f"deleted {table}"

    @server.tool()
    async def slow(seconds: float) -> str:
        await asyncio.sleep(seconds)
        return "done"

    @server.prompt()
    def summary(topic: str) -> str:
        return f"Summarise {topic}"

    @server.prompt()
    def secret_prompt() -> str:
        return "hidden"

    @server.resource("notes://today")
    def notes() -> str:
        return "the notes"

    return server


def _bound() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


@contextlib.asynccontextmanager
async def mcp_upstream(*, json_response: bool = False) -> AsyncIterator[int]:
    """The MCP server on uvicorn, on a socket bound to port 0; yields its port."""
    app = files_server().streamable_http_app(json_response=json_response)
    sock = _bound()
    server = uvicorn.Server(uvicorn.Config(app, log_level="error", lifespan="on"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
        if task.done():
            task.result()
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        await task


@contextlib.asynccontextmanager
async def mcp_behind_gateway(services, *, json_response: bool = False):
    async with mcp_upstream(json_response=json_response) as port:
        sink = use_policy(services, POLICY.format(port=port))
        gateway = Gateway(services.enforcement)
        sock = _bound()
        await gateway.start("127.0.0.1", 0, sock=sock)
        try:
            yield f"http://127.0.0.1:{sock.getsockname()[1]}/mcp", sink
        finally:
            await gateway.aclose()


@contextlib.asynccontextmanager
async def session(url: str, secret: str) -> AsyncIterator[ClientSession]:
    headers = {"Authorization": f"Bearer {secret}"}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=10) as http,
        streamable_http_client(url, http_client=http) as streams,
        ClientSession(*streams[:2]) as client,
    ):
        await client.initialize()
        yield client


def mcp_events(sink):
    return [e for e in sink.access_events if e.source == "mcp"]


@pytest.mark.parametrize("json_response", [False, True], ids=["sse", "json"])
async def test_an_agent_calls_only_the_tools_its_token_names(services, admin, json_response):
    issued = await make_token(services, admin, scopes=AGENT)
    async with (
        mcp_behind_gateway(services, json_response=json_response) as (url, sink),
        session(url, issued.secret) as client,
    ):
        tools = await client.list_tools()
        assert [t.name for t in tools.tools] == ["search"]  # filtered to what it may call
        prompts = await client.list_prompts()
        assert [p.name for p in prompts.prompts] == ["summary"]
        result = await client.call_tool("search", {"query": "invoices"})
        assert not result.is_error and result.content[0].text == "found invoices"
        with pytest.raises(MCPError) as denied:
            await client.call_tool("delete_records", {"table": "invoices"})
        assert denied.value.error.code == DENIED
        assert "mcp:files:tools/call:delete_records" in denied.value.error.message
        with pytest.raises(MCPError):
            await client.get_prompt("secret_prompt")
        # a URI holds ':': reading it needs mcp:files:resources/read:*, which AGENT lacks
        assert (await client.list_resources()).resources == []
    allowed, refused, prompt = mcp_events(sink)
    assert (allowed.method, allowed.path, allowed.scope) == (
        "tools/call",
        "search",
        "mcp:files:tools/call:search",
    )
    assert allowed.decision.allowed and allowed.latency_ms > 0
    assert allowed.decision.token is not None
    assert allowed.decision.token.id == issued.record.id
    assert (refused.method, refused.path) == ("tools/call", "delete_records")
    assert not refused.decision.allowed
    assert refused.decision.reason.value == "insufficient_scope"
    assert (prompt.method, prompt.path, prompt.decision.allowed) == (
        "prompts/get",
        "secret_prompt",
        False,
    )
    # the session's HTTP requests (initialize, notifications, the GET stream, DELETE) are
    # each decided with the base scope, as on any route
    http = [e for e in sink.access_events if e.source == "gateway"]
    assert {e.method for e in http} >= {"POST", "DELETE"}
    assert all(e.scope == "mcp:files:connect" and e.decision.allowed for e in http)


async def test_revoking_the_token_stops_the_next_call(services, admin, monkeypatch):
    monkeypatch.setattr(mcp_gateway, "STREAM_RECHECK", 0.05)
    issued = await make_token(services, admin, scopes=AGENT)
    async with mcp_behind_gateway(services) as (url, sink):
        with pytest.raises(Exception) as cut:  # noqa: PT011 (the client's own error type)
            async with session(url, issued.secret) as client:
                assert (await client.call_tool("search", {"query": "a"})).content
                await services.tokens.revoke_token(admin.record, issued.record.id, "test")
                await client.call_tool("search", {"query": "b"})
        assert cut.value is not None
        # the server's stream (GET) of the session is ended too, and that is audited
        for _ in range(100):
            if any(e.method == "GET" for e in mcp_events(sink)):
                break
            await asyncio.sleep(0.02)
    denied = [e for e in sink.access_events if not e.decision.allowed]
    assert denied and denied[0].decision.reason.value == "revoked"
    assert [e.path for e in mcp_events(sink) if e.decision.allowed] == ["search"]
    [cut_stream] = [e for e in mcp_events(sink) if e.method == "GET"]
    assert cut_stream.decision.reason.value == "revoked"


async def test_a_token_without_the_base_scope_cannot_connect(services, admin):
    issued = await make_token(services, admin, scopes=["mcp:files:tools/call:search"])
    async with mcp_behind_gateway(services) as (url, _sink), httpx.AsyncClient() as http:
        r = await http.post(url, headers=_headers(issued.secret), json=_request(1, "ping"))
        assert r.status_code == 403 and r.json()["scope"] == "mcp:files:connect"


async def test_raw_json_rpc_through_the_session_flow(services, admin):
    """Raw JSON-RPC: initialize, a notification, a denied call, bad bodies, DELETE."""
    issued = await make_token(services, admin, scopes=AGENT)
    async with (
        mcp_behind_gateway(services, json_response=True) as (url, sink),
        httpx.AsyncClient() as http,
    ):
        headers = _headers(issued.secret)
        init = _request(0, "initialize", _INIT)
        r = await http.post(url, headers=headers, json=init)
        assert r.status_code == 200, r.text
        headers["Mcp-Session-Id"] = r.headers["mcp-session-id"]
        headers["MCP-Protocol-Version"] = r.json()["result"]["protocolVersion"]
        note = {"jsonrpc": "2.0", "method": "notifications/initialized"}
        assert (await http.post(url, headers=headers, json=note)).status_code == 202
        # one denied call alone: answered by the gateway, the server never sees it
        r = await http.post(url, headers=headers, json=_call(7, "delete_records", table="x"))
        assert r.status_code == 200
        assert r.json()["id"] == 7 and r.json()["error"]["code"] == DENIED
        assert r.json()["error"]["data"]["scope"] == "mcp:files:tools/call:delete_records"
        r = await http.post(url, headers=headers, content=b"{not json")
        assert r.status_code == 400 and r.json()["error"]["code"] == -32700
        # a repeated key: parsers disagree on which counts, so the message is refused
        repeated = b'{"jsonrpc":"2.0","id":9,"method":"tools/call","params":'
        repeated += b'{"name":"search","name":"delete_records","arguments":{}}}'
        r = await http.post(url, headers=headers, content=repeated)
        assert r.status_code == 400 and r.json()["error"]["code"] == -32700
        r = await http.post(url, headers=headers, json=[])
        assert r.status_code == 400 and r.json()["error"]["code"] == -32600
        r = await http.post(url, headers=headers, json=[_request(i, "ping") for i in range(65)])
        assert r.status_code == 400 and r.json()["error"]["code"] == -32600
        # the server's own stream of the session, and its end, pass through
        r = await http.delete(url, headers=headers)
        assert r.status_code in (200, 204), r.text
    denied = [e for e in mcp_events(sink) if not e.decision.allowed]
    assert [e.path for e in denied] == ["delete_records"]


_SEEN = web.AppKey("seen", list)


async def _batch_server(request: web.Request) -> web.StreamResponse:
    """A JSON-RPC server that still takes batches (MCP 2025-03-26), answering in JSON or,
    with ``X-Mode: sse``, as server-sent events (one event per answer)."""
    received = json.loads(await request.read())
    request.app[_SEEN].append(received)
    answers = []
    for message in received if isinstance(received, list) else [received]:
        if "id" not in message:
            continue
        if message["method"] == "tools/list":
            tools = [{"name": n, "inputSchema": {}} for n in ("search", "delete_records")]
            result: dict[str, object] = {"tools": tools}
        else:
            result = {"content": [{"type": "text", "text": message["params"]["name"]}]}
        answers.append({"jsonrpc": "2.0", "id": message["id"], "result": result})
    if not answers:
        return web.Response(status=202)
    if request.headers.get("X-Mode") != "sse":
        return web.json_response(answers if isinstance(received, list) else answers[0])
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    for number, answer in enumerate(answers):
        await response.write(f"id: {number}\nevent: message\ndata: ".encode())
        await response.write(json.dumps(answer).encode() + b"\r\n\r\n")  # split, CRLF
    await response.write_eof()
    return response


@pytest.mark.parametrize("mode", ["json", "sse"])
async def test_a_batch_is_decided_message_by_message(services, admin, mode):
    issued = await make_token(services, admin, scopes=AGENT)
    app = web.Application()
    app[_SEEN] = []
    app.router.add_post("/mcp", _batch_server)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    upstream, gateway_sock = _bound(), _bound()
    await web.SockSite(runner, upstream).start()
    sink = use_policy(services, POLICY.format(port=upstream.getsockname()[1]))
    gateway = Gateway(services.enforcement)
    await gateway.start("127.0.0.1", 0, sock=gateway_sock)
    url = f"http://127.0.0.1:{gateway_sock.getsockname()[1]}/mcp"
    headers = {**_headers(issued.secret), "X-Mode": mode}
    try:
        async with httpx.AsyncClient() as http:
            batch = [
                _request(1, "tools/list"),
                _call(2, "search", query="q"),
                _call(3, "delete_records", table="t"),
                {"jsonrpc": "2.0", "method": "notifications/progress", "params": {}},
            ]
            r = await http.post(url, headers=headers, json=batch)
            assert r.status_code == 200, r.text
            if mode == "sse":
                assert r.headers["content-type"].startswith("text/event-stream")
                events = [e for e in r.text.replace("\r\n", "\n").split("\n\n") if e]
                answers = [
                    json.loads(line[5:])
                    for e in events
                    for line in e.split("\n")
                    if line.startswith("data:")
                ]
                assert any(e.startswith("id: 0") for e in events)  # event ids are kept
            else:
                answers = r.json()
            by_id = {a["id"]: a for a in answers}
            assert [t["name"] for t in by_id[1]["result"]["tools"]] == ["search"]
            assert by_id[2]["result"]["content"][0]["text"] == "search"
            assert by_id[3]["error"]["code"] == DENIED
            # only a denied request and a notification: the notification goes, the error
            # comes back (the upstream's 202 becomes the gateway's 200)
            only = [_call(4, "delete_records"), batch[3]]
            r = await http.post(url, headers=headers, json=only)
            assert r.status_code == 200 and [a["id"] for a in r.json()] == [4]
    finally:
        await gateway.aclose()
        await runner.cleanup()
    sent = json.dumps(app[_SEEN])
    assert "delete_records" not in sent  # a denied call never reaches the server
    audited = [(e.path, e.decision.allowed) for e in mcp_events(sink)]
    assert audited == [("delete_records", False), ("search", True), ("delete_records", False)]


async def test_denied_tool_calls_are_scope_probing(services, admin):
    """The scope probing detector counts denied tool calls: five in a row raise an alert."""
    issued = await make_token(services, admin, scopes=AGENT)
    async with mcp_behind_gateway(services) as (url, _sink), session(url, issued.secret) as c:
        for tool in ("delete_records", "slow", "drop", "export", "delete_records"):
            with pytest.raises(MCPError):
                await c.call_tool(tool, {})
    assert services.anomaly is not None
    found, _ = await services.anomaly.store.list_alerts(
        AlertFilter(detector="scope_probing", token_id=issued.record.id)
    )
    assert len(found) == 1
    assert "mcp:files:tools/call:delete_records" in found[0].evidence["scopes_tried"]


async def test_a_token_for_every_resource_lists_and_reads_them(services, admin):
    issued = await make_token(services, admin, scopes=[*AGENT, "mcp:files:resources/read:*"])
    async with mcp_behind_gateway(services) as (url, sink), session(url, issued.secret) as c:
        [listed] = (await c.list_resources()).resources
        assert str(listed.uri) == "notes://today"
        read = await c.read_resource("notes://today")
        assert read.contents[0].text == "the notes"
    [event] = mcp_events(sink)
    assert (event.method, event.path) == ("resources/read", "notes://today")
    assert event.scope == "mcp:files:resources/read:*"


async def test_an_allowed_call_is_audited_with_its_duration(services, admin):
    issued = await make_token(services, admin, scopes=[*AGENT, "mcp:files:tools/call:slow"])
    async with mcp_behind_gateway(services) as (url, sink), session(url, issued.secret) as c:
        await c.call_tool("slow", {"seconds": 0.2})
    [event] = mcp_events(sink)
    assert event.path == "slow" and event.latency_ms >= 200


def test_scopes_of_each_method():
    assert required_scope("f", "initialize", {}) == "mcp:f:connect"
    assert required_scope("f", "notifications/initialized", None) == "mcp:f:connect"
    assert required_scope("f", "tools/list", {}) == "mcp:f:connect"
    assert required_scope("f", "tools/call", {"name": "search"}) == "mcp:f:tools/call:search"
    assert required_scope("f", "prompts/get", {"name": "p"}) == "mcp:f:prompts/get:p"
    assert required_scope("f", "resources/read", {"uri": "notes"}) == "mcp:f:resources/read:notes"
    # what cannot be one scope segment needs the family's wildcard
    uri = {"uri": "file:///etc/passwd"}
    assert required_scope("f", "resources/read", uri) == "mcp:f:resources/read:*"
    assert required_scope("f", "resources/subscribe", uri) == "mcp:f:resources/read:*"
    assert required_scope("f", "tools/call", {"name": "a:b"}) == "mcp:f:tools/call:*"
    assert required_scope("f", "tools/call", {"name": "*"}) == "mcp:f:tools/call:*"
    assert required_scope("f", "tools/call", {}) == "mcp:f:tools/call:*"
    assert required_scope("f", "tasks/get", {}) == "mcp:f:tasks/get"


def test_an_mcp_route_is_checked_and_not_served_by_authz():
    text = POLICY.format(port=1)
    policy = parse_policy(text)
    [route] = policy.routes
    assert route.mcp == "files" and route.scope == "mcp:files:connect"
    assert route.methods == {"GET", "HEAD", "POST", "DELETE"}
    assert policy.match("POST", "/mcp", proxied=True) is not None
    assert policy.match("POST", "/mcp") is None  # /authz cannot read the messages
    with pytest.raises(ConfigError, match="an mcp route needs an upstream"):
        parse_policy('[[routes]]\npath = "/mcp"\nmcp = "files"\n')


_INIT = {
    "protocolVersion": "2025-06-18",
    "capabilities": {},
    "clientInfo": {"name": "test", "version": "1"},
}


def _headers(secret: str) -> dict[str, str]:
    return {
        "Authorization": f"Bearer {secret}",
        "Accept": "application/json, text/event-stream",
        "Content-Type": "application/json",
    }


def _request(request_id: object, method: str, params: object = None) -> dict[str, object]:
    message: dict[str, object] = {"jsonrpc": "2.0", "id": request_id, "method": method}
    if params is not None:
        message["params"] = params
    return message


def _call(request_id: object, tool: str, **arguments: object) -> dict[str, object]:
    return _request(request_id, "tools/call", {"name": tool, "arguments": arguments})
