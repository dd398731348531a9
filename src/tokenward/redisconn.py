"""Redis clients that survive a Redis restart without failing once per pooled connection.

A bare ``Redis.from_url`` keeps every pooled connection after the server went away, and the
first command on each of them fails: redis-py 8's maintenance notifications (``auto`` by
default) switch off the pool's check that a connection taken from the pool was closed by the
server. A Redis restart then cost one failed call per pooled connection and per process: a
lost revocation publish, a 503 on a rate-limited verification, a 503 from ``/readyz``.

Three kinds of client, one per kind of call:

* :func:`connect` with ``retries`` > 0, for calls that are safe to repeat (``PUBLISH`` of an
  invalidation, ``PING``): a connection error or a timeout is retried on a fresh connection
  with a short backoff, and a connection idle for :data:`HEALTH_CHECK_SECONDS` is pinged
  before it is used.
* :func:`connect` with ``retries=0``, for calls that must not run twice (the rate-limit script
  counts a hit: if its reply is lost, running it again would count the hit twice). Only a
  connection known to be closed *before anything is written to it* is replaced (the pool's
  check, which this module switches back on); an error once the command was sent fails the
  call (fail closed, 503).
* the fan-out subscriber, also with ``retries=0``: redis-py would otherwise reconnect and
  resubscribe a dead subscription by itself, hiding the gap in which invalidations were
  missed; the fan-out must see every loss to switch its cache off.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.exceptions import ConnectionError, TimeoutError

#: a command that gets no answer within this many seconds fails (fail closed)
SOCKET_TIMEOUT = 2.0
#: connecting (TCP + handshake) gives up after this many seconds
CONNECT_TIMEOUT = 1.0
#: a connection idle longer than this is pinged before use (retrying clients only)
HEALTH_CHECK_SECONDS = 5
#: first and largest pause between two attempts of a retried call, in seconds
BACKOFF_BASE = 0.05
BACKOFF_CAP = 0.5
#: retries of a call that is safe to repeat (3 attempts in all, about 0.15 s at most)
SAFE_RETRIES = 2


def _pool_check_kwargs() -> dict[str, Any]:
    """Switch maintenance notifications off where redis-py has them (7.x and later).

    With them on (``enabled="auto"``, the default), ``ConnectionPool.ensure_connection``
    skips its test for a connection the server closed, and such a connection is handed out
    as if it were alive. tokenward talks to plain Redis, which sends no such notifications.
    """
    try:
        from redis.maint_notifications import MaintNotificationsConfig
    except ImportError:  # older redis-py: the pool always checks
        return {}
    return {"maint_notifications_config": MaintNotificationsConfig(enabled=False)}


def connect(url: str, *, retries: int = SAFE_RETRIES) -> Redis:
    """A client for ``url`` (``redis://``, ``rediss://``, ``unix://``; an ``async+`` prefix
    is dropped). ``retries`` > 0 only for commands that are safe to run twice."""
    url = url.removeprefix("async+")
    kwargs: dict[str, Any] = {
        "socket_timeout": SOCKET_TIMEOUT,
        "socket_connect_timeout": CONNECT_TIMEOUT,
        **_pool_check_kwargs(),
    }
    if not url.startswith("unix:"):  # TCP keepalive; a unix socket connection refuses it
        kwargs["socket_keepalive"] = True
    if retries > 0:
        backoff = ExponentialWithJitterBackoff(cap=BACKOFF_CAP, base=BACKOFF_BASE)
        kwargs["retry"] = Retry(backoff, retries)
        kwargs["retry_on_error"] = [ConnectionError, TimeoutError]
        kwargs["health_check_interval"] = HEALTH_CHECK_SECONDS
    else:
        kwargs["retry"] = Retry(NoBackoff(), 0)
    return Redis.from_url(url, **kwargs)
