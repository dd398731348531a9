"""Checking every writer's chain, and pruning old events without breaking them.

:func:`verify_chain` walks each chain in ``seq`` order from its last prune base (or its
genesis) and reports, per chain, the first event that was

* **edited**: the row's own hash does not match its content (or its key is unknown);
* **deleted**: a row's ``prev_hash`` names no event that is still there;
* **reordered**: a row's ``prev_hash`` names an event that is still there but elsewhere;

and then cross-checks the writers' checkpoints (decision 0021), which are chained per writer
under the chain key and name the newest checkpoint of every other chain they saw:

* **truncated**: a chain ends below a head that one of its checkpoints, or another chain's
  checkpoint, recorded (its newest events were cut off), or its checkpoints have a gap;
* **removed**: a checkpoint names a chain of which nothing is left.

What it cannot prove: the events a writer appended after its last checkpoint, if the writer
crashed (it wrote no closing checkpoint) and no other chain witnessed them, could have been
cut off together with nothing else. ``verify`` reports them as the chain's unverified tail;
an anchor (``chain:seq:hash`` printed by an earlier run, kept elsewhere) closes that gap.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import and_, delete, func, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from tokenward.audit.records import GENESIS, HASHED_FIELDS, ChainKeys
from tokenward.audit.tables import (
    LEGACY_CHAIN,
    audit_chain_checkpoints,
    audit_checkpoints,
    audit_events,
)

_COLUMNS = [
    audit_events.c.chain_id,
    audit_events.c.seq,
    audit_events.c.key_id,
    audit_events.c.prev_hash,
    audit_events.c.hash,
    *(audit_events.c[name] for name in HASHED_FIELDS),
]

#: An anchor: a chain's position and hash, as an earlier verify printed it.
Anchor = tuple[str, int, str]


@dataclass(slots=True)
class ChainReport:
    """What was found of one writer's chain."""

    chain_id: str
    ok: bool = True
    checked: int = 0
    #: the first bad event's seq, with what is wrong: edited, deleted, reordered, truncated…
    first_bad_seq: int | None = None
    problem: str | None = None
    message: str = ""
    head_seq: int = 0
    head_hash: str = GENESIS
    #: where the chain starts (the newest event deleted by a prune; 0: its genesis)
    base_seq: int = 0
    checkpoints: int = 0
    checkpoint_seq: int = 0  # the head the newest checkpoint recorded
    closed: bool = False  # its writer closed it cleanly (a final checkpoint)
    writer: str | None = None

    @property
    def unverified(self) -> int:
        """Events after the newest checkpoint of a chain that was not closed cleanly."""
        return 0 if self.closed else max(0, self.head_seq - self.checkpoint_seq)

    def bad(self, seq: int | None, problem: str, message: str) -> None:
        if self.ok:
            self.ok, self.first_bad_seq, self.problem, self.message = False, seq, problem, message

    def public(self) -> dict[str, Any]:
        return {
            "chain": self.chain_id,
            "ok": self.ok,
            "status": "bad" if not self.ok else "closed" if self.closed else "open",
            "checked": self.checked,
            "first_bad_seq": self.first_bad_seq,
            "problem": self.problem,
            "message": self.message,
            "head": f"{self.chain_id}:{self.head_seq}:{self.head_hash}",
            "base_seq": self.base_seq,
            "checkpoints": self.checkpoints,
            "checkpoint_seq": self.checkpoint_seq,
            "unverified": self.unverified,
            "writer": self.writer,
        }


