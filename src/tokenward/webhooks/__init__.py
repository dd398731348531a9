"""Webhooks: one sender for every event tokenward tells the outside world about.

* :mod:`.signing` — Standard Webhooks signatures (``webhook-id``, ``-timestamp``,
  ``-signature``), secrets, URL rules; what receivers (and the SDK) verify with
* :mod:`.tables`  — endpoints, and deliveries (queue and log in one)
* :mod:`.store`   — endpoints and deliveries in SQL
* :mod:`.sender`  — the queue's dispatcher (retries, backoff, bounds), and in-memory
  delivery for rotations (decision 0006)
* :mod:`.events`  — which admin actions, security events and alerts become which webhook

See docs/webhooks.md. This ``__init__`` imports nothing, so the SDK's signature check
(:mod:`.signing`, standard library only) does not pull in the server.
"""
