"""An identity (owner of tokens) as the domain sees it (no I/O here)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from tokenward.tokens.model import TokenIdentity

#: what an external id is made of: a project's own user id (``user_123``, an email, a UUID)
EXTERNAL_ID = r"^[A-Za-z0-9][A-Za-z0-9_.@:+-]{0,127}$"
_EXTERNAL_ID = re.compile(EXTERNAL_ID)


def valid_external_id(value: str) -> bool:
    return isinstance(value, str) and _EXTERNAL_ID.match(value) is not None


@dataclass(slots=True)
class Identity:
    id: str
    project_id: str
    project: str
    external_id: str
    created_at: datetime
    updated_at: datetime
    metadata: dict[str, str] = field(default_factory=dict)
    #: windows counted once for all the identity's tokens (``["1000/hour"]``; empty: none)
    rate_limit: list[str] = field(default_factory=list)

    def as_token_identity(self) -> TokenIdentity:
        return TokenIdentity(self.id, self.external_id, dict(self.metadata), tuple(self.rate_limit))

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "project": self.project,
            "external_id": self.external_id,
            "metadata": dict(self.metadata),
            "rate_limit": ";".join(self.rate_limit) or None,
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at),
        }


def _iso(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")
