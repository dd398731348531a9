"""Call an API with a short-lived tokenward token that refreshes itself.

    export TOKENWARD_URL=http://127.0.0.1:8080
    export TOKENWARD_API_KEY=tw_live_…     # an API key holding the scope admin:read
    .venv/bin/python docs/examples/sdk_example.py

The API key never leaves this process: it is exchanged for a 15-minute access token bound
to a key pair made here (DPoP), and every call below carries that token and a fresh proof.
The same ``auth`` works with ``httpx.AsyncClient``.
"""

from __future__ import annotations

import os

import httpx

from tokenward_client import TokenwardAuth


def main() -> None:
    url = os.environ.get("TOKENWARD_URL", "http://127.0.0.1:8080")
    auth = TokenwardAuth(
        url,
        api_key=os.environ["TOKENWARD_API_KEY"],
        scope=["admin:read"],  # ask only for what this program needs
        dpop=True,  # a stolen access token is useless without this process's key
    )
    with httpx.Client(auth=auth, base_url=url) as http:
        for _ in range(3):
            response = http.get("/v1/projects")
            response.raise_for_status()
            names = [p["name"] for p in response.json()["projects"]]
            scheme = response.request.headers["authorization"].split()[0]
            print(f"{scheme} call -> projects: {', '.join(names) or '(none)'}")
    print(f"{auth.token_requests} token request for 3 API calls")


if __name__ == "__main__":
    main()
