"""Structured JSON logs: every line the server writes, one format. Never log a token.

tokenward's own lines (``structlog.get_logger``) and those of every library it runs on
(uvicorn, aiohttp, alembic, asyncio, httpx, Python's warnings) go through the standard
library's logging to one handler on the root logger, whose formatter is structlog's
:class:`~structlog.stdlib.ProcessorFormatter`: one JSON object per line on stderr, with at
least ``event``, ``level``, ``logger`` and ``timestamp`` (ISO 8601, UTC), a traceback as the
``exception`` string, and every token-shaped string cut out (:func:`redact_event`). The
per-request access line (:class:`AccessLogSink`) is written apart, for speed, in the same
shape (``logger`` ``tokenward.access``). Log a token's id or hint, never the token.
"""

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
        entry = {
            "event": "request",
            "level": "info",
            "logger": "tokenward.access",
            "timestamp": stamp,
            **fields,
        }
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


class JSONLinesHandler(logging.Handler):
    """The root logger's handler: each record as one line on ``stream``, or on whatever
    ``sys.stderr`` is when it is written (a redirected or captured one)."""

    def __init__(self, stream: Any = None) -> None:
        super().__init__()
        self.stream = stream

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            stream = self.stream or sys.stderr
            stream.write(line + "\n")
            stream.flush()
        except Exception:
            self.handleError(record)


class _MigrationsOnly(logging.Filter):
    """alembic's informational lines that say what changed (``Running upgrade …``), not the
    two it writes on every start (``Context impl …``, ``Will assume …``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.INFO or str(record.msg).startswith("Running ")


#: Loggers that libraries give handlers of their own (uvicorn's default configuration):
#: theirs are removed, so that their lines reach the root handler like any other.
_LIBRARY_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "alembic", "aiohttp")

_SHARED: list[Any] = [
    structlog.contextvars.merge_contextvars,
    structlog.stdlib.add_log_level,
    structlog.stdlib.add_logger_name,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
]


def _dumps(entry: Any, **_options: Any) -> str:
    """One line of JSON, compact like the access log's (orjson; the standard library's for
    what orjson refuses, e.g. a lone surrogate, as the access log does)."""
    try:
        return orjson.dumps(entry, default=str).decode()
    except TypeError:
        return json.dumps(entry, default=str, separators=(",", ":"))


def _keys_first(
    _logger: Any, _method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """``event``, ``level``, ``logger``, ``timestamp`` first, as on an access line."""
    first = {key: event.pop(key) for key in _FIRST if key in event}
    first.update(event)
    return first


_FIRST = ("event", "level", "logger", "timestamp")


def formatter() -> structlog.stdlib.ProcessorFormatter:
    """The one format of every line: structlog's processors, for records of any origin."""
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=_SHARED,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            redact_event,
            _keys_first,
            structlog.processors.JSONRenderer(serializer=_dumps),
        ],
    )


def configure_logging(level: str = "info", stream: Any = None) -> None:
    """JSON lines at ``level`` and above, on ``stream`` (default: stderr), from tokenward and
    every library; the access log is on from ``info`` down. Safe to call again."""
    numeric = getattr(logging, level.upper(), logging.INFO)
    handler = JSONLinesHandler(stream)
    handler.setFormatter(formatter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, JSONLinesHandler)]:
        root.removeHandler(old)  # (others, e.g. a test runner's capture, stay)
    root.addHandler(handler)
    root.setLevel(numeric)
    for name in _LIBRARY_LOGGERS:
        library = logging.getLogger(name)
        library.handlers.clear()
        library.propagate = True
        library.setLevel(logging.NOTSET)
    for chatty in ("httpx", "httpcore"):  # a line per outbound request: the histograms say it
        logging.getLogger(chatty).setLevel(max(numeric, logging.WARNING))
    migration = logging.getLogger("alembic.runtime.migration")
    if not any(isinstance(f, _MigrationsOnly) for f in migration.filters):
        migration.addFilter(_MigrationsOnly())
    logging.captureWarnings(True)  # Python's warnings: log lines too, not raw stderr text
    structlog.configure(
        # redacted here too: a record's event dict is also what other handlers see
        processors=[*_SHARED, redact_event, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=True,
    )
    access_log.enabled = numeric <= logging.INFO
