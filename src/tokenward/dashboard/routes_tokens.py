"""Projects overview and tokens: list, create (secret shown once), detail, rotate, revoke.

Every change goes through :class:`~tokenward.service.TokenService` with the user as actor
(:func:`~tokenward.dashboard.accounts.actor_for`), so the dashboard obeys exactly the rules
of the API and emits the same events.
"""

from __future__ import annotations

import re
from collections import Counter
from datetime import UTC, datetime, time, timedelta
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import ValidationError
from starlette.datastructures import FormData

from tokenward.anomaly.store import AlertFilter
from tokenward.api.schemas import TokenSettings, printable
from tokenward.dashboard import charts
from tokenward.dashboard.accounts import User, actor_for
from tokenward.dashboard.activity import Query
from tokenward.dashboard.web import (
    PageError,
    checked_form,
    dash,
    ensure_step_up,
    form_list,
    form_problems,
    form_text,
    project_for,
    redirect,
    render,
    require_writer,
    services_of,
    session_of,
    url,
    user_names,
    visible_projects,
    whole_number,
)
from tokenward.errors import TokenwardError
from tokenward.pagination import MAX_CURSOR, decode_cursor, micros
from tokenward.service import TOKEN_CURSOR, TokenChanges, TokenSpec, lifetime_days, token_cursor
from tokenward.store.repository import Project, TokenQuery
from tokenward.tokens.credits import parse_refill
from tokenward.tokens.durations import DurationError, parse_duration, parse_rates
from tokenward.tokens.model import CANARY_SCOPE, TokenKind, TokenRecord, TokenState
from tokenward.tokens.scopes import ScopeError, scope_covers, scopes_allow, validate_scopes

router = APIRouter()

PROJECT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
EXPIRY_PRESETS = [
    ("1d", "1 day"),
    ("7d", "7 days"),
    ("30d", "30 days"),
    ("90d", "90 days"),
    ("365d", "1 year"),
    ("date", "on a date…"),
    ("never", "never"),
]
ROTATION_PRESETS = [("", "no schedule"), ("30d", "every 30 days"), ("90d", "every 90 days")]
GRACE_PRESETS = [
    ("0", "none: the old token stops now"),
    ("1h", "1 hour"),
    ("24h", "1 day"),
    ("7d", "7 days"),
]
PAGE_SIZE = 50
ADMIN_SCOPES = ("admin:read", "admin:write")


def now_of(request: Request) -> datetime:
    clock: datetime = services_of(request).verifier.clock()
    return clock


async def tokens_of(request: Request, user: User, project: Project | None) -> list[TokenRecord]:
    """Every token of ``project`` (or, for an owner, of every project), via the service."""
    service = services_of(request).tokens
    actor = actor_for(user, project.id if project else None)
    out: list[TokenRecord] = []
    after = None
    while len(out) < 50_000:
        batch = await service.list_tokens(
            actor, project=project.id if project else None, limit=1000, after=after
        )
        out.extend(batch)
        if len(batch) < 1000:
            break
        after = batch[-1].id
    return out


def is_admin_scoped(scopes: list[str]) -> bool:
    return any(scope_covers(s, need) for s in scopes for need in ADMIN_SCOPES)


# -- overview ------------------------------------------------------------------------------
@router.get("/")
async def overview(request: Request) -> Response:
    session = await session_of(request)
    user = session.user
    now = now_of(request)
    projects = await visible_projects(request, user)
    since = (now - timedelta(hours=23)).replace(minute=0, second=0, microsecond=0)
    activity = dash(request).activity
    cards = []
    service = services_of(request).tokens
    counted: dict[str | None, dict[str, int]] = {}
    if user.is_owner:
        counted = await service.token_states(actor_for(user, None))
    for project in projects:
        if not user.is_owner:
            counted.update(
                await service.token_states(actor_for(user, project.id), project=project.id)
            )
        states = Counter(counted.get(project.id, {}))
        buckets = await activity.hourly(Query(project_ids=[project.id]), since=since, until=now)
        open_alerts, _ = await dash(request).alerts.list_alerts(
            AlertFilter(project_ids=[project.id], acknowledged=False), limit=100
        )
        cards.append(
            {
                "project": project,
                "states": states,
                "total": sum(states.values()),
                "strip": charts.state_strip(states, f"tokens of {project.name} by state"),
                "requests": sum(b.allowed + b.denied_total for b in buckets),
                "denied": sum(b.denied_total for b in buckets),
                "chart": charts.activity_bars(
                    buckets, f"requests and denials of {project.name}, last 24 hours"
                ),
                "open_alerts": len(open_alerts),
            }
        )
    return render(request, "overview.html", cards=cards, state_order=charts.STATE_ORDER)


