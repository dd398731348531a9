"""Benchmark 1: /authz decisions per second (valid token, warm cache) vs a bare 200 route.

Both run on the same server stack (uvicorn, one process) in the same run. Target: >= 0.7x.
"""

from __future__ import annotations

import tempfile

from common import LOAD_CPUS, SERVER_CPUS, free_port, ratio, tokenward, write_policy, wrk


def main() -> None:
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        config = write_policy(tmp, free_port())
        with tokenward("api", port, config, cpus=SERVER_CPUS) as (token, pid):
            base = f"http://127.0.0.1:{port}"
            headers = {
                "Authorization": f"Bearer {token}",
                "X-Original-Method": "GET",
                "X-Original-URI": "/records/7?fields=name",
            }
            wrk("warm-up", f"{base}/authz", headers, cpus=LOAD_CPUS)
            bare = wrk(
                "bare 200 endpoint (same uvicorn, same process)",
                f"{base}/bare",
                None,
                [pid],
                cpus=LOAD_CPUS,
            )
            authz = wrk(
                "/authz allow (valid token, cache warm)",
                f"{base}/authz",
                headers,
                [pid],
                cpus=LOAD_CPUS,
            )
    print(bare.line())
    print(authz.line())
    print(f"/authz vs bare endpoint: {ratio(authz, bare)} (target >= 0.7x)")


if __name__ == "__main__":
    main()
