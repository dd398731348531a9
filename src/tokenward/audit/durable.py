"""What a request waits for before it answers: its audit events durable, its batched work done.

A request collects what it must wait for while it runs (:func:`collect_events`): the audit
batch of each of its events, and the batch of any other work done per batch for it (the
detectors for allowed decisions, :mod:`tokenward.anomaly.engine`). The one wait happens as
the response is about to start (:func:`settle`); should an event not be written, the answer
becomes a 503 ``audit_unavailable`` (fail closed): nothing is acknowledged that the audit
log does not hold. :class:`DurableResponseMiddleware` does this for the layered stack, the
hot layer (``api/fastpath.py``) for its routes.
"""

from __future__ import annotations

import asyncio
import contextlib
from contextvars import ContextVar, Token
from typing import Any, Protocol

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tokenward.asgi import send_json

#: Seconds a response that is already a ``503`` (a dependency is down: the decision is a
#: denial) waits for its events before it is answered ``audit_unavailable``. It says "not
#: now" either way; holding it the full ``GIVE_UP_AFTER`` would only make the client wait.
DENIAL_WAIT = 2.0

UNAVAILABLE_BODY = {"error": "audit_unavailable", "message": "the audit log cannot be written"}


class Waitable(Protocol):
    """A batch a request's item joined: settled once for all of its items."""

    @property
    def future(self) -> asyncio.Future[None]: ...

    async def wait(self) -> None: ...

    def error_for(self, item: Any) -> BaseException | None: ...


#: What a request waits for: the batch of each of its items, with the item.
Pending = list[tuple[Waitable, Any]]

#: The items of the HTTP request being handled (set by :func:`collect_events`); ``None``
#: outside a request.
_pending: ContextVar[Pending | None] = ContextVar("tokenward_audit_pending", default=None)


def pending_of_request() -> Pending | None:
    """The list the request being served collects its waits in (``None``: no request)."""
    return _pending.get()


def collect_events() -> tuple[Pending, Token[Pending | None]]:
    """Start collecting the waits of the request being served (until ``stop_collecting``)."""
    pending: Pending = []
    return pending, _pending.set(pending)


def stop_collecting(token: Token[Pending | None]) -> None:
    _pending.reset(token)


async def settle(pending: Pending, status: int) -> bool:
    """Wait until the request's items in ``pending`` are settled (and forget them);
    ``False`` when one of them could not be written: the answer must then be a 503.

    Audit batches commit in queue order, so once the last one is settled so are the earlier
    ones: the waits are for the distinct batches, newest first (usually one or two), then
    a look at each item. A response that is already a 503 waits less (an unsettled event
    counts as not written).
    """
    waiting = list(pending)
    pending.clear()
    batches: dict[int, Waitable] = {}
    for batch, _ in reversed(waiting):
        batches.setdefault(id(batch), batch)
    if status == 503:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(DENIAL_WAIT):
                for batch in batches.values():
                    await batch.wait()
    else:
        for batch in batches.values():
            await batch.wait()
    return not any(batch.error_for(item) is not None for batch, item in waiting)


async def settle_leftovers(pending: Pending) -> None:
    """Items of a request that sent no response: still wait for them."""
    if pending:
        futures = {id(batch): batch.future for batch, _ in pending}
        await asyncio.shield(asyncio.gather(*futures.values(), return_exceptions=True))


class DurableResponseMiddleware:
    """Holds each response until the audit events of its request are durable."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        pending, token = collect_events()
        failed = False

        async def durable_send(message: Message) -> None:
            nonlocal failed
            if failed:
                return
            start = message["type"] == "http.response.start"
            if start and pending and not await settle(pending, message["status"]):
                failed = True
                await send_json(send, 503, UNAVAILABLE_BODY)
                return
            await send(message)

        try:
            await self.app(scope, receive, durable_send)
        finally:
            stop_collecting(token)
            await settle_leftovers(pending)