@router.post("/projects")
async def create_project(request: Request) -> Response:
    session = await session_of(request)
    form = await checked_form(request)
    user = session.user
    require_writer(user)
    name = form_text(form, "name", 64).lower()
    error = None
    if not PROJECT_NAME.match(name):
        error = "A project name is 1-63 lower-case letters, digits, '-' or '_'."
    else:
        try:
            project = await services_of(request).tokens.create_project(actor_for(user, None), name)
        except TokenwardError as exc:
            error = exc.message
        else:
            if not user.is_owner:
                await dash(request).accounts.add_membership(user, project.id)
            return redirect(url(f"/p/{project.name}/tokens"))
    raise PageError(422, "Project not created", error)


# -- tokens list ---------------------------------------------------------------------------
def _meta_pair(params: dict[str, str]) -> dict[str, str]:
    key, _, value = params.get("meta", "").partition("=")
    return {key: value} if key else {}


def _filter(records: list[TokenRecord], params: dict[str, str], now: datetime) -> list[TokenRecord]:
    """The search in Python, token by token: the scope filter needs it (wildcards on both
    sides); the others are :func:`_query`'s, which the database applies."""
    text = params.get("q", "").lower()
    state = params.get("state", "")
    env = params.get("env", "")
    scope = params.get("scope", "")
    expiring = params.get("expiring", "")
    unused = params.get("unused", "")
    name = params.get("name", "")
    principal = params.get("principal")
    kind = params.get("kind", "")
    meta = _meta_pair(params)
    out = []
    for r in records:
        if text and not any(text in (v or "").lower() for v in (r.name, r.id, r.principal, r.hint)):
            continue
        if name and not r.name.startswith(name):
            continue
        if principal is not None and r.principal != principal:
            continue
        if kind and r.kind != kind:
            continue
        if any(r.metadata.get(k) != v for k, v in meta.items()):
            continue
        st = r.state(now).value
        if state and st != state:
            continue
        if env and r.environment != env:
            continue
        if scope and not (
            scopes_allow(r.scopes, scope) if ":" in scope else any(scope in s for s in r.scopes)
        ):
            continue
        if expiring:
            days = int(expiring)
            if r.expires_at is None or not (now < r.expires_at <= now + timedelta(days=days)):
                continue
            if st in ("revoked", "rotated"):
                continue
        if unused:
            cutoff = now - timedelta(days=int(unused))
            used = r.last_used_at or r.created_at
            if used > cutoff or st in ("revoked", "rotated", "expired"):
                continue
        out.append(r)
    out.sort(key=lambda r: (r.created_at, r.id), reverse=True)
    return out


def _query(params: dict[str, str]) -> TokenQuery:
    """The filters of :func:`_filter` (all but ``scope``), for the store to apply."""
    return TokenQuery(
        text=params.get("q", "").lower(),
        name_prefix=params.get("name") or None,
        principal=params.get("principal"),
        kind=params.get("kind") or None,
        metadata=_meta_pair(params),
        state=params.get("state") or None,
        environment=params.get("env") or None,
        expiring_days=int(params["expiring"]) if params.get("expiring") else None,
        unused_days=int(params["unused"]) if params.get("unused") else None,
    )


KINDS = [k.value for k in TokenKind]


