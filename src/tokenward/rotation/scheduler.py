"""Automatic rotation and expiry warnings: one runner across all replicas.

Each tick (every ``rotation_interval`` seconds, on every replica) first takes a lock so that
exactly one replica does the work: a PostgreSQL session advisory lock (``pg_try_advisory_lock``:
the others skip the tick), or, on SQLite, an in-process lock (one process is the runner).

A tick:

1. rotates each token whose rotation is due (``period - grace`` after it was created): the
   successor is created through :meth:`TokenService.rotate_token`, delivered to the webhook
   (signed, retried), and only then kept. When delivery fails the successor is revoked, the
   predecessor keeps its full life, a ``rotation_delivery_failed`` security event is raised
   and the rotation is retried later with backoff: a secret is never minted into the void;
2. retires a predecessor early once it has seen no traffic for the rotation's quiet period;
3. warns (security event ``token_expiring`` and the token's webhook) once, N days before a
   long-lived token expires;
4. forgets identity-token ``jti`` values past their expiry.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from tokenward.errors import TokenwardError
from tokenward.events import AdminEvent, EventBus, SecurityEvent
from tokenward.oauth.policy import PolicyStore
from tokenward.oauth.store import Rotation, SessionStore
from tokenward.oauth.webhooks import SecretBox, WebhookSender
from tokenward.service import TokenService
from tokenward.tokens.model import TokenKind, TokenRecord, TokenState

log = structlog.get_logger("tokenward.rotation")

#: the advisory lock id of the scheduler (distinct from the migration lock)
LOCK_KEY = 7261120005
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

SYSTEM_ACTOR = TokenRecord(
    id="system",
    project_id=None,
    project=None,
    environment="live",
    name="rotation scheduler",
    kind=TokenKind.API_KEY.value,
    principal="system",
    scopes=["*"],
    created_at=EPOCH,
)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat().replace("+00:00", "Z") if value is not None else None


@dataclass(slots=True)
class TickReport:
    rotated: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    retired: list[str] = field(default_factory=list)
    warned: list[str] = field(default_factory=list)


class RotationScheduler:
    def __init__(
        self,
        engine: AsyncEngine,
        sessions: SessionStore,
        tokens: TokenService,
        policies: PolicyStore,
        events: EventBus,
        box: SecretBox,
        sender: WebhookSender,
        *,
        interval: float = 30.0,
        warning_days: int = 7,
    ) -> None:
        self.engine = engine
        self.sessions = sessions
        self.tokens = tokens
        self.policies = policies
        self.events = events
        self.box = box
        self.sender = sender
        self.interval = interval
        self.warning_days = warning_days
        self._local = asyncio.Lock()

    async def run_forever(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.tick()
            except Exception as exc:  # a bad tick must not stop the scheduler
                log.error("rotation_tick_failed", error_type=type(exc).__name__)

    async def tick(self, now: datetime | None = None) -> TickReport | None:
        """Do one round of work; ``None`` when another runner holds the lock."""
        if self._local.locked():
            return None
        async with self._local:
            if self.engine.dialect.name != "postgresql":
                return await self._work(now or self.tokens.now)
            async with self.engine.connect() as conn:
                got = (
                    await conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": LOCK_KEY})
                ).scalar()
                await conn.commit()
                if not got:
                    return None
                try:
                    return await self._work(now or self.tokens.now)
                finally:
                    await conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": LOCK_KEY})
                    await conn.commit()

    async def _work(self, now: datetime) -> TickReport:
        report = TickReport()
        for rotation in await self.sessions.due_rotations(now):
            await self._rotate(rotation, now, report)
        with contextlib.suppress(Exception):
            await self.tokens.verifier.flush_usage()
        for rotation in await self.sessions.with_previous():
            await self._maybe_retire(rotation, now, report)
        await self._warn_expiring(now, report)
        await self.sessions.purge_jtis(now)
        return report

    # -- 1. rotate ------------------------------------------------------------------------
    async def _rotate(self, rotation: Rotation, now: datetime, report: TickReport) -> None:
        old = await self.tokens.store.get_token(rotation.token_id)
        if old is not None and old.replaced_by is not None and old.revoked_at is None:
            # Rotated by hand meanwhile: the schedule follows the successor.
            successor = await self.tokens.store.get_token(old.replaced_by)
            if successor is not None and old.rotation_period is not None:
                due = successor.created_at + timedelta(seconds=old.rotation_period - rotation.grace)
                await self.sessions.move_rotation(old.id, successor.id, max(due, now))
                return
        if old is None or old.state(now) not in (TokenState.ACTIVE, TokenState.NOT_YET_VALID):
            await self.sessions.remove_rotation(rotation.token_id)
            return
        period = old.rotation_period
        if period is None or not rotation.webhook_url or not rotation.webhook_secret:
            await self.sessions.remove_rotation(rotation.token_id)
            return
        grace = timedelta(seconds=rotation.grace)
        try:
            issued, updated_old = await self.tokens.rotate_token(SYSTEM_ACTOR, old.id, grace)
        except TokenwardError as exc:
            await self._failed(rotation, old, now, exc.code, report)
            return
        successor = issued.record
        result = await self.sender.deliver(
            rotation.webhook_url,
            self.box.open(rotation.webhook_secret),
            "token.rotated",
            {
                "token": issued.secret,
                "token_id": successor.id,
                "previous_id": old.id,
                "previous_valid_until": _iso(updated_old.grace_until),
                "expires_at": _iso(successor.expires_at),
                "project": successor.project,
                "name": successor.name,
                "environment": successor.environment,
            },
        )
        if not result.ok:
            await self.sessions.undo_rotation(old.id, successor.id, now)
            for token_id in (old.id, successor.id):
                self.tokens.verifier.invalidate(token_id)
                if self.tokens.on_change is not None:
                    await self.tokens.on_change(token_id)
            await self._failed(rotation, old, now, result.error or "delivery failed", report)
            return
        due = successor.created_at + timedelta(seconds=period) - grace
        await self.sessions.move_rotation(old.id, successor.id, max(due, now))
        report.rotated.append(old.id)
        log.info("token_rotated", token_id=old.id, successor_id=successor.id)

    async def _failed(
        self, rotation: Rotation, old: TokenRecord, now: datetime, error: str, report: TickReport
    ) -> None:
        attempts = rotation.attempts + 1
        retry = now + timedelta(seconds=min(60 * 2 ** min(attempts, 6), 3600))
        await self.sessions.rotation_failed(rotation.token_id, error, retry, attempts)
        report.failed.append(rotation.token_id)
        await self.events.security(
            SecurityEvent(
                at=now,
                kind="rotation_delivery_failed",
                severity="warning",
                project_id=old.project_id,
                token_id=old.id,
                evidence={"error": error, "attempts": attempts, "retry_at": _iso(retry)},
            )
        )

    # -- 2. retire quiet predecessors -----------------------------------------------------
    async def _maybe_retire(self, rotation: Rotation, now: datetime, report: TickReport) -> None:
        assert rotation.previous_id is not None
        previous = await self.tokens.store.get_token(rotation.previous_id)
        if previous is None or previous.state(now) != TokenState.ROTATED_IN_GRACE:
            await self.sessions.clear_previous(rotation.token_id)
            return
        if rotation.quiet is None or previous.grace_until is None:
            return
        rotated_at = previous.grace_until - timedelta(seconds=rotation.grace)
        last_seen = max(previous.last_used_at or EPOCH, rotated_at)
        if now - last_seen < timedelta(seconds=rotation.quiet):
            return
        if await self.sessions.end_grace(previous.id, now):
            self.tokens.verifier.invalidate(previous.id)
            if self.tokens.on_change is not None:
                await self.tokens.on_change(previous.id)
            await self.sessions.clear_previous(rotation.token_id)
            report.retired.append(previous.id)
            await self.events.admin(
                AdminEvent(
                    at=now,
                    action="token.retire_early",
                    actor_id=SYSTEM_ACTOR.id,
                    project_id=previous.project_id,
                    token_id=previous.id,
                    detail={"quiet_seconds": rotation.quiet, "successor": rotation.token_id},
                )
            )

    # -- 3. expiry warnings ---------------------------------------------------------------
    async def _warn_expiring(self, now: datetime, report: TickReport) -> None:
        days_by_project: dict[str | None, int] = {}
        for record in await self.sessions.expiring(now, now + timedelta(days=366)):
            pid = record.project_id
            if pid not in days_by_project:
                days = None
                if pid is not None:
                    days = (await self.policies.get(pid)).expiry_warning_days
                days_by_project[pid] = self.warning_days if days is None else days
            assert record.expires_at is not None
            if record.expires_at - now > timedelta(days=days_by_project[pid]):
                continue
            rotation = await self.sessions.get_rotation(record.id)
            if rotation is not None and rotation.due_at < record.expires_at:
                continue  # it will be rotated before it expires: nothing to warn about
            await self._warn(record, now, rotation)
            await self.sessions.mark_warned(record.id, now)
            report.warned.append(record.id)

    async def _warn(self, record: TokenRecord, now: datetime, rotation: Rotation | None) -> None:
        assert record.expires_at is not None
        evidence: dict[str, Any] = {
            "expires_at": _iso(record.expires_at),
            "seconds_left": int((record.expires_at - now).total_seconds()),
            "name": record.name,
        }
        await self.events.security(
            SecurityEvent(
                at=now,
                kind="token_expiring",
                severity="warning",
                project_id=record.project_id,
                token_id=record.id,
                evidence=evidence,
            )
        )
        if rotation is not None and rotation.webhook_url and rotation.webhook_secret:
            await self.sender.deliver(
                rotation.webhook_url,
                self.box.open(rotation.webhook_secret),
                "token.expiring",
                {"token_id": record.id, "project": record.project, **evidence},
            )
