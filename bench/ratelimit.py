"""Benchmark 4: /authz with a Redis-backed rate limit on the token vs no rate limit.

The limit is high enough never to deny (1000000/minute); what is measured is the cost of
counting in Redis (TOKENWARD_REDIS_URL; BENCH_REDIS_URL overrides the local server). Both
servers use Redis for nothing else.
"""

from __future__ import annotations

import tempfile

from common import free_port, ratio, tokenward, write_policy, wrk


def main() -> None:
    headers = {"X-Original-Method": "GET", "X-Original-URI": "/records/7"}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        config = write_policy(tmp, free_port())
        for name, rate, redis in (
            ("/authz, no rate limit", None, False),
            ("/authz, rate limit in Redis", "1000000/minute", True),
            ("/authz, rate limit in memory", "1000000/minute", False),
        ):
            port = free_port()
            with tokenward("api", port, config, rate=rate, redis=redis) as (token, pid):
                auth = {**headers, "Authorization": f"Bearer {token}"}
                wrk("warm-up", f"http://127.0.0.1:{port}/authz", auth)
                results.append(wrk(name, f"http://127.0.0.1:{port}/authz", auth, [pid]))
    off, redis, memory = results
    for result in results:
        print(result.line())
    print(f"rate limiting on (Redis) vs off:  {ratio(redis, off)}")
    print(f"rate limiting on (memory) vs off: {ratio(memory, off)}")


if __name__ == "__main__":
    main()