def _params(request: Request) -> dict[str, str]:
    allowed = {
        "q": 64,
        "name": 128,
        "principal": 128,
        "kind": 16,
        "meta": 600,
        "state": 20,
        "env": 4,
        "scope": 128,
        "expiring": 3,
        "unused": 3,
        "cursor": MAX_CURSOR,
    }
    out = {}
    for key, limit in allowed.items():
        value = request.query_params.get(key, "").strip()[:limit]
        if value:
            out[key] = value
    if not all(printable(v) for v in out.values()):
        raise PageError(400, "Bad filter", "a filter contains control characters")
    for key in ("expiring", "unused"):
        if key in out and not whole_number(out[key]):
            raise PageError(400, "Bad filter", f"{key} must be a whole number")
    if out.get("state") and out["state"] not in {s.value for s in TokenState}:
        raise PageError(400, "Bad filter", "unknown state")
    if out.get("env") and out["env"] not in ("live", "test"):
        raise PageError(400, "Bad filter", "environment is live or test")
    if out.get("kind") and out["kind"] not in KINDS:
        raise PageError(400, "Bad filter", "unknown kind")
    if out.get("meta") and "=" not in out["meta"].strip("="):
        raise PageError(400, "Bad filter", "metadata is key=value")
    return out


def _page_of(
    records: list[TokenRecord], cursor: str | None
) -> tuple[list[TokenRecord], str | None]:
    """A cursor page of a list already in the search's order (the scope filter's path)."""
    key = decode_cursor(TOKEN_CURSOR, cursor, (int, str))
    if key is not None:
        records = [r for r in records if (micros(r.created_at), r.id) < key]
    shown = records[:PAGE_SIZE]
    more = len(records) > PAGE_SIZE
    return shown, token_cursor(shown[-1]) if more and shown else None


@router.get("/p/{name}/tokens")
async def tokens_page(request: Request, name: str) -> Response:
    session = await session_of(request)
    project = await project_for(request, session.user, name)
    params = _params(request)
    now = now_of(request)
    cursor = params.get("cursor")
    try:
        if params.get("scope"):
            # Scope matching has wildcards on both sides: decided here, token by token.
            records = _filter(await tokens_of(request, session.user, project), params, now)
            total: int | None = len(records)
            shown, next_cursor = _page_of(records, cursor)
        else:
            page = await services_of(request).tokens.search_tokens(
                actor_for(session.user, project.id),
                _query(params),
                project=project.id,
                limit=PAGE_SIZE,
                cursor=cursor,
                count=True,
            )
            shown, next_cursor, total = page.tokens, page.next_cursor, page.total
    except TokenwardError as exc:
        raise PageError(exc.status, "Bad filter", exc.message) from None
    filters = {k: v for k, v in params.items() if k != "cursor"}
    return render(
        request,
        "tokens.html",
        project=project,
        tokens=shown,
        total=total,
        next_cursor=next_cursor,
        paged=cursor is not None,
        params=filters,
        now=now,
        states=[s.value for s in TokenState],
        kinds=KINDS,
        done=request.query_params.get("done"),
    )


@router.post("/p/{name}/revoke-all")
async def revoke_all(request: Request, name: str) -> Response:
    session = await session_of(request)
    project = await project_for(request, session.user, name)
    form = await checked_form(request)
    require_writer(session.user)
    prompt = await ensure_step_up(
        request, session, form, f"Revoking every token of {project.name} stops all its clients."
    )
    if prompt is not None:
        return prompt
    reason = form_text(form, "reason", 200) or "revoked with all tokens of the project"
    service = services_of(request).tokens
    actor = actor_for(session.user, project.id)
    now = now_of(request)
    count = 0
    for record in await tokens_of(request, session.user, project):
        if record.state(now) not in (TokenState.REVOKED, TokenState.ROTATED, TokenState.EXPIRED):
            await service.revoke_token(actor, record.id, reason)
            count += 1
    return redirect(url(f"/p/{project.name}/tokens?done=revoked-{count}"))


# -- create --------------------------------------------------------------------------------
def _form_defaults() -> dict[str, Any]:
    return {"environment": "live", "kind": "api_key", "expiry": "90d", "scopes": "", "rotation": ""}


