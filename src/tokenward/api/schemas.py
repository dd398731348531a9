"""Request bodies of the admin API: closed (unknown fields are refused) and bounded."""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import Request
from pydantic import (
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
)

from tokenward.errors import Invalid
from tokenward.identities.model import EXTERNAL_ID
from tokenward.tokens import credits
from tokenward.tokens.durations import parse_duration, parse_rates
from tokenward.tokens.scopes import parse_scope

#: A project's name: it is typed in commands and URLs.
PROJECT_NAME = r"^[a-z0-9][a-z0-9_-]{0,62}$"
ProjectName = Annotated[str, StringConstraints(pattern=PROJECT_NAME, max_length=63)]
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


def _json_integer(value: object) -> object:
    """A JSON integer (``3`` or ``3.0``), never ``true`` or ``"3"``, which pydantic reads too."""
    if isinstance(value, bool | str):
        raise ValueError("must be an integer")
    return value


#: (bounds go before it, ``Annotated[int, Field(ge=…), JSON_INTEGER]``, or the document loses them)
JSON_INTEGER = BeforeValidator(_json_integer)


#: A project name or id, a token id, a pagination cursor: what identifiers are made of.
IDENTIFIER = r"^[A-Za-z0-9_-]+$"

#: What a pattern of this module asks for, in words: an error names the rule, never a regex.
PATTERN_WORDS = {
    PROJECT_NAME: "1 to 63 lower-case letters, digits, '-' and '_', starting with a letter "
    "or a digit (e.g. shop, my-app)",
    IDENTIFIER: "letters, digits, '-' and '_' only",
    PRINTABLE: "text without control characters",
}

# Rules the code checks with a parser, written as patterns for the OpenAPI document only
# (``json_schema_extra``: the parsers stay the check, with their own error messages). Each
# pattern admits only values the parser accepts, so a request valid by the document is
# never refused for its form; a few accepted spellings are left out where a pattern cannot
# say them (compressed IPv6 beyond "::", durations of more than three parts).
_SEGMENT = r"(?:\*|[A-Za-z0-9_][A-Za-z0-9_.-]{0,63})"
SCOPE_PATTERN = rf"^{_SEGMENT}(?::{_SEGMENT}){{0,3}}$"
#: 1 to 3 parts, none zero, each small enough that the sum stays under the 3660-day cap
DURATION_PATTERN = r"^(?:[1-9][0-9]?w|[1-9][0-9]{0,2}[dhms]){1,3}$"
#: a duration of at most 30 days, or 0 for none
GRACE_PATTERN = (
    r"^(?:0s?|[1-4]w|(?:[1-9]|[12][0-9]|30)d|[1-9][0-9]?h|[1-6][0-9]{2}h"
    r"|[1-9][0-9]{0,3}m|[1-9][0-9]{0,5}s)$"
)
Grace = Annotated[
    str, StringConstraints(max_length=32), Field(json_schema_extra={"pattern": GRACE_PATTERN})
]
#: at most one day (trust policies' token lifetimes)
DAY_PATTERN = r"^(?:1d|[1-9]h|1[0-9]h|2[0-3]h|[1-9][0-9]{0,2}m|[1-9][0-9]{0,3}s)$"
_RATE_PART = r"[1-9][0-9]{0,8}/(?:second|minute|hour|day|month|year)"
RATE_PATTERN = rf"^{_RATE_PART}(?:;{_RATE_PART}){{0,7}}$"
#: the same, or "" for none (a change that removes the rate limit)
RATE_OR_NONE_PATTERN = rf"^(?:{_RATE_PART}(?:;{_RATE_PART}){{0,7}})?$"
_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_V4 = rf"(?:{_OCTET}\.){{3}}{_OCTET}"
_V6 = r"(?:(?:[0-9a-f]{1,4}:){7}[0-9a-f]{1,4}|::(?:[0-9a-f]{1,4})?)"
IP_PATTERN = rf"^(?:{_V4}|{_V6})$"
CIDR_PATTERN = (
    rf"^(?:{_V4}(?:/(?:3[0-2]|[12]?[0-9]))?|{_V6}(?:/(?:12[0-8]|1[01][0-9]|[1-9]?[0-9]))?)$"
)


#: an https URL without query, as webhook and issuer URLs must be (plain http to loopback
#: is accepted too, for development, and left out here)
HTTPS_URL_PATTERN = r"^https://[a-z0-9](?:[a-z0-9.-]{0,60}[a-z0-9])?(?::[1-9][0-9]{0,3})?(?:/[A-Za-z0-9._~/-]{0,200})?$"
_FIRST_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[3-9][0-9]|12[89]|12[0-6]|1[01][0-9]|[1-9][0-9]?)"
#: a manual IP block: a /8 (IPv4) or /32 (IPv6) or narrower, never loopback (the default
#: TOKENWARD_ANOMALY_NEVER_BLOCK), never an IPv4-mapped IPv6 form
BLOCK_PATTERN = (
    rf"^(?:{_FIRST_OCTET}(?:\.{_OCTET}){{3}}(?:/(?:3[0-2]|[12][0-9]|[89]))?"
    r"|[1-9a-f][0-9a-f]{0,3}(?::[0-9a-f]{1,4}){7}(?:/(?:12[0-8]|1[01][0-9]|[4-9][0-9]|3[2-9]))?)$"
)
#: an anchor of GET /v1/audit/verify: chain:seq:hash, or seq:hash for the legacy chain
AUDIT_ANCHOR = r"^(?:[A-Za-z0-9-]{1,32}:)?[0-9]{1,18}:[0-9a-f]{64}$"


