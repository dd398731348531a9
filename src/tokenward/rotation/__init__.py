"""Automatic rotation of long-lived tokens and warnings before they expire.

* :mod:`.scheduler` — the runner: one replica per tick rotates what is due, delivers the
  successor to the token's webhook before keeping it, retires quiet predecessors, warns.

Its rows (``token_rotations``) and queries live with the session store
(:mod:`tokenward.oauth.store`), its admin operations in :mod:`tokenward.oauth.admin`.
"""
