"""``httpx`` authentication that keeps a short-lived tokenward access token fresh by itself.

::

    import httpx
    from tokenward_client import TokenwardAuth

    auth = TokenwardAuth("https://tokens.example.com", api_key=os.environ["TOKENWARD_API_KEY"],
                         scope=["records:read"], dpop=True)
    with httpx.Client(auth=auth) as http:          # or httpx.AsyncClient(auth=auth)
        http.get("https://api.example.com/records")

How it works (``httpx.Auth.auth_flow`` lets an auth yield extra requests):

* before a request, if there is no access token or it is about to expire, the flow sends the
  token request itself: a refresh (when it holds a refresh token) or an exchange of the API
  key / CI identity token; a refresh token the server refuses falls back to an exchange;
* one refresh at a time per ``TokenwardAuth`` (a thread lock for ``httpx.Client``, an asyncio
  lock for ``httpx.AsyncClient``), and each token is refreshed at a slightly random moment
  before its expiry, so many clients do not stampede the server together;
* a CI identity token is exchanged into the ``project`` named (``audience`` picks one of
  its trust policies, or names ``project/policy`` or a trust policy id by itself);
* with ``dpop`` the tokens are bound to a key that never leaves the process, and every request
  carries a fresh proof (``Authorization: DPoP …`` + ``DPoP: …``);
* a ``401`` answer (e.g. the token expired or was revoked meanwhile) makes it get a new token
  and retry the request once.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
import weakref
from collections.abc import AsyncGenerator, Callable, Generator, Sequence
from typing import Any

import httpx

from tokenward_client.dpop import make_proof, new_key

TOKEN_PATH = "/v1/token"  # noqa: S105 - a path
GRANT_EXCHANGE = "urn:ietf:params:oauth:grant-type:token-exchange"
TYPE_ACCESS = "urn:ietf:params:oauth:token-type:access_token"
TYPE_ID_TOKEN = "urn:ietf:params:oauth:token-type:id_token"  # noqa: S105 - a type URN


class TokenwardAuthError(Exception):
    """The token endpoint refused: ``status``, OAuth ``code`` and ``message``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class TokenwardAuth(httpx.Auth):
    requires_request_body = True

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        identity_token: str | Callable[[], str] | None = None,
        scope: str | Sequence[str] | None = None,
        lifetime: int | None = None,
        audience: str | None = None,
        project: str | None = None,
        dpop: bool | Any = False,
        refresh_margin: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if (api_key is None) == (identity_token is None):
            raise ValueError("give exactly one of api_key or identity_token")
        self.token_url = url.rstrip("/") + TOKEN_PATH
        self._api_key = api_key
        self._identity = identity_token
        self.scope = " ".join([scope] if isinstance(scope, str) else scope) if scope else None
        self.lifetime = lifetime
        if project and audience:
            if "/" in audience or audience.startswith("trp_"):
                raise ValueError("with project=, audience= is the name of one of its policies")
            audience = f"{project}/{audience}"  # a trust policy of that project
        self.audience = audience or project
        if identity_token is not None and not self.audience:
            raise ValueError(
                "a CI identity is exchanged into one project: give project= "
                "(and audience= to pick one of its trust policies)"
            )
        if dpop is True:
            dpop = new_key()
        self.dpop_key: Any = dpop or None
        self.refresh_margin = refresh_margin
        self.clock = clock
        self._access: str | None = None
        self._refresh: str | None = None
        self._token_type = "Bearer"  # noqa: S105 - a scheme name
        self._refresh_at = 0.0
        self._thread_lock = threading.Lock()
        #: one lock per event loop: an asyncio lock belongs to the loop that first waits on
        #: it, and one auth object may serve several loops (``asyncio.run`` after another)
        self._async_locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
            weakref.WeakKeyDictionary()
        )
        #: how many token requests were sent (for observability and tests)
        self.token_requests = 0

    # -- the flows ------------------------------------------------------------------------
    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response]:
        with self._thread_lock:
            if self._stale():
                yield from self._sync_obtain()
            used = self._access
        response = yield self._authorize(request)
        if response.status_code == 401:
            with self._thread_lock:
                if self._access == used:
                    self._access = None
                    yield from self._sync_obtain()
            yield self._authorize(request)

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        lock = self._async_lock()
        async with lock:
            if self._stale():
                response = yield self._token_request()
                await response.aread()
                if self._fall_back(response):
                    response = yield self._token_request()
                    await response.aread()
                self._accept(response)
            used = self._access
        response = yield self._authorize(request)
        if response.status_code == 401:
            async with lock:
                if self._access == used:
                    self._access = None
                    response = yield self._token_request()
                    await response.aread()
                    if self._fall_back(response):
                        response = yield self._token_request()
                        await response.aread()
                    self._accept(response)
            yield self._authorize(request)

    def _async_lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        lock = self._async_locks.get(loop)
        if lock is None:
            lock = self._async_locks[loop] = asyncio.Lock()
        return lock

    def _sync_obtain(self) -> Generator[httpx.Request, httpx.Response]:
        response = yield self._token_request()
        response.read()
        if self._fall_back(response):
            response = yield self._token_request()
            response.read()
        self._accept(response)

    # -- the pieces -----------------------------------------------------------------------
    def _stale(self) -> bool:
        return self._access is None or self.clock() >= self._refresh_at

    def _token_request(self) -> httpx.Request:
        self.token_requests += 1
        form: dict[str, str] = {}
        if self._refresh is not None:
            form = {"grant_type": "refresh_token", "refresh_token": self._refresh}
        elif self._api_key is not None:
            form = {
                "grant_type": GRANT_EXCHANGE,
                "subject_token_type": TYPE_ACCESS,
                "subject_token": self._api_key,
            }
        else:
            identity = self._identity() if callable(self._identity) else self._identity
            form = {
                "grant_type": GRANT_EXCHANGE,
                "subject_token_type": TYPE_ID_TOKEN,
                "subject_token": identity or "",
            }
            if self.audience:
                form["audience"] = self.audience
        if self.scope:
            form["scope"] = self.scope
        if self.lifetime:  # asked for on every token, refreshed ones too
            form["expires_in"] = str(self.lifetime)
        headers = {"User-Agent": "tokenward-sdk", "Accept": "application/json"}
        if self.dpop_key is not None:
            # An API key bound to this key is itself presented: the proof covers it (ath).
            presented = form.get("subject_token") if self._api_key is not None else None
            headers["DPoP"] = make_proof(
                self.dpop_key, "POST", self.token_url, access_token=presented
            )
        return httpx.Request("POST", self.token_url, data=form, headers=headers)

    def _fall_back(self, response: httpx.Response) -> bool:
        """A refused refresh token is dropped, and the credential exchanged instead."""
        if response.status_code == 400 and self._refresh is not None:
            self._refresh = None
            return True
        return False

    def _accept(self, response: httpx.Response) -> None:
        try:
            body = response.json()
        except ValueError:
            body = {}
        if response.status_code != 200 or "access_token" not in body:
            self._access = None
            raise TokenwardAuthError(
                response.status_code,
                str(body.get("error", "token_request_failed")),
                str(body.get("message") or body.get("error_description") or "no token"),
            )
        self._access = str(body["access_token"])
        self._token_type = str(body.get("token_type", "Bearer"))
        self._refresh = body.get("refresh_token") or self._refresh
        lifetime = float(body.get("expires_in", 0))
        margin = min(self.refresh_margin, lifetime / 4) * random.uniform(1.0, 1.5)  # noqa: S311
        self._refresh_at = self.clock() + lifetime - margin

    def _authorize(self, request: httpx.Request) -> httpx.Request:
        assert self._access is not None
        request.headers["Authorization"] = f"{self._token_type} {self._access}"
        if self.dpop_key is not None and self._token_type.lower() == "dpop":
            request.headers["DPoP"] = make_proof(
                self.dpop_key, request.method, str(request.url), access_token=self._access
            )
        return request