def _rfc3339(value: object) -> object:
    """Only an RFC 3339 date-time, as documented (not the Unix timestamps pydantic reads)."""
    if isinstance(value, datetime):
        return value
    if not isinstance(value, str) or not _RFC3339.fullmatch(value):
        raise ValueError("must be an RFC 3339 date-time such as 2026-01-31T12:00:00Z")
    return value


_RFC3339 = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]+)?"
    r"(?:[Zz]|[+-][0-9]{2}:[0-9]{2})"
)
Rfc3339 = Annotated[AwareDatetime, BeforeValidator(_rfc3339)]


def documented(pattern: str, description: str | None = None) -> Any:
    """The OpenAPI ``pattern`` of a field a parser checks (see above)."""
    extra: dict[str, Any] = {"pattern": pattern}
    return Field(json_schema_extra=extra, description=description)


Scope = Annotated[str, StringConstraints(max_length=128), documented(SCOPE_PATTERN)]
Scopes = Annotated[list[Scope], Field(min_length=1, max_length=64)]
Duration = Annotated[str, StringConstraints(max_length=32), documented(DURATION_PATTERN)]
ShortText = Annotated[str, StringConstraints(max_length=128, pattern=PRINTABLE)]
Cidr = Annotated[str, StringConstraints(min_length=1, max_length=64), documented(CIDR_PATTERN)]
#: At most this many networks in an IP allowlist.
MAX_ALLOWLIST = 100
#: A token's remaining uses: at least one, at most a billion.
MAX_USES = 1_000_000_000
IpAllowlist = Annotated[list[Cidr], Field(max_length=MAX_ALLOWLIST)]
Uses = Annotated[int, Field(ge=1, le=MAX_USES)]  # a form's "11" too (the dashboard)
JsonUses = Annotated[int, Field(ge=1, le=MAX_USES), JSON_INTEGER]  # the API's JSON: 11 only
MetaKey = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=PRINTABLE)]
MetaValue = Annotated[str, StringConstraints(max_length=512, pattern=PRINTABLE)]


#: an identity's external id (the project's own user id)
ExternalId = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=EXTERNAL_ID)]
RateLimitText = Annotated[str, StringConstraints(max_length=200), documented(RATE_PATTERN)]
#: credits that refill, ``1000/month``
REFILL_PATTERN = r"^[1-9][0-9]{0,8}/(?:hour|day|month)$"
Refill = Annotated[str, StringConstraints(max_length=24, pattern=REFILL_PATTERN)]
RefillDay = Annotated[int, Field(ge=1, le=31), JSON_INTEGER]


class Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ProjectCreate(Closed):
    name: ProjectName = Field(description="Lower-case letters, digits, '-' and '_'.")


class ProjectUpdate(Closed):
    ip_allowlist: IpAllowlist = Field(
        description="IPv4/IPv6 CIDRs its tokens may be used from; [] for any."
    )


