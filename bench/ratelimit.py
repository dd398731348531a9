"""Benchmark 4: /authz with a rate limit on the token (in Redis, in memory) vs no rate limit.

The limits are high enough never to deny; what is measured is the cost of counting, with
one window (1000000/minute) and with two (1000000/second;1000000000/hour), in Redis
(TOKENWARD_REDIS_URL; BENCH_REDIS_URL overrides the local server) and in memory. The
servers use Redis for nothing else.
"""

from __future__ import annotations

import tempfile

from common import free_port, ratio, tokenward, write_policy, wrk

ONE = "1000000/minute"
TWO = "1000000/second;1000000000/hour"


def main() -> None:
    headers = {"X-Original-Method": "GET", "X-Original-URI": "/records/7"}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        config = write_policy(tmp, free_port())
        for name, rate, redis in (
            ("/authz, no rate limit", None, False),
            ("/authz, rate limit in Redis", ONE, True),
            ("/authz, rate limit in memory", ONE, False),
            ("/authz, two windows in Redis", TWO, True),
            ("/authz, two windows in memory", TWO, False),
        ):
            port = free_port()
            with tokenward("api", port, config, rate=rate, redis=redis) as (token, pid):
                auth = {**headers, "Authorization": f"Bearer {token}"}
                wrk("warm-up", f"http://127.0.0.1:{port}/authz", auth)
                results.append(wrk(name, f"http://127.0.0.1:{port}/authz", auth, [pid]))
    off, redis, memory, redis_two, memory_two = results
    for result in results:
        print(result.line())
    print(f"rate limiting on (Redis) vs off:               {ratio(redis, off)}")
    print(f"rate limiting on (memory) vs off:              {ratio(memory, off)}")
    print(f"rate limiting on (Redis, two windows) vs off:  {ratio(redis_two, off)}")
    print(f"rate limiting on (memory, two windows) vs off: {ratio(memory_two, off)}")


if __name__ == "__main__":
    main()
