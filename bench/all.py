"""All four benchmarks, one after the other, in one run (``cd bench && python all.py``)."""

from __future__ import annotations

import authz
import nginx_authz
import ratelimit

import gateway

if __name__ == "__main__":
    for title, module in (
        ("1. /authz vs a bare endpoint", authz),
        ("2. gateway vs minimal Python proxy vs nginx", gateway),
        ("3. nginx + auth_request vs nginx alone", nginx_authz),
        ("4. rate limiting in Redis on vs off", ratelimit),
    ):
        print(f"\n== {title}")
        module.main()