class TokenCreate(Closed):
    model_config = ConfigDict(
        extra="forbid",
        # ttl and expires_at are two ways to say one thing: not both
        json_schema_extra={
            "not": {
                "required": ["ttl", "expires_at"],
                "properties": {"ttl": {"type": "string"}, "expires_at": {"type": "string"}},
            },
            "dependentSchemas": {
                # an identity is one of the token's project
                "identity": {
                    "anyOf": [
                        {"properties": {"identity": {"type": "null"}}},
                        {"required": ["project"], "properties": {"project": {"type": "string"}}},
                    ]
                },
                # a day of the month goes with a monthly refill
                "refill_day": {
                    "anyOf": [
                        {"properties": {"refill_day": {"type": "null"}}},
                        {
                            "required": ["refill"],
                            "properties": {"refill": {"type": "string", "pattern": "/month$"}},
                        },
                    ]
                },
            },
        },
    )

    project: Annotated[str, StringConstraints(max_length=64, pattern=IDENTIFIER)] | None = None
    environment: Literal["live", "test"] = "live"
    scopes: Scopes
    name: ShortText = ""
    principal: ShortText | None = None
    kind: Literal["api_key", "canary"] = "api_key"
    ttl: Duration | None = Field(None, description="Lifetime such as 90d, 12h, 15m.")
    expires_at: Rfc3339 | None = None
    not_before: Rfc3339 | None = None
    ip_allowlist: IpAllowlist = Field(default_factory=list)
    rate_limit: (
        Annotated[str, StringConstraints(max_length=200), documented(RATE_PATTERN)] | None
    ) = Field(None, description="One or more windows: 100/minute or 10/second;1000/hour.")
    uses: JsonUses | None = None
    metadata: dict[MetaKey, MetaValue] = Field(
        default_factory=dict, max_length=32, json_schema_extra={"additionalProperties": False}
    )
    identity: ExternalId | None = Field(
        None, description="External id of the identity (owner) the token belongs to."
    )
    refill: Refill | None = Field(
        None,
        description="Credits that refill: remaining uses set back to N every hour, day or "
        "month (uses defaults to N).",
    )
    refill_day: RefillDay | None = Field(
        None, description="Day of the month of a monthly refill (1 to 31; default 1)."
    )
    strict: bool = Field(
        False,
        description="Refuse (422 unknown_scope) a scope that no route policy, no built-in "
        "scope and no token of the project uses, instead of answering a warning.",
    )

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

    def refill_spec(self) -> credits.Refill | None:
        """The refill asked for; a day without a monthly refill is refused (422)."""
        if self.refill is None:
            if self.refill_day is not None:
                raise Invalid("invalid_refill", "refill_day goes with a monthly refill only")
            return None
        try:
            return credits.parse_refill(self.refill, self.refill_day)
        except credits.CreditsError as exc:
            raise Invalid("invalid_refill", str(exc)) from None


class IdentityCreate(Closed):
    external_id: ExternalId = Field(description="The project's own id for its user.")
    metadata: dict[MetaKey, MetaValue] = Field(
        default_factory=dict, max_length=32, json_schema_extra={"additionalProperties": False}
    )
    rate_limit: RateLimitText | None = Field(
        None, description="Counted once for all the identity's tokens: 1000/hour."
    )


class IdentityUpdate(Closed):
    metadata: dict[MetaKey, MetaValue] | None = Field(
        None, max_length=32, json_schema_extra={"additionalProperties": False}
    )
    rate_limit: RateLimitText | Literal[""] | None = Field(
        None, description="New windows, or an empty string for none."
    )


class TokenSettings(Closed):
    """The settings of a token a person types into a dashboard form, under the API's rules
    (the same field types as :class:`TokenCreate`)."""

    name: ShortText = ""
    principal: ShortText | None = None
    ip_allowlist: IpAllowlist = Field(default_factory=list)
    uses: Uses | None = None


class TokenUpdate(Closed):
    """``PATCH /v1/tokens/{id}``: only the fields given change. Name, metadata, IP allowlist
    and rate limit change freely; scopes, expiry and uses only ever narrow (422 otherwise,
    naming the field)."""

    name: ShortText | None = None
    scopes: Scopes | None = Field(None, description="A subset of the current scopes.")
    expires_at: Rfc3339 | None = Field(None, description="No later than the current expiry.")
    ip_allowlist: IpAllowlist | None = Field(None, description="[] for any address.")
    rate_limit: (
        Annotated[str, StringConstraints(max_length=200), documented(RATE_OR_NONE_PATTERN)] | None
    ) = Field(None, description='One or more windows; "" for none.')
    uses: Annotated[int, Field(ge=0, le=MAX_USES), JSON_INTEGER] | None = Field(
        None, description="Remaining uses: no more than now."
    )
    metadata: dict[MetaKey, MetaValue] | None = Field(
        None,
        max_length=32,
        description="The whole metadata, replacing the old ({} clears it).",
        json_schema_extra={"additionalProperties": False},
    )

    @field_validator("scopes")
    @classmethod
    def _scopes(cls, value: list[str] | None) -> list[str] | None:
        for scope in value or []:
            parse_scope(scope)
        return value

    @field_validator("rate_limit")
    @classmethod
    def _rate(cls, value: str | None) -> str | None:
        if value:
            parse_rates(value)
        return value


class TokenDisable(Closed):
    reason: Annotated[str, StringConstraints(max_length=300, pattern=PRINTABLE)] = Field(
        "disabled by an admin", description="Why (kept with the token until it is enabled)."
    )


class TokenEnable(Closed):
    note: Annotated[str, StringConstraints(max_length=300, pattern=PRINTABLE)] = ""


class TokenRevoke(Closed):
    reason: Annotated[str, StringConstraints(max_length=200, pattern=PRINTABLE)] = ""


class TokenRotate(Closed):
    grace: Grace = Field("1h", description="How long the old token keeps working (0 for none).")

    @field_validator("grace")
    @classmethod
    def _grace(cls, value: str) -> str:
        if value not in ("0", "0s"):
            parse_duration(value)
        return value

    def grace_delta(self) -> timedelta:
        return timedelta(0) if self.grace in ("0", "0s") else parse_duration(self.grace)