@dataclass(slots=True)
class LogReport:
    """Every chain's report; ``ok`` when all are."""

    chains: list[ChainReport] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.chains)

    @property
    def checked(self) -> int:
        return sum(c.checked for c in self.chains)

    @property
    def first_bad(self) -> ChainReport | None:
        return next((c for c in self.chains if not c.ok), None)

    @property
    def problem(self) -> str | None:
        bad = self.first_bad
        return bad.problem if bad else None

    @property
    def first_bad_seq(self) -> int | None:
        bad = self.first_bad
        return bad.first_bad_seq if bad else None

    def chain(self, chain_id: str) -> ChainReport:
        return next(c for c in self.chains if c.chain_id == chain_id)

    def public(self) -> dict[str, Any]:
        bad = self.first_bad
        return {
            "ok": self.ok,
            "checked": self.checked,
            "problem": bad.problem if bad else None,
            "message": f"chain {bad.chain_id}: {bad.message}" if bad else "",
            "first_bad_chain": bad.chain_id if bad else None,
            "first_bad_seq": bad.first_bad_seq if bad else None,
            "unverified": sum(c.unverified for c in self.chains),
            "heads": [f"{c.chain_id}:{c.head_seq}:{c.head_hash}" for c in self.chains],
            "chains": [c.public() for c in self.chains],
        }


def parse_anchor(text: str) -> Anchor | None:
    """``chain:seq:hash`` (or ``seq:hash``, a position in the legacy chain)."""
    parts = text.split(":")
    if len(parts) == 2:
        parts.insert(0, LEGACY_CHAIN)
    if len(parts) != 3:
        return None
    chain, seq, digest = parts
    if not (chain and len(chain) <= 32 and seq.isascii() and seq.isdigit()) or len(digest) != 64:
        return None
    return chain, int(seq), digest


async def verify_chain(
    engine: AsyncEngine,
    keys: ChainKeys,
    *,
    anchor: Anchor | None = None,
    anchors: list[Anchor] | None = None,
    page_size: int = 2000,
) -> LogReport:
    """Walk every chain; per chain, stop at the first event that is not what was written;
    then cross-check the checkpoints against the chains."""
    wanted = [*(anchors or []), *([anchor] if anchor else [])]
    async with engine.connect() as conn:
        bases = await _prune_bases(conn)
        marks = await _checkpoints(conn)
        chains = {
            str(r[0])
            for r in (await conn.execute(select(audit_events.c.chain_id).distinct())).all()
        }
    named = {chain for rows in marks.values() for m in rows for chain in m["witness"]}
    everything = sorted(chains | set(marks) | set(bases) | named | {a[0] for a in wanted})
    report = LogReport()
    for chain_id in everything:
        base = bases.get(chain_id, (0, GENESIS))
        chain = ChainReport(chain_id, base_seq=base[0], head_seq=base[0], head_hash=base[1])
        report.chains.append(chain)
        mine = marks.get(chain_id, [])
        expect = {int(m["seq"]): str(m["hash"]) for m in mine if int(m["seq"]) > base[0]}
        for a in wanted:
            if a[0] == chain_id:
                expect.setdefault(a[1], a[2])
        if chain_id in chains:
            await _walk(engine, keys, chain, base, expect, page_size)
        _check_marks(keys, chain, mine, base_known=chain_id in bases)
        anchored = [a for a in wanted if a[0] == chain_id and a[1] > base[0]]
        for _, seq, _digest in anchored:
            if seq > chain.head_seq:
                chain.bad(seq, "truncated", f"the anchored event {seq} is gone")
    _check_witnesses(report, marks, bases)
    return report


