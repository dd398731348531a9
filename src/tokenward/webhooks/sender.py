"""The one webhook sender of tokenward: a queue in the database, retried with backoff.

Every event (a token created, rotated, revoked…, an alert) becomes one delivery per
endpoint that wants it (:meth:`WebhookSender.enqueue`), written to ``webhook_messages``
before anything is sent, so a restart loses nothing. Each replica's dispatcher
(:meth:`WebhookSender.run_forever`) leases the deliveries that are due, POSTs them signed
(:mod:`.signing`), and records each attempt: delivered on a 2xx answer; otherwise the next
attempt waits ``backoff * 2^(n-1)`` seconds with ±50 % jitter (at most an hour), and after
``max_attempts`` the delivery is ``failed``. The queue is bounded per endpoint
(``queue_size`` pending deliveries: beyond, a new one is recorded as ``dropped``), and
finished deliveries are forgotten after ``log_days``.

A token's automatic rotation cannot wait in a queue: its successor must be delivered before
it is kept (decision 0006), and a token is never written to the database in clear. It uses
:meth:`WebhookSender.deliver_now`: the same signature, attempts and backoff, in memory, the
outcome known to the caller.

Bodies follow the Standard Webhooks shape::

    {"type": "token.revoked", "timestamp": "2026-01-01T00:00:00Z", "data": {…}}
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import httpx
import structlog

from tokenward.sealing import Sealer, SealError
from tokenward.tokens.format import new_public_id
from tokenward.webhooks.signing import signed_headers
from tokenward.webhooks.store import Message, WebhookStore

log = structlog.get_logger("tokenward.webhooks")

MAX_DELAY = 3600.0
BATCH = 50
PRUNE_EVERY = timedelta(minutes=10)


def _iso(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")


def new_message_id() -> str:
    return new_public_id("msg")


@dataclass(slots=True)
class DeliveryResult:
    ok: bool
    attempts: int
    status: int | None = None
    error: str | None = None


class WebhookSender:
    def __init__(
        self,
        store: WebhookStore,
        sealer: Sealer,
        clock: Callable[[], datetime],
        *,
        max_attempts: int = 6,
        backoff: float = 1.0,
        timeout: float = 5.0,
        queue_size: int = 1000,
        log_days: int = 7,
        poll: float = 1.0,
        on_result: Callable[[bool], None] | None = None,
    ) -> None:
        self.store = store
        self.sealer = sealer
        self.clock = clock
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.timeout = timeout
        self.queue_size = queue_size
        self.log_days = log_days
        self.poll = poll
        self.on_result = on_result
        self._client: httpx.AsyncClient | None = None
        self._wake = asyncio.Event()
        self._pruned_at: datetime | None = None

    # -- what is sent ---------------------------------------------------------------------
    def body(self, event_type: str, data: dict[str, Any], at: datetime) -> bytes:
        payload = {"type": event_type, "timestamp": _iso(at), "data": data}
        return json.dumps(payload, separators=(",", ":"), default=str).encode()

    def delay(self, attempt: int) -> float:
        """Seconds before attempt ``attempt + 1``: exponential, with jitter, capped."""
        base: float = min(self.backoff * 2 ** (attempt - 1), MAX_DELAY)
        return base * random.uniform(0.5, 1.5)  # noqa: S311  (jitter, not a secret)

    async def post(
        self, url: str, secret: str, msg_id: str, body: bytes
    ) -> tuple[int | None, str | None]:
        """One attempt: the answer's status, or the error's name."""
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=self.timeout, follow_redirects=False, trust_env=False
            )
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "tokenward-webhook",
            **signed_headers(secret, msg_id, body),
        }
        try:
            response = await self._client.post(url, content=body, headers=headers)
        except httpx.HTTPError as exc:
            return None, type(exc).__name__
        if 200 <= response.status_code < 300:
            return response.status_code, None
        return response.status_code, f"HTTP {response.status_code}"

    # -- now, in memory (rotation) ----------------------------------------------------------
    async def deliver_now(
        self, url: str, secret: str, event_type: str, data: dict[str, Any]
    ) -> DeliveryResult:
        """Send until a 2xx answer, at most ``max_attempts`` times; the outcome."""
        msg_id = new_message_id()
        body = self.body(event_type, data, self.clock())
        status: int | None = None
        error: str | None = None
        for attempt in range(1, self.max_attempts + 1):
            status, error = await self.post(url, secret, msg_id, body)
            if error is None:
                self._result(True)
                return DeliveryResult(True, attempt, status)
            if attempt < self.max_attempts:
                await asyncio.sleep(self.delay(attempt))
        self._result(False)
        return DeliveryResult(False, self.max_attempts, status, error)

    # -- queued ---------------------------------------------------------------------------
    async def enqueue(
        self,
        event_type: str,
        project_id: str | None,
        data: dict[str, Any],
        *,
        subject: str | None = None,
        also: list[tuple[str, str]] | None = None,
    ) -> list[Message]:
        """Queue the event for every endpoint of ``project_id`` (and the server-wide ones)
        that wants it, and for each ``(url, sealed secret)`` of ``also``."""
        now = self.clock()
        targets: list[tuple[str | None, str, str | None]] = [
            (e.id, e.url, None)
            for e in await self.store.endpoints_for(project_id)
            if e.wants(event_type)
        ]
        targets += [(None, url, sealed) for url, sealed in also or []]
        messages = []
        for endpoint_id, url, sealed in targets:
            full = await self.store.pending_count(endpoint_id, url) >= self.queue_size
            messages.append(
                Message(
                    id=new_message_id(),
                    endpoint_id=endpoint_id,
                    project_id=project_id,
                    url=url,
                    sealed_secret=sealed,
                    type=event_type,
                    subject=subject,
                    payload=data,
                    status="dropped" if full else "pending",
                    attempts=0,
                    created_at=now,
                    next_attempt_at=None if full else now,
                    last_attempt_at=None,
                    last_status=None,
                    last_error="queue full" if full else None,
                )
            )
            if full:
                log.warning("webhook_queue_full", endpoint_id=endpoint_id, type=event_type)
        await self.store.add_messages(messages)
        if any(m.status == "pending" for m in messages):
            self._wake.set()
        return messages

    async def tick(self) -> int:
        """Send what is due (at most a batch); the number of attempts made."""
        now = self.clock()
        lease = timedelta(seconds=self.timeout * 2 + 5)
        due = await self.store.claim_due(now, lease, BATCH)
        if due:
            await asyncio.gather(*(self._attempt(m) for m in due))
        if self._pruned_at is None or now - self._pruned_at >= PRUNE_EVERY:
            self._pruned_at = now
            await self.store.prune(now - timedelta(days=self.log_days))
        return len(due)

    async def _attempt(self, message: Message) -> None:
        attempt = message.attempts + 1
        try:
            secret = await self._secret(message)
        except (SealError, LookupError) as exc:
            await self._record(message, attempt, "failed", None, str(exc))
            return
        body = self.body(message.type, message.payload, message.created_at)
        status, error = await self.post(message.url, secret, message.id, body)
        if error is None:
            await self._record(message, attempt, "delivered", status, None)
        elif attempt >= self.max_attempts:
            await self._record(message, attempt, "failed", status, error)
        else:
            await self._record(message, attempt, "pending", status, error)
        log.info(
            "webhook",
            message_id=message.id,
            endpoint_id=message.endpoint_id,
            type=message.type,
            attempt=attempt,
            status=status,
            error=error,
        )

    async def _secret(self, message: Message) -> str:
        if message.sealed_secret is not None:
            return self.sealer.open(message.sealed_secret)
        assert message.endpoint_id is not None
        endpoint = await self.store.get_endpoint(message.endpoint_id)
        if endpoint is None:
            raise LookupError("endpoint removed")
        return self.sealer.open(endpoint.sealed_secret)

    async def _record(
        self, message: Message, attempt: int, status: str, code: int | None, error: str | None
    ) -> None:
        now = self.clock()
        retry_at = now + timedelta(seconds=self.delay(attempt)) if status == "pending" else None
        await self.store.record_attempt(
            message.id,
            at=now,
            attempts=attempt,
            status=status,
            next_attempt_at=retry_at,
            last_status=code,
            last_error=error,
        )
        if status != "pending":
            self._result(status == "delivered")

    def _result(self, delivered: bool) -> None:
        if self.on_result is not None:
            self.on_result(delivered)

    async def run_forever(self) -> None:
        while True:
            try:
                sent = await self.tick()
            except Exception as exc:  # a bad round must not stop the sender
                log.warning("webhook_tick_failed", error=type(exc).__name__)
                sent = 0
            if sent < BATCH:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.poll)

    async def drain(self, timeout: float = 30.0) -> None:
        """Send until nothing is pending (tests, ``webhook test``): ticks, waiting for retries."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            await self.tick()
            pending = [m for m in await self.store.messages(limit=1000) if m.status == "pending"]
            if not pending:
                return
            soonest = min(m.next_attempt_at or self.clock() for m in pending)
            wait = (soonest - self.clock()).total_seconds()
            await asyncio.sleep(min(max(wait, 0.01), 1.0))

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