@router.get("/p/{name}/tokens/new")
async def new_token_page(request: Request, name: str) -> Response:
    session = await session_of(request)
    project = await project_for(request, session.user, name)
    require_writer(session.user)
    return render(
        request,
        "token_new.html",
        project=project,
        values=_form_defaults(),
        max_days=await _max_days(request, project),
        **_choices(),
    )


async def _max_days(request: Request, project: Project) -> int | None:
    return lifetime_days(await services_of(request).store.project_settings(project.id))


def _choices() -> dict[str, Any]:
    return {"expiry_presets": EXPIRY_PRESETS, "rotation_presets": ROTATION_PRESETS}


def token_settings(**values: Any) -> TokenSettings:
    """``values`` checked by the API's rules; :class:`ValueError` with a message for a person."""
    try:
        return TokenSettings.model_validate(values)
    except ValidationError as exc:
        raise ValueError(form_problems(exc)) from None


def spec_from_form(form: FormData, project: Project, now: datetime) -> TokenSpec:
    """Read and check the create form; :class:`ValueError` with a message for a person."""
    scopes = validate_scopes(
        s for line in form_list(form, "scopes", 4096) for s in re.split(r"[\s,]+", line) if s
    )
    kind = form_text(form, "kind", 16) or TokenKind.API_KEY.value
    if kind not in (TokenKind.API_KEY.value, TokenKind.CANARY.value):
        raise ValueError("The kind is an API key or a canary.")
    if not scopes and kind == TokenKind.CANARY.value:
        scopes = [CANARY_SCOPE]  # a canary authorises nothing: its scopes are decoration
    if not scopes:
        raise ValueError("Give at least one scope, such as records:read.")
    environment = form_text(form, "environment", 4) or "live"
    if environment not in ("live", "test"):
        raise ValueError("The environment is live or test.")
    expiry = form_text(form, "expiry", 8)
    ttl = expires_at = None
    if expiry == "date":
        day = form_text(form, "expires_on", 10)
        try:
            expires_at = datetime.combine(datetime.fromisoformat(day).date(), time(23, 59, 59), UTC)
        except ValueError:
            raise ValueError("Pick the expiry date (YYYY-MM-DD).") from None
    elif expiry != "never":
        ttl = parse_duration(expiry or "90d")
    cidrs = [
        c for line in form_list(form, "ip_allowlist", 4096) for c in re.split(r"[\s,]+", line) if c
    ]
    rate = form_text(form, "rate_limit", 200)
    checked = token_settings(
        name=form_text(form, "name", 256),
        principal=form_text(form, "principal", 256) or None,
        ip_allowlist=cidrs,
        uses=form_text(form, "uses", 32) or None,
    )
    metadata = {}
    rotation = form_text(form, "rotation", 8)
    if rotation:
        parse_duration(rotation)
        metadata["rotate_every"] = rotation
    refill_text, refill_day = form_text(form, "refill", 24), form_text(form, "refill_day", 4)
    if refill_day and not whole_number(refill_day):
        raise ValueError("The refill day is a day of the month, 1 to 31.")
    refill = (
        parse_refill(refill_text, int(refill_day) if refill_day else None) if refill_text else None
    )
    return TokenSpec(
        project=project.id,
        scopes=scopes,
        environment=environment,
        kind=kind,
        name=checked.name,
        principal=checked.principal,
        expires_at=expires_at,
        ttl=ttl,
        ip_allowlist=checked.ip_allowlist,
        rate_limit=parse_rates(rate) if rate else [],
        uses=checked.uses,
        metadata=metadata,
        identity=form_text(form, "identity", 128) or None,
        refill=refill,
    )


