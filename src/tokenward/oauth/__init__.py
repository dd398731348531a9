"""Short-lived tokens: the OAuth token endpoint and what it needs.

* :mod:`.exchange`  — RFC 8693 token exchange and refresh-token rotation with reuse detection
* :mod:`.identity`  — workload identity: OIDC ID tokens from CI checked against trust policies
* :mod:`.dpop`      — RFC 9449 sender-constrained tokens (proof checking, replay cache)
* :mod:`.policy`    — per-project policy (lifetime cap, access-token lifetime, DPoP required)
* :mod:`.webhooks`  — HMAC-signed webhook delivery
* :mod:`.store`     — the tables and queries behind all of the above

Automatic rotation is :mod:`tokenward.rotation`; :mod:`tokenward.sessions` builds the services.
This package's ``__init__`` imports nothing, so the verifier can use :mod:`.dpop` without
pulling in the rest.
"""
