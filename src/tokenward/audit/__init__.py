"""The audit log: every decision and admin action, hash-chained, durable, queryable.

* :mod:`.records` — what one event stores, and the keyed hash chaining events together;
* :mod:`.writer` — the group-committing writer subscribed to the event bus, one chain each;
* :mod:`.sinks` — where a writer appends (SQLite, PostgreSQL), its chain's checkpoints;
* :mod:`.query` — the read API (:func:`list_events`), the chains merged in time order;
* :mod:`.chain` — verification of every chain against the checkpoints, and retention.
"""

from tokenward.audit.query import AuditEvent, AuditFilter, AuditPage, export_jsonl, list_events
from tokenward.audit.records import AuditRecord, ChainKeys
from tokenward.audit.writer import AuditWriter

__all__ = [
    "AuditEvent",
    "AuditFilter",
    "AuditPage",
    "AuditRecord",
    "AuditWriter",
    "ChainKeys",
    "export_jsonl",
    "list_events",
]
