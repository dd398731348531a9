"""Structured JSON logs (structlog). Never log a token: log its id or hint."""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import sys
from collections.abc import MutableMapping
from datetime import UTC, datetime
from typing import Any

import orjson
import structlog

from tokenward.tokens.format import redact_all, redact_tokens


class AccessLogSink:
    """The per-request access log: JSON lines on stderr, written in blocks.

    One line per request is the hottest log of all, so it skips structlog's processor chain
    (same fields and format: ``event``, ``level``, ``timestamp`` and the request's own) and
    leaves it to the event loop to write what piled up at most ``interval`` seconds later, or
    as soon as ``limit`` bytes are waiting: one write for many requests, not one each.
    Everything waiting is written at shutdown (:meth:`flush`, also run at exit).
    """

    def __init__(
        self, *, interval: float = 0.2, limit: int = 64 * 1024, stream: Any = None
    ) -> None:
        #: where lines go (``None``: whatever ``sys.stderr`` is when they are written)
        self.stream = stream
        self.enabled = False  # set by configure_logging, from the log level
        self.interval = interval
        self.limit = limit
        self._buffer = bytearray()
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        atexit.register(self.flush)

    def request(self, **fields: Any) -> None:
        if not self.enabled:
            return
        stamp = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        for name, value in fields.items():
            if type(value) is str:
                fields[name] = redact_tokens(value)
        entry = {"event": "request", "level": "info", "timestamp": stamp, **fields}
        try:
            self._buffer += orjson.dumps(entry, option=orjson.OPT_APPEND_NEWLINE)
        except TypeError:  # a lone surrogate in a path: escaped, as structlog would
            self._buffer += json.dumps(entry).encode() + b"\n"
        if len(self._buffer) >= self.limit:
            self.flush()
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop to write later: now
            self.flush()
            return
        if self._timer is None or self._loop is not loop:  # none yet, or its loop is gone
            if self._timer is not None:
                self._timer.cancel()
            self._loop = loop
            self._timer = loop.call_later(self.interval, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._buffer:
            return
        data = bytes(self._buffer)
        self._buffer.clear()
        stream = self.stream or sys.stderr
        try:
            buffer = getattr(stream, "buffer", None)
            if buffer is not None:
                buffer.write(data)
            else:
                stream.write(data.decode())
            stream.flush()
        except (OSError, ValueError):  # stderr closed or gone: nothing better to do
            pass


#: The process's access log (``tokenward serve`` turns it on through configure_logging).
access_log = AccessLogSink()


def redact_event(
    _logger: Any, _method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """A structlog processor: no token-shaped string in any value of a log line, however
    it got there (one rule with what is stored, :func:`~tokenward.tokens.format.holds_token`)."""
    for name, value in event.items():
        if isinstance(value, str) and ("tw" in value or "%" in value):
            event[name] = redact_tokens(value)
        elif isinstance(value, dict | list | tuple):
            event[name] = redact_all(value)
    return event


def configure_logging(level: str = "info") -> None:
    logging.basicConfig(
        format="%(message)s", stream=sys.stderr, level=getattr(logging, level.upper(), logging.INFO)
    )
    logging.getLogger("alembic").setLevel(logging.WARNING)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            redact_event,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            getattr(logging, level.upper(), logging.INFO)
        ),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    access_log.enabled = getattr(logging, level.upper(), logging.INFO) <= logging.INFO
