"""Request bodies of the admin API: closed (unknown fields are refused) and bounded."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Annotated, Literal

from fastapi import Request
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StringConstraints, field_validator

from tokenward.errors import Invalid
from tokenward.tokens.durations import parse_duration, parse_rates
from tokenward.tokens.scopes import parse_scope

ProjectName = Annotated[
    str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$", max_length=63)
]
#: No control characters in stored text: PostgreSQL cannot store NUL, and none belongs in a label.
PRINTABLE = r"^[^\x00-\x1f\x7f]*$"
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def printable(value: str) -> bool:
    """Whether ``value`` is free of control characters (what :data:`PRINTABLE` requires)."""
    return _CONTROL.search(value) is None


async def printable_parameters(request: Request) -> None:
    """Router dependency: no query or path parameter (name or value) has a control character.

    Values are checked again, field by field, by each route; this rule holds for all of
    them, including any route added later.
    """
    for name, value in (*request.query_params.multi_items(), *request.path_params.items()):
        if not printable(name) or not printable(str(value)):
            raise Invalid("invalid_request", f"{name[:40]!r}: control characters are not allowed")


#: A project name or id, a token id, a pagination cursor: what identifiers are made of.
IDENTIFIER = r"^[A-Za-z0-9_-]+$"
ShortText = Annotated[str, StringConstraints(max_length=128, pattern=PRINTABLE)]
Cidr = Annotated[str, StringConstraints(min_length=1, max_length=64)]
#: At most this many networks in an IP allowlist.
MAX_ALLOWLIST = 100
#: A token's remaining uses: at least one, at most a billion.
MAX_USES = 1_000_000_000
IpAllowlist = Annotated[list[Cidr], Field(max_length=MAX_ALLOWLIST)]
Uses = Annotated[int, Field(ge=1, le=MAX_USES)]
MetaKey = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=PRINTABLE)]
MetaValue = Annotated[str, StringConstraints(max_length=512, pattern=PRINTABLE)]


class Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ProjectCreate(Closed):
    name: ProjectName = Field(description="Lower-case letters, digits, '-' and '_'.")


class ProjectUpdate(Closed):
    ip_allowlist: IpAllowlist = Field(
        description="IPv4/IPv6 CIDRs its tokens may be used from; [] for any."
    )


class TokenCreate(Closed):
    project: Annotated[str, StringConstraints(max_length=64, pattern=IDENTIFIER)] | None = None
    environment: Literal["live", "test"] = "live"
    scopes: list[Annotated[str, StringConstraints(max_length=128)]] = Field(
        min_length=1, max_length=64
    )
    name: ShortText = ""
    principal: ShortText | None = None
    kind: Literal["api_key", "canary"] = "api_key"
    ttl: Annotated[str, StringConstraints(max_length=32)] | None = Field(
        None, description="Lifetime such as 90d, 12h, 15m."
    )
    expires_at: AwareDatetime | None = None
    not_before: AwareDatetime | None = None
    ip_allowlist: IpAllowlist = Field(default_factory=list)
    rate_limit: Annotated[str, StringConstraints(max_length=200)] | None = Field(
        None, description="One or more windows: 100/minute or 10/second;1000/hour."
    )
    uses: Uses | None = None
    metadata: dict[MetaKey, MetaValue] = Field(default_factory=dict, max_length=32)

    @field_validator("scopes")
    @classmethod
    def _scopes(cls, value: list[str]) -> list[str]:
        for scope in value:
            parse_scope(scope)
        return value

    @field_validator("ttl")
    @classmethod
    def _ttl(cls, value: str | None) -> str | None:
        if value is not None:
            parse_duration(value)
        return value

    @field_validator("rate_limit")
    @classmethod
    def _rate(cls, value: str | None) -> str | None:
        if value is not None:
            parse_rates(value)
        return value

    def ttl_delta(self) -> timedelta | None:
        return parse_duration(self.ttl) if self.ttl else None


class TokenSettings(Closed):
    """The settings of a token a person types into a dashboard form, under the API's rules
    (the same field types as :class:`TokenCreate`)."""

    name: ShortText = ""
    principal: ShortText | None = None
    ip_allowlist: IpAllowlist = Field(default_factory=list)
    uses: Uses | None = None


class TokenRevoke(Closed):
    reason: Annotated[str, StringConstraints(max_length=200, pattern=PRINTABLE)] = ""


class TokenRotate(Closed):
    grace: Annotated[str, StringConstraints(max_length=32)] = Field(
        "1h", description="How long the old token keeps working (0 for no overlap)."
    )

    @field_validator("grace")
    @classmethod
    def _grace(cls, value: str) -> str:
        if value not in ("0", "0s"):
            parse_duration(value)
        return value

    def grace_delta(self) -> timedelta:
        return timedelta(0) if self.grace in ("0", "0s") else parse_duration(self.grace)