@router.post("/p/{name}/tokens")
async def create_token(request: Request, name: str) -> Response:
    session = await session_of(request)
    project = await project_for(request, session.user, name)
    form = await checked_form(request)
    require_writer(session.user)
    values = {k: "\n".join(form_list(form, k, 4096)) for k in form}
    error = None
    try:
        spec = spec_from_form(form, project, now_of(request))
    except (ScopeError, DurationError, ValueError) as exc:
        error = str(exc)
    if error is None:
        if is_admin_scoped(spec.scopes):
            prompt = await ensure_step_up(
                request, session, form, "This token can administer tokenward itself."
            )
            if prompt is not None:
                return prompt
        try:
            issued = await services_of(request).tokens.create_token(
                actor_for(session.user, project.id), spec
            )
        except TokenwardError as exc:
            error = exc.message
        else:
            return render(
                request, "token_secret.html", 201, project=project, issued=issued, title="New token"
            )
    return render(
        request,
        "token_new.html",
        422,
        project=project,
        values=values,
        error=error,
        max_days=await _max_days(request, project),
        **_choices(),
    )


# -- detail and actions --------------------------------------------------------------------
async def _token(request: Request, user: User, project: Project, token_id: str) -> TokenRecord:
    try:
        record: TokenRecord = await services_of(request).tokens.get_token(
            actor_for(user, project.id), token_id[:32]
        )
    except TokenwardError:
        raise PageError(404, "Not found", "There is no such token in this project.") from None
    return record


@router.get("/p/{name}/tokens/{token_id}")
async def token_page(request: Request, name: str, token_id: str) -> Response:
    session = await session_of(request)
    project = await project_for(request, session.user, name)
    record = await _token(request, session.user, project, token_id)
    now = now_of(request)
    activity = dash(request).activity
    q = Query(project_ids=[project.id], token_id=record.id)
    since = (now - timedelta(hours=23)).replace(minute=0, second=0, microsecond=0)
    buckets = await activity.hourly(q, since=since, until=now)
    reasons: Counter[str] = Counter()
    for b in buckets:
        reasons.update(b.denied)
    trail = await activity.query(Query(project_ids=[project.id], token_id=record.id, limit=100))
    return render(
        request,
        "token_detail.html",
        project=project,
        token=record,
        state=record.state(now).value,
        now=now,
        chart=charts.activity_bars(buckets, f"requests of {record.id}, last 24 hours"),
        reasons=charts.reason_bars(reasons, "denials by reason, last 24 hours"),
        requests=sum(b.allowed + b.denied_total for b in buckets),
        denied=sum(reasons.values()),
        trail=trail,
        users=await user_names(request),
        grace_presets=GRACE_PRESETS,
        done=request.query_params.get("done"),
    )


@router.post("/p/{name}/tokens/{token_id}/revoke")
async def revoke_token(request: Request, name: str, token_id: str) -> Response:
    session = await session_of(request)
    project = await project_for(request, session.user, name)
    form = await checked_form(request)
    require_writer(session.user)
    record = await _token(request, session.user, project, token_id)
    reason = form_text(form, "reason", 200) or "revoked in the dashboard"
    await services_of(request).tokens.revoke_token(
        actor_for(session.user, project.id), record.id, reason
    )
    return redirect(url(f"/p/{project.name}/tokens/{record.id}?done=revoked"))


@router.post("/p/{name}/tokens/{token_id}/rotate")
async def rotate_token(request: Request, name: str, token_id: str) -> Response:
    session = await session_of(request)
    project = await project_for(request, session.user, name)
    form = await checked_form(request)
    require_writer(session.user)
    record = await _token(request, session.user, project, token_id)
    grace_text = form_text(form, "grace", 8) or "1h"
    try:
        grace = timedelta(0) if grace_text == "0" else parse_duration(grace_text)
        if is_admin_scoped(record.scopes):
            prompt = await ensure_step_up(
                request, session, form, "The new token can administer tokenward itself."
            )
            if prompt is not None:
                return prompt
        issued, old = await services_of(request).tokens.rotate_token(
            actor_for(session.user, project.id), record.id, grace
        )
    except (TokenwardError, DurationError) as exc:
        message = exc.message if isinstance(exc, TokenwardError) else str(exc)
        raise PageError(422, "Not rotated", message) from None
    return render(
        request,
        "token_secret.html",
        201,
        project=project,
        issued=issued,
        previous=old,
        title="Rotated: the new token",
    )


