"""Identities: the owners of tokens (a user of a project's API, by the project's own id).

An identity has an external id unique in its project (``user_123``), metadata, and a rate
limit that all its tokens share: one counter per identity, in memory or in Redis, so a user
cannot escape the limit by making more keys. Verification answers name the token's identity;
deleting an identity revokes its tokens on every replica at once.

* :mod:`~tokenward.identities.model`: the identity as the domain sees it (no I/O);
* :mod:`~tokenward.identities.store`: the table's repository (SQLite and PostgreSQL);
* :mod:`~tokenward.identities.service`: the admin operations and their rules.
"""

from tokenward.identities.model import Identity

__all__ = ["Identity"]
