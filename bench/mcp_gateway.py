"""Benchmark: the latency an MCP tool call gains through the gateway, p50 and p99.

A real MCP server (the SDK's MCPServer over Streamable HTTP on uvicorn, in a child process)
with one tool; tokenward's built-in gateway in front of it (``bench/serve.py gateway``, with
an ``mcp`` route). One client sends raw JSON-RPC ``tools/call`` POSTs, one at a time over a
keep-alive connection, in the same session flow the SDK's client uses (initialize, then the
calls with ``Mcp-Session-Id``), alternating blocks direct and through the gateway so that
drift hits both alike. Measured for both answer framings: server-sent events (the SDK's
default, which the gateway parses event by event) and JSON.

Through the gateway each call is: decision with the base scope (token, limits, access
event), the body read and decided message by message (``mcp:bench:tools/call:echo``), the
answer parsed to audit the call with its duration (a second access event).
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from common import free_port, process, tokenward

CALLS = int(os.environ.get("BENCH_CALLS", "2000"))
BLOCK = 100

SERVER = """
import sys
import uvicorn
from mcp.server.mcpserver import MCPServer

server = MCPServer("bench")


@server.tool()
async def echo(text: str) -> str:
    return text


app = server.streamable_http_app(json_response=sys.argv[2] == "json")
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="error")
"""


def policy(directory: str, upstream_port: int) -> str:
    path = Path(directory) / "tokenward.toml"
    path.write_text(
        f'[[upstreams]]\nname = "mcp"\nurl = "http://127.0.0.1:{upstream_port}"\n\n'
        '[[routes]]\nupstream = "mcp"\npath = "/mcp"\nmcp = "bench"\n'
    )
    return str(path)


class Session:
    """A raw Streamable HTTP session: initialize, then tools/call POSTs."""

    def __init__(self, url: str, token: str | None) -> None:
        self.url = url
        self.headers = {
            "Accept": "application/json, text/event-stream",
            "Content-Type": "application/json",
        }
        if token:
            self.headers["Authorization"] = f"Bearer {token}"
        self.client = httpx.Client(timeout=10)
        self.next_id = 0

    def post(self, method: str, params: dict[str, object], notify: bool = False) -> httpx.Response:
        message: dict[str, object] = {"jsonrpc": "2.0", "method": method, "params": params}
        if not notify:
            self.next_id += 1
            message["id"] = self.next_id
        r = self.client.post(self.url, headers=self.headers, json=message)
        r.raise_for_status()
        return r

    def open(self) -> None:
        r = self.post(
            "initialize",
            {
                "protocolVersion": "2025-06-18",
                "capabilities": {},
                "clientInfo": {"name": "bench", "version": "1"},
            },
        )
        self.headers["Mcp-Session-Id"] = r.headers["mcp-session-id"]
        self.post("notifications/initialized", {}, notify=True)

    def call(self) -> float:
        started = time.perf_counter()
        r = self.post("tools/call", {"name": "echo", "arguments": {"text": "hello"}})
        elapsed = time.perf_counter() - started
        if b"hello" not in r.content:
            raise RuntimeError(f"unexpected answer: {r.text[:200]}")
        return elapsed * 1000


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))]


def measure(mode: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "mcp_server.py"
        script.write_text(SERVER)
        mcp_port, gateway_port = free_port(), free_port()
        server = [sys.executable, str(script), str(mcp_port), mode]
        admin: list[str] = []
        with (
            process(server, mcp_port),
            tokenward("gateway", gateway_port, config=policy(tmp, mcp_port), admin_out=admin) as (
                _,
                _pid,
            ),
        ):
            # the bench server's admin credential holds "*": it covers mcp:bench:*
            direct = Session(f"http://127.0.0.1:{mcp_port}/mcp", None)
            gated = Session(f"http://127.0.0.1:{gateway_port}/mcp", admin[0])
            direct.open()
            gated.open()
            for _ in range(50):  # warm up both paths
                direct.call()
                gated.call()
            times: dict[str, list[float]] = {"direct": [], "gateway": []}
            for _ in range(CALLS // BLOCK):
                times["direct"] += [direct.call() for _ in range(BLOCK)]
                times["gateway"] += [gated.call() for _ in range(BLOCK)]
    d50, d99 = percentile(times["direct"], 0.5), percentile(times["direct"], 0.99)
    g50, g99 = percentile(times["gateway"], 0.5), percentile(times["gateway"], 0.99)
    print(f"answers as {mode} ({CALLS} sequential tools/call each)")
    print(f"  direct            p50 {d50:6.2f} ms   p99 {d99:6.2f} ms")
    print(f"  through tokenward p50 {g50:6.2f} ms   p99 {g99:6.2f} ms")
    print(
        f"  added             p50 {g50 - d50:6.2f} ms   p99 {g99 - d99:6.2f} ms"
        f"   (mean {statistics.fmean(times['gateway']) - statistics.fmean(times['direct']):.2f} ms)"
    )


if __name__ == "__main__":
    for framing in ("sse", "json"):
        measure(framing)