def _split(form: FormData, name: str) -> list[str]:
    return [v for line in form_list(form, name, 4096) for v in re.split(r"[\s,]+", line) if v]


def _metadata_lines(form: FormData) -> dict[str, str]:
    """The metadata textarea: one ``key=value`` a line (the API's limits)."""
    out: dict[str, str] = {}
    for line in form_list(form, "metadata", 40_000):
        for entry in line.splitlines():
            if not entry.strip():
                continue
            key, sep, value = entry.strip().partition("=")
            if not sep or not key.strip() or len(key) > 64 or len(value) > 512:
                raise ValueError("Metadata is one key=value a line (key ≤ 64, value ≤ 512).")
            out[key.strip()] = value.strip()
    if len(out) > 32:
        raise ValueError("At most 32 metadata entries.")
    return out


@router.post("/p/{name}/tokens/{token_id}/disable")
async def disable_token(request: Request, name: str, token_id: str) -> Response:
    """Switch the token off (reversible): the same service call as the API's."""
    session = await session_of(request)
    project = await project_for(request, session.user, name)
    form = await checked_form(request)
    require_writer(session.user)
    record = await _token(request, session.user, project, token_id)
    reason = form_text(form, "reason", 300) or "disabled in the dashboard"
    try:
        await services_of(request).tokens.disable_token(
            actor_for(session.user, project.id), record.id, reason
        )
    except TokenwardError as exc:
        raise PageError(exc.status, "Not disabled", exc.message) from None
    return redirect(url(f"/p/{project.name}/tokens/{record.id}?done=disabled"))


@router.post("/p/{name}/tokens/{token_id}/enable")
async def enable_token(request: Request, name: str, token_id: str) -> Response:
    session = await session_of(request)
    project = await project_for(request, session.user, name)
    form = await checked_form(request)
    require_writer(session.user)
    record = await _token(request, session.user, project, token_id)
    try:
        await services_of(request).tokens.enable_token(
            actor_for(session.user, project.id), record.id, form_text(form, "note", 300)
        )
    except TokenwardError as exc:
        raise PageError(exc.status, "Not enabled", exc.message) from None
    return redirect(url(f"/p/{project.name}/tokens/{record.id}?done=enabled"))


@router.post("/p/{name}/tokens/{token_id}/settings")
async def edit_token(request: Request, name: str, token_id: str) -> Response:
    """Change settings within the rules: scopes, lifetime and uses only shrink."""
    session = await session_of(request)
    project = await project_for(request, session.user, name)
    form = await checked_form(request)
    require_writer(session.user)
    record = await _token(request, session.user, project, token_id)
    try:
        expires_at = None
        day = form_text(form, "expires_on", 10)
        if day and (record.expires_at is None or day != record.expires_at.date().isoformat()):
            expires_at = datetime.combine(datetime.fromisoformat(day).date(), time(23, 59, 59), UTC)
        checked = token_settings(
            name=form_text(form, "name", 256),
            ip_allowlist=_split(form, "ip_allowlist"),
            uses=form_text(form, "uses", 32) or None,
        )
        rate = form_text(form, "rate_limit", 200)
        changes = TokenChanges(
            name=checked.name,
            scopes=validate_scopes(_split(form, "scopes")),
            expires_at=expires_at,
            ip_allowlist=checked.ip_allowlist,
            rate_limit=parse_rates(rate) if rate else [],
            uses=checked.uses,
            metadata=_metadata_lines(form) if "metadata" in form else None,
        )
        await services_of(request).tokens.update_token(
            actor_for(session.user, project.id), record.id, changes
        )
    except TokenwardError as exc:
        raise PageError(exc.status, "Not changed", exc.message) from None
    except (ValueError, ScopeError, DurationError) as exc:
        raise PageError(422, "Not changed", str(exc) or "invalid value") from None
    return redirect(url(f"/p/{project.name}/tokens/{record.id}?done=updated"))
