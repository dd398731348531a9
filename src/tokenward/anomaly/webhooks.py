"""Alert webhooks: JSON, HMAC-signed, retried with exponential backoff, every attempt logged.

Receivers check ``X-Tokenward-Signature: t=<unix time>,v1=<hex>`` where ``v1`` is
``HMAC-SHA256(secret, "<t>." + body)`` (see :func:`verify_signature`), and reject old ``t``
to stop replays. Delivery is at-least-once: ``X-Tokenward-Delivery`` (the alert id) lets a
receiver drop duplicates.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from datetime import datetime

import httpx
import structlog

from tokenward.anomaly.store import Alert, AnomalyStore

log = structlog.get_logger("tokenward.anomaly")

SIGNATURE_HEADER = "X-Tokenward-Signature"
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


def sign(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={mac.hexdigest()}"


def verify_signature(
    secret: str, header: str, body: bytes, *, tolerance: float = 300, now: float | None = None
) -> bool:
    """What a receiver does: check the MAC and that the timestamp is recent."""
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    try:
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs((now if now is not None else time.time()) - timestamp) > tolerance:
        return False
    expected = sign(secret, timestamp, body).split("v1=", 1)[1]
    return hmac.compare_digest(expected, parts.get("v1", ""))


class WebhookSender:
    def __init__(
        self,
        store: AnomalyStore,
        clock: Callable[[], datetime],
        *,
        max_attempts: int = 6,
        backoff: float = 1.0,
        timeout: float = 5.0,
        on_result: Callable[[bool], None] | None = None,
    ) -> None:
        self.store = store
        self.clock = clock
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.timeout = timeout
        self.on_result = on_result
        self._tasks: set[asyncio.Task[bool]] = set()
        self._client: httpx.AsyncClient | None = None

    def send(self, alert: Alert, url: str, secret: str) -> asyncio.Task[bool]:
        """Deliver in the background; the task's result says whether it arrived."""
        task = asyncio.create_task(self.deliver(alert, url, secret))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def deliver(self, alert: Alert, url: str, secret: str) -> bool:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.timeout, trust_env=False)
        body = json.dumps(
            {"type": "alert", "alert": alert.public()}, separators=(",", ":")
        ).encode()
        delay = self.backoff
        for attempt in range(1, self.max_attempts + 1):
            headers = {
                "Content-Type": "application/json",
                "User-Agent": "tokenward-webhook",
                "X-Tokenward-Event": "alert",
                "X-Tokenward-Delivery": alert.id,
                "X-Tokenward-Attempt": str(attempt),
                SIGNATURE_HEADER: sign(secret, int(time.time()), body),
            }
            status: int | None = None
            error: str | None = None
            try:
                response = await self._client.post(url, content=body, headers=headers)
                status = response.status_code
            except httpx.HTTPError as exc:
                error = type(exc).__name__
            delivered = status is not None and 200 <= status < 300
            try:
                await self.store.log_delivery(
                    alert, url, attempt, self.clock(), status, error, delivered
                )
            except Exception as exc:  # the delivery log is bookkeeping; keep delivering
                log.warning("webhook_log_failed", error=type(exc).__name__)
            if delivered or (status is not None and status not in RETRY_STATUSES):
                break
            if attempt < self.max_attempts:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 300)
        log.info("webhook", alert_id=alert.id, attempts=attempt, delivered=delivered, status=status)
        if self.on_result is not None:
            self.on_result(delivered)
        return delivered

    async def drain(self) -> None:
        """Wait for deliveries in flight (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self, wait: float = 5.0) -> None:
        if self._tasks:
            _, pending = await asyncio.wait(list(self._tasks), timeout=wait)
            for task in pending:
                task.cancel()
        if self._client is not None:
            await self._client.aclose()
            self._client = None
