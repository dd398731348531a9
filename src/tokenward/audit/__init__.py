"""The audit log: every decision and admin action, hash-chained, durable, queryable.

* :mod:`.records` — what one event stores, and the keyed hash chaining events together;
* :mod:`.writer` — the group-committing writer subscribed to the event bus;
* :mod:`.query` — the read API (:func:`list_events`), export;
* :mod:`.chain` — verification of the chain and retention with checkpoints.
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
