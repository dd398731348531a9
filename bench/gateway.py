"""Benchmark 2: the built-in gateway vs a minimal Python reverse proxy vs nginx, same run.

All three sit in front of the same fast upstream (nginx answering 200):

* direct: wrk → upstream (the floor for added latency);
* minimal proxy: about 30 lines of aiohttp with a pooled client, no auth at all (written to
  a temp file below);
* nginx: proxy_pass with keep-alive upstream connections, no auth;
* tokenward gateway: token check, route policy, limits, access event, header rewriting.

Targets: gateway >= 0.9x the minimal proxy; added p50 over direct <= 1 ms.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from common import (
    LOAD_CPUS,
    SERVER_CPUS,
    free_port,
    nginx,
    process,
    ratio,
    tokenward,
    upstream_nginx_conf,
    write_policy,
    wrk,
)

MINIMAL_PROXY = """
import sys
from aiohttp import ClientSession, TCPConnector, web

UPSTREAM = sys.argv[2]
HOP = {"connection", "keep-alive", "transfer-encoding", "te", "upgrade", "host",
       "proxy-authorization", "proxy-authenticate", "trailer"}


async def proxy(request):
    headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
    body = request.content if request.can_read_body else None
    async with request.app["client"].request(
        request.method, UPSTREAM + request.path_qs, headers=headers, data=body,
        allow_redirects=False,
    ) as upstream:
        response = web.StreamResponse(status=upstream.status, headers={
            k: v for k, v in upstream.headers.items() if k.lower() not in HOP})
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


async def start(app):
    app["client"] = ClientSession(connector=TCPConnector(limit=100), auto_decompress=False)


async def stop(app):
    await app["client"].close()


app = web.Application()
app.router.add_route("*", "/{tail:.*}", proxy)
app.on_startup.append(start)
app.on_cleanup.append(stop)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
"""


def main() -> None:
    upstream, minimal, proxy_port, gw = free_port(), free_port(), free_port(), free_port()
    nginx_proxy = (
        f"upstream up {{ server 127.0.0.1:{upstream}; keepalive 64; }}"
        f" server {{ listen 127.0.0.1:{proxy_port}; keepalive_requests 100000;"
        " location / { proxy_pass http://up; proxy_http_version 1.1;"
        ' proxy_set_header Connection ""; } }'
    )
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "minimal_proxy.py"
        script.write_text(MINIMAL_PROXY)
        config = write_policy(tmp, upstream)
        path = "/records/7?fields=name"
        with (
            # The proxies share one core; wrk and the upstream the other (when there are two).
            nginx(upstream_nginx_conf(upstream), upstream, LOAD_CPUS) as upstream_pid,
            nginx(nginx_proxy, proxy_port, SERVER_CPUS) as nginx_pid,
            process(
                [sys.executable, str(script), str(minimal), f"http://127.0.0.1:{upstream}"],
                minimal,
                cpus=SERVER_CPUS,
            ) as minimal_pid,
            tokenward("gateway", gw, config, cpus=SERVER_CPUS) as (token, gateway_pid),
        ):
            auth = {"Authorization": f"Bearer {token}"}
            wrk("warm-up", f"http://127.0.0.1:{gw}{path}", auth, cpus=LOAD_CPUS)
            wrk("warm-up", f"http://127.0.0.1:{minimal}{path}", cpus=LOAD_CPUS)
            url = "http://127.0.0.1:{}" + path
            direct = wrk(
                "direct to the upstream (nginx 200)",
                url.format(upstream),
                None,
                [upstream_pid],
                cpus=SERVER_CPUS,  # the upstream's core is taken: wrk runs on the other
            )
            plain = wrk(
                "nginx proxy_pass, no auth",
                url.format(proxy_port),
                None,
                [nginx_pid],
                cpus=LOAD_CPUS,
            )
            mini = wrk(
                "minimal aiohttp proxy, no auth",
                url.format(minimal),
                None,
                [minimal_pid],
                cpus=LOAD_CPUS,
            )
            gateway = wrk(
                "tokenward gateway (auth, limits, audit)",
                url.format(gw),
                auth,
                [gateway_pid],
                cpus=LOAD_CPUS,
            )
            # Added latency, measured unsaturated (one connection): at -c32 a saturated
            # Python process's p50 is queueing (connections / throughput), not its cost.
            idle = [
                wrk(
                    f"{name}, 1 connection",
                    url.format(port),
                    headers,
                    connections="1",
                    cpus=SERVER_CPUS if port == upstream else LOAD_CPUS,
                )
                for name, port, headers in (
                    ("direct", upstream, None),
                    ("nginx proxy", proxy_port, None),
                    ("minimal proxy", minimal, None),
                    ("gateway", gw, auth),
                )
            ]
    for result in (direct, plain, mini, gateway):
        print(result.line())
    print(f"gateway vs minimal Python proxy: {ratio(gateway, mini)} (target >= 0.9x)")
    print(f"gateway vs nginx proxy:          {ratio(gateway, plain)}")
    for result in idle:
        print(result.line())
    base = idle[0].p50_ms
    print(
        f"added p50 over direct (1 connection): gateway {idle[3].p50_ms - base:+.2f} ms, "
        f"minimal proxy {idle[2].p50_ms - base:+.2f} ms, "
        f"nginx {idle[1].p50_ms - base:+.2f} ms (target <= 1 ms)"
    )


if __name__ == "__main__":
    main()