async def _walk(
    engine: AsyncEngine,
    keys: ChainKeys,
    report: ChainReport,
    base: tuple[int, str],
    expect: dict[int, str],
    page_size: int,
) -> None:
    chain_id = report.chain_id
    expected_prev, expected_seq = base[1], base[0] + 1
    last = base[0]
    c = audit_events.c
    while report.ok:
        query = (
            select(*_COLUMNS)
            .where(c.chain_id == chain_id, c.seq > last)
            .order_by(c.seq)
            .limit(page_size)
        )
        async with engine.connect() as conn:
            rows = (await conn.execute(query)).all()
        if not rows:
            return
        for row in rows:
            values = dict(row._mapping)
            seq = int(values["seq"])
            if values["key_id"] not in keys.by_id:
                return report.bad(seq, "edited", f"event {seq} names an unknown key")
            if keys.hash(values["key_id"], values["prev_hash"], values) != values["hash"]:
                # The seq is hashed: an event moved to another place no longer matches.
                where = await _seq_of_hash(engine, chain_id, values["prev_hash"])
                if where is not None and where != seq - 1:
                    return report.bad(
                        seq,
                        "reordered",
                        f"event {seq} follows event {where}: the order was changed",
                    )
                return report.bad(seq, "edited", f"event {seq} was edited after it was written")
            if values["prev_hash"] != expected_prev or seq != expected_seq:
                where = await _seq_of_hash(engine, chain_id, values["prev_hash"])
                if where is not None and where != seq - 1:
                    return report.bad(
                        seq,
                        "reordered",
                        f"event {seq} follows event {where}: the order was changed",
                    )
                if values["prev_hash"] != expected_prev:
                    return report.bad(
                        seq,
                        "deleted",
                        f"event(s) before {seq} were deleted (the chain breaks there)",
                    )
                return report.bad(seq, "reordered", f"event {seq} is out of sequence")
            if seq in expect and expect[seq] != values["hash"]:
                return report.bad(seq, "edited", f"event {seq} is not the one checkpointed")
            report.checked += 1
            expected_prev, expected_seq = values["hash"], seq + 1
            report.head_seq, report.head_hash = seq, values["hash"]
        last = int(rows[-1].seq)


def _check_marks(
    keys: ChainKeys, report: ChainReport, marks: list[dict[str, Any]], *, base_known: bool
) -> None:
    """The chain's own checkpoints: each under the chain key, chained to the one before,
    none missing, and the chain reaches the head each recorded."""
    report.checkpoints = len(marks)
    prev: dict[str, Any] | None = None
    for mark in marks:
        n, seq = int(mark["n"]), int(mark["seq"])
        legacy = report.chain_id == LEGACY_CHAIN and mark["mac"] is None
        if not legacy:
            key_id = mark["key_id"]
            if key_id not in keys.by_id or keys.checkpoint_mac(key_id, mark) != mark["mac"]:
                return report.bad(seq, "edited", f"checkpoint {n} was edited after it was written")
        if prev is None:
            if n != 1 and not base_known:
                return report.bad(seq, "truncated", f"checkpoints before {n} were deleted")
        elif n != int(prev["n"]) + 1 or mark["prev_mac"] != prev["mac"]:
            return report.bad(seq, "truncated", f"checkpoints before {n} were deleted")
        elif prev["closed"]:
            return report.bad(seq, "edited", f"checkpoint {n} follows the chain's close")
        prev = mark
    if prev is None:
        return
    report.checkpoint_seq = int(prev["seq"])
    report.closed = bool(prev["closed"])
    report.writer = str(prev["writer"])
    if report.ok and report.head_seq < report.checkpoint_seq:
        report.bad(
            report.head_seq + 1,
            "truncated",
            f"events {report.head_seq + 1}..{report.checkpoint_seq} were deleted from the end"
            " (below a checkpointed head)",
        )
    elif report.ok and report.closed and report.head_seq > report.checkpoint_seq:
        report.bad(
            report.checkpoint_seq + 1, "edited", "events follow the chain's closing checkpoint"
        )


