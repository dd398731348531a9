"""Benchmark 3: nginx + auth_request → tokenward /authz vs nginx proxying without auth.

Same nginx, same fast upstream, same run; the auth_request configuration is the documented
one (docs/proxies/nginx.conf). For scale: published figures for a popular API gateway show
~24% less throughput with key auth and rate limiting turned on.
"""

from __future__ import annotations

import tempfile

from common import ROOT, free_port, nginx, ratio, tokenward, upstream_nginx_conf, write_policy, wrk


def main() -> None:
    upstream, tw, with_auth, without = free_port(), free_port(), free_port(), free_port()
    site = (ROOT / "docs" / "proxies" / "nginx.conf").read_text()
    site = (
        site.replace("127.0.0.1:8080", f"127.0.0.1:{tw}")
        .replace("127.0.0.1:9001", f"127.0.0.1:{upstream}")
        .replace("127.0.0.1:8000", f"127.0.0.1:{with_auth}")
        .replace("upstream backend", "upstream backend_auth")
        .replace("http://backend;", "http://backend_auth;")
    )
    plain = (
        f"upstream plain {{ server 127.0.0.1:{upstream}; keepalive 64; }}"
        f" server {{ listen 127.0.0.1:{without}; keepalive_requests 100000;"
        " location / { proxy_pass http://plain; proxy_http_version 1.1;"
        ' proxy_set_header Connection ""; } }'
    )
    path = "/records/7?fields=name"
    with tempfile.TemporaryDirectory() as tmp:
        config = write_policy(tmp, upstream)
        with (
            tokenward("api", tw, config) as (token, tokenward_pid),
            nginx(upstream_nginx_conf(upstream), upstream),
            nginx(plain + site, without) as nginx_pid,
        ):
            auth = {"Authorization": f"Bearer {token}"}
            wrk("warm-up", f"http://127.0.0.1:{with_auth}{path}", auth)
            bare = wrk(
                "nginx proxy_pass, no auth", f"http://127.0.0.1:{without}{path}", None, [nginx_pid]
            )
            authed = wrk(
                "nginx + auth_request -> tokenward /authz",
                f"http://127.0.0.1:{with_auth}{path}",
                auth,
                [nginx_pid, tokenward_pid],
            )
    print(bare.line())
    print(authed.line())
    print(f"with auth_request vs without: {ratio(authed, bare)}")


if __name__ == "__main__":
    main()
