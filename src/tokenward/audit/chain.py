"""Checking the chain, and pruning old events without breaking it.

:func:`verify_chain` walks the events in ``seq`` order from the last prune checkpoint (or
the genesis) and reports the first one that was edited, deleted or reordered:

* **edited**: the row's own hash does not match its content (or its key is unknown);
* **deleted**: a row's ``prev_hash`` names no event that is still there, or the chain
  head is ahead of the last row (events cut off at the end);
* **reordered**: a row's ``prev_hash`` names an event that is still there but elsewhere.

What the chain cannot prove on its own: that the *newest* events were not all removed
together with the head row. Record ``head`` from a verify run somewhere else (a ticket, a
log shipper) and pass it back as ``anchor`` to close that gap.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from tokenward.audit.records import GENESIS, HASHED_FIELDS, ChainKeys
from tokenward.audit.tables import audit_checkpoints, audit_events, audit_head
from tokenward.audit.writer import _lock_head

_COLUMNS = [
    audit_events.c.seq,
    audit_events.c.key_id,
    audit_events.c.prev_hash,
    audit_events.c.hash,
    *(audit_events.c[name] for name in HASHED_FIELDS),
]


@dataclass(slots=True)
class ChainReport:
    ok: bool
    checked: int
    #: the first bad event's seq, with what is wrong with it: edited, deleted, reordered
    first_bad_seq: int | None = None
    problem: str | None = None
    message: str = ""
    head_seq: int = 0
    head_hash: str = GENESIS
    checkpoint_seq: int = 0

    def public(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "checked": self.checked,
            "first_bad_seq": self.first_bad_seq,
            "problem": self.problem,
            "message": self.message,
            "head": f"{self.head_seq}:{self.head_hash}",
            "checkpoint_seq": self.checkpoint_seq,
        }


async def _latest_checkpoint(engine: AsyncEngine) -> tuple[int, str]:
    query = (
        select(audit_checkpoints.c.seq, audit_checkpoints.c.hash)
        .order_by(audit_checkpoints.c.seq.desc())
        .limit(1)
    )
    async with engine.connect() as conn:
        row = (await conn.execute(query)).first()
    return (int(row.seq), str(row.hash)) if row else (0, GENESIS)


async def _seq_of_hash(engine: AsyncEngine, digest: str) -> int | None:
    async with engine.connect() as conn:
        value = (
            await conn.execute(select(audit_events.c.seq).where(audit_events.c.hash == digest))
        ).scalar()
    return None if value is None else int(value)


async def verify_chain(
    engine: AsyncEngine,
    keys: ChainKeys,
    *,
    anchor: tuple[int, str] | None = None,
    page_size: int = 2000,
) -> ChainReport:
    """Walk the whole chain; stop at the first event that is not what was written."""
    checkpoint_seq, expected_prev = await _latest_checkpoint(engine)
    expected_seq = checkpoint_seq + 1
    report = ChainReport(
        True, 0, checkpoint_seq=checkpoint_seq, head_seq=checkpoint_seq, head_hash=expected_prev
    )

    def bad(seq: int, problem: str, message: str) -> ChainReport:
        report.ok, report.first_bad_seq, report.problem = False, seq, problem
        report.message = message
        return report

    anchor_seen = anchor is None or anchor[0] <= checkpoint_seq
    last = checkpoint_seq
    while True:
        query = (
            select(*_COLUMNS)
            .where(audit_events.c.seq > last)
            .order_by(audit_events.c.seq)
            .limit(page_size)
        )
        async with engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        if not rows:
            break
        for row in rows:
            values = dict(row._mapping)
            seq = int(values["seq"])
            if values["key_id"] not in keys.by_id:
                return bad(seq, "edited", f"event {seq} names an unknown key {values['key_id']}")
            if keys.hash(values["key_id"], values["prev_hash"], values) != values["hash"]:
                return bad(seq, "edited", f"event {seq} was edited after it was written")
            if values["prev_hash"] != expected_prev or seq != expected_seq:
                where = await _seq_of_hash(engine, values["prev_hash"])
                if where is not None and where != seq - 1:
                    return bad(
                        seq,
                        "reordered",
                        f"event {seq} follows event {where}: the order was changed",
                    )
                if values["prev_hash"] != expected_prev:
                    return bad(
                        seq,
                        "deleted",
                        f"event(s) before {seq} were deleted (the chain breaks there)",
                    )
                return bad(seq, "reordered", f"event {seq} is out of sequence")
            if anchor is not None and seq == anchor[0]:
                if values["hash"] != anchor[1]:
                    return bad(seq, "edited", f"event {seq} does not match the anchor")
                anchor_seen = True
            report.checked += 1
            expected_prev, expected_seq = values["hash"], seq + 1
            report.head_seq, report.head_hash = seq, values["hash"]
        last = int(rows[-1].seq)
    async with engine.connect() as conn:
        head = (await conn.execute(select(audit_head.c.seq, audit_head.c.hash))).first()
    if head is not None and int(head.seq) > report.head_seq:
        return bad(
            report.head_seq + 1,
            "deleted",
            f"events {report.head_seq + 1}..{head.seq} were deleted from the end",
        )
    if head is not None and int(head.seq) == report.head_seq and head.hash != report.head_hash:
        return bad(report.head_seq, "edited", "the chain head does not match the last event")
    if not anchor_seen:
        assert anchor is not None
        return bad(anchor[0], "deleted", f"the anchored event {anchor[0]} is gone")
    return report


@dataclass(slots=True)
class PruneResult:
    pruned: int
    checkpoint_seq: int


async def prune(engine: AsyncEngine, before: datetime, now: datetime) -> PruneResult:
    """Delete events older than ``before``; a checkpoint keeps the rest verifiable."""
    async with engine.begin() as conn:
        await _lock_head(conn)  # no writer appends while the checkpoint is taken
        cut = (
            await conn.execute(
                select(func.max(audit_events.c.seq)).where(audit_events.c.at < before)
            )
        ).scalar()
        if cut is None:
            return PruneResult(0, 0)
        row = (
            await conn.execute(select(audit_events.c.hash).where(audit_events.c.seq == cut))
        ).one()
        result = await conn.execute(delete(audit_events).where(audit_events.c.seq <= cut))
        await conn.execute(
            insert(audit_checkpoints).values(
                created_at=now, seq=int(cut), hash=row.hash, pruned=result.rowcount, before=before
            )
        )
    return PruneResult(int(result.rowcount), int(cut))