def _check_witnesses(
    report: LogReport,
    marks: dict[str, list[dict[str, Any]]],
    bases: dict[str, tuple[int, str]],
) -> None:
    """What each checkpoint saw of the other chains is still there."""
    by_id = {c.chain_id: c for c in report.chains}
    present = {(chain, int(m["n"])) for chain, rows in marks.items() for m in rows}
    for chain_id, rows in marks.items():
        for mark in rows:
            for other, (n, seq, _digest) in mark["witness"].items():
                target = by_id[other]
                if not target.ok or seq <= bases.get(other, (0, GENESIS))[0]:
                    continue
                if target.checked == 0 and target.checkpoints == 0:
                    target.bad(
                        None,
                        "removed",
                        f"the chain is gone; chain {chain_id} saw it at event {seq}"
                        f" (its checkpoint {n})",
                    )
                elif target.head_seq < seq:
                    target.bad(
                        target.head_seq + 1,
                        "truncated",
                        f"events {target.head_seq + 1}..{seq} were deleted from the end"
                        f" (chain {chain_id} saw them)",
                    )
                elif (other, n) not in present and other not in bases:
                    target.bad(seq, "truncated", f"its checkpoint {n} was deleted")


async def _prune_bases(conn: AsyncConnection) -> dict[str, tuple[int, str]]:
    t = audit_checkpoints.c
    newest = (
        select(t.chain_id, func.max(t.seq).label("seq")).group_by(t.chain_id).subquery("newest")
    )
    query = select(t.chain_id, t.seq, t.hash).join(
        newest, and_(newest.c.chain_id == t.chain_id, newest.c.seq == t.seq)
    )
    return {str(r.chain_id): (int(r.seq), str(r.hash)) for r in (await conn.execute(query)).all()}


async def _checkpoints(conn: AsyncConnection) -> dict[str, list[dict[str, Any]]]:
    t = audit_chain_checkpoints
    rows = (await conn.execute(select(t).order_by(t.c.chain_id, t.c.n))).all()
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        values = dict(row._mapping)
        values["witness"] = values["witness"] or {}
        out[str(values["chain_id"])].append(values)
    return dict(out)


async def _seq_of_hash(engine: AsyncEngine, chain_id: str, digest: str) -> int | None:
    c = audit_events.c
    async with engine.connect() as conn:
        value = (
            await conn.execute(select(c.seq).where(c.chain_id == chain_id, c.hash == digest))
        ).scalar()
    return None if value is None else int(value)


@dataclass(slots=True)
class PruneResult:
    pruned: int
    #: where each chain now starts: chain id → the newest deleted event's seq
    cuts: dict[str, int] = field(default_factory=dict)

    @property
    def checkpoint_seq(self) -> int:
        return max(self.cuts.values(), default=0)


async def prune(engine: AsyncEngine, before: datetime, now: datetime) -> PruneResult:
    """Delete events older than ``before``, chain by chain; a base per chain (the newest
    deleted event's position and hash) keeps the rest verifiable. Writers go on appending
    meanwhile: a prune deletes from the bottom of their chains, they add at the top."""
    c = audit_events.c
    result = PruneResult(0)
    async with engine.begin() as conn:
        cuts = (
            await conn.execute(
                select(c.chain_id, func.max(c.seq)).where(c.at < before).group_by(c.chain_id)
            )
        ).all()
        for chain_id, cut in cuts:
            row = (
                await conn.execute(select(c.hash).where(c.chain_id == chain_id, c.seq == cut))
            ).one()
            deleted = await conn.execute(
                delete(audit_events).where(c.chain_id == chain_id, c.seq <= cut)
            )
            await conn.execute(
                insert(audit_checkpoints).values(
                    chain_id=chain_id,
                    created_at=now,
                    seq=int(cut),
                    hash=row.hash,
                    pruned=deleted.rowcount,
                    before=before,
                )
            )
            # The chain's checkpoints below the cut go too, but for its newest.
            k = audit_chain_checkpoints.c
            newest = (
                await conn.execute(select(func.max(k.n)).where(k.chain_id == chain_id))
            ).scalar()
            if newest is not None:
                await conn.execute(
                    delete(audit_chain_checkpoints).where(
                        k.chain_id == chain_id, k.seq <= cut, k.n < newest
                    )
                )
            result.pruned += int(deleted.rowcount)
            result.cuts[str(chain_id)] = int(cut)
    return result
