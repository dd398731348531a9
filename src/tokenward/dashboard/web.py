"""The plumbing every page shares: state, sessions, CSRF, rendering, step-up.

Security of every page rests here:

* the session cookie is ``Secure; HttpOnly; SameSite=Strict`` and names a server-side session
  (only its keyed hash is stored), with idle and absolute timeouts;
* every POST carries exactly one CSRF token bound to the session (or, before sign-in, to a
  pre-session cookie), and a cross-origin ``Origin`` is refused outright;
* no form field or query parameter may carry a control character (other than a line break
  or a tab in a form), and numbers are ASCII digits: what the database cannot store, or
  Python reads differently than a person, is refused where it enters;
* every page is sent with a strict Content-Security-Policy (no inline script or style) and
  ``Cache-Control: no-store``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from pydantic import ValidationError
from starlette.datastructures import FormData

from tokenward.anomaly.store import AnomalyStore
from tokenward.dashboard.accounts import Accounts, Session, SessionPolicy, User
from tokenward.dashboard.activity import Activity
from tokenward.dashboard.security import DashboardKeys, new_session_id
from tokenward.errors import TooManyRequests
from tokenward.limits import RateLimiter
from tokenward.store.repository import Project

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=HERE / "templates")


def _with_cursor(params: Any, cursor: str | None) -> str:
    """The query string of ``params`` on another page (``None``: the first)."""
    values = {k: v for k, v in dict(params).items() if k not in ("cursor", "page")}
    if cursor:
        values["cursor"] = cursor
    return urlencode(values)


templates.env.filters["urlencode_cursor"] = _with_cursor

PREFIX = "/dashboard"
SESSION_COOKIE = "tw_session"
PRE_COOKIE = "tw_pre"
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)


@dataclass
class DashboardState:
    accounts: Accounts
    activity: Activity
    alerts: AnomalyStore


def attach(app: FastAPI, services: Any) -> DashboardState:
    """Build the dashboard's state on ``services`` (once per services)."""
    existing: DashboardState | None = getattr(services, "_dashboard", None)
    if existing is None:
        settings = services.settings
        policy = SessionPolicy(
            idle=timedelta(minutes=settings.dashboard_idle_minutes),
            absolute=timedelta(hours=settings.dashboard_session_hours),
            step_up=timedelta(seconds=settings.dashboard_step_up_seconds),
            login_rate_account=settings.dashboard_login_rate,
            login_rate_ip=settings.dashboard_login_rate_ip,
        )
        limiter = RateLimiter(settings.redis_url, namespace=settings.redis_prefix + "login")
        accounts = Accounts(
            services.engine,
            DashboardKeys(services.hasher),
            services.events,
            policy=policy,
            limiter=limiter,
            clock=lambda: services.verifier.clock(),
        )
        existing = DashboardState(
            accounts, Activity(services.engine), AnomalyStore(services.engine)
        )
        services._dashboard = existing
    app.state.dashboard = existing
    return existing


def dash(request: Request) -> DashboardState:
    state: DashboardState = request.app.state.dashboard
    return state


def services_of(request: Request) -> Any:
    return request.app.state.services


# -- control flow as exceptions (turned into responses in routes.install) ------------------
class Redirect(Exception):
    def __init__(self, location: str) -> None:
        self.location = location


class PageError(Exception):
    def __init__(self, status: int, title: str, message: str) -> None:
        self.status = status
        self.title = title
        self.message = message


def url(path: str = "/") -> str:
    return PREFIX + path


def safe_next(value: str | None) -> str:
    """Only a dashboard path may be a redirect target (no open redirect)."""
    if (
        value
        and value.startswith(PREFIX + "/")
        and not value.startswith("//")
        and "\\" not in value
    ):
        return value
    return url("/")


def client_ip(request: Request) -> str | None:
    return request.client.host if request.client else None


# -- sessions ------------------------------------------------------------------------------
async def session_of(request: Request, *, partial: bool = False) -> Session:
    """The caller's session; redirect to sign-in when there is none (or MFA is still due)."""
    session_id = request.cookies.get(SESSION_COOKIE)
    session = await dash(request).accounts.load_session(session_id)
    if session is None:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise Redirect(url("/login") + "?next=" + quote(safe_next(target), safe="/"))
    if not session.signed_in and not partial:
        raise Redirect(url("/login/mfa" if session.user.mfa_enrolled else "/mfa/setup"))
    request.state.session_id = session_id
    request.state.session = session
    return session


def set_session_cookie(request: Request, response: Response, session_id: str) -> None:
    response.set_cookie(
        SESSION_COOKIE,
        session_id,
        httponly=True,
        secure=True,
        samesite="strict",
        path=PREFIX,
    )


def clear_session_cookie(response: Response) -> None:
    response.delete_cookie(
        SESSION_COOKIE, path=PREFIX, secure=True, httponly=True, samesite="strict"
    )


def csrf_for(request: Request) -> str:
    keys = dash(request).accounts.keys
    session_id = getattr(request.state, "session_id", None)
    if session_id:
        return keys.csrf_token(session_id)
    pre = getattr(request.state, "pre_id", None) or request.cookies.get(PRE_COOKIE)
    if not pre:
        pre = new_session_id()
        request.state.new_pre_id = pre
    request.state.pre_id = pre
    return keys.csrf_token("pre:" + pre)


async def checked_form(request: Request) -> FormData:
    """The POSTed form, once its origin and CSRF token are confirmed; 403 otherwise."""
    # Defence in depth: a browser names the page a form came from. ("null" is what it sends
    # under Referrer-Policy: no-referrer; the CSRF token below decides those.) Hosts are
    # compared, not schemes, so a TLS-terminating proxy in front does not break forms.
    origin = request.headers.get("origin")
    if origin not in (None, "null") and urlsplit(origin).netloc != request.headers.get("host"):
        raise PageError(403, "Refused", "This form was sent from another site.")
    form = await request.form()
    if len(form.getlist("csrf")) > 1:
        raise PageError(403, "Refused", "The form carries more than one security token.")
    presented = form.get("csrf")
    keys = dash(request).accounts.keys
    session_id = getattr(request.state, "session_id", None)
    if session_id:
        ok = keys.csrf_ok(session_id, presented if isinstance(presented, str) else None)
    else:
        pre = request.cookies.get(PRE_COOKIE)
        ok = bool(pre) and keys.csrf_ok(
            "pre:" + (pre or ""), presented if isinstance(presented, str) else None
        )
    if not ok:
        raise PageError(
            403,
            "Form expired or forged",
            "The form's security token is missing or wrong. Reload the page and try again.",
        )
    for key, value in form.multi_items():
        if _FORM_CONTROL.search(key) or (isinstance(value, str) and _FORM_CONTROL.search(value)):
            raise PageError(
                400, "Not accepted", "The form contains control characters: remove them."
            )
    return form


#: Control characters no form field may carry (tab and line breaks are typed by people).
_FORM_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def whole_number(text: str) -> bool:
    """ASCII digits only: ``"²".isdigit()`` and ``"١٢".isdigit()`` are true in Python."""
    return text.isascii() and text.isdigit()


def query_values(request: Request, names: dict[str, int]) -> dict[str, str]:
    """The query parameters ``names`` (name → longest value), stripped; a 400 page for any
    other parameter, a repeated one, a longer value or a control character."""
    out: dict[str, str] = {}
    for key, value in request.query_params.multi_items():
        if key not in names:
            raise PageError(400, "Bad filter", f"Unknown parameter {key[:40]!r}.")
        if key in out:
            raise PageError(400, "Bad filter", f"{key} is given more than once.")
        if _CONTROL.search(value) or len(value) > names[key]:
            raise PageError(400, "Bad filter", f"{key}: invalid value.")
        out[key] = value.strip()
    return out


def form_problems(exc: ValidationError) -> str:
    """A person's reading of a schema's refusal: the field and the rule, never the value."""
    problems = []
    for err in exc.errors()[:5]:
        field = ".".join(str(p) for p in err.get("loc", ())) or "form"
        kind = err.get("type", "")
        if kind == "string_pattern_mismatch":
            text = "must not contain control characters"
        elif kind == "int_parsing":
            text = "must be a whole number (digits 0-9)"
        else:
            text = str(err.get("msg", "invalid value"))
        problems.append(f"{field.replace('_', ' ')}: {text}")
    return "; ".join(problems) or "invalid value"


def form_text(form: FormData, name: str, limit: int = 256) -> str:
    value = form.get(name)
    if not isinstance(value, str):
        return ""
    return value.strip()[:limit]


def form_list(form: FormData, name: str, limit: int = 256) -> list[str]:
    return [v.strip()[:limit] for v in form.getlist(name) if isinstance(v, str) and v.strip()]


# -- rendering -----------------------------------------------------------------------------
def page_headers(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = CSP
    response.headers["Cache-Control"] = "no-store"
    return response


def render(request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
    session: Session | None = getattr(request.state, "session", None)
    ctx = {
        "request": request,
        "csrf": csrf_for(request),
        "session": session,
        "me": session.user if session and session.signed_in else None,
        "url": url,
        **context,
    }
    response = templates.TemplateResponse(request, template, ctx, status_code=status)
    page_headers(response)
    new_pre = getattr(request.state, "new_pre_id", None)
    if new_pre:
        response.set_cookie(
            PRE_COOKIE, new_pre, httponly=True, secure=True, samesite="strict", path=PREFIX
        )
    return response


def redirect(location: str) -> RedirectResponse:
    response = RedirectResponse(location, status_code=303)
    page_headers(response)
    return response


def require_writer(user: User) -> None:
    if not user.can_write:
        raise PageError(
            403, "Read-only access", "Your role is viewer: you can see this project, not change it."
        )


def require_owner(user: User) -> None:
    if not user.is_owner:
        raise PageError(403, "Owners only", "Only an owner can manage users and roles.")


async def user_names(request: Request) -> dict[str, str]:
    """User id → login, to show people by name in trails and feeds."""
    return {u.id: u.login for u in await dash(request).accounts.list_users()}


async def visible_projects(request: Request, user: User) -> list[Project]:
    projects: list[Project] = await services_of(request).store.list_projects(
        None if user.is_owner else user.project_ids
    )
    return projects


async def project_for(request: Request, user: User, name: str) -> Project:
    project: Project | None = await services_of(request).store.get_project(name)
    if project is None or not user.sees(project.id):
        raise PageError(404, "Not found", f"There is no project named {name!r} that you can see.")
    return project


async def ensure_step_up(
    request: Request, session: Session, form: FormData, why: str
) -> HTMLResponse | None:
    """``None`` when the session proved its second factor recently (or does so now, with the
    ``step_up_code`` field); otherwise the prompt, which re-sends the same form with a code."""
    accounts = dash(request).accounts
    if accounts.stepped_up(session):
        return None
    error = None
    code = form_text(form, "step_up_code", 32)
    if code:
        try:
            if await accounts.verify_second_factor(session.user, code, client_ip(request)):
                await accounts.step_up(session)
                return None
            error = "That code is not valid (or was already used). Wait for the next one."
        except TooManyRequests as exc:
            error = exc.message
    keep = [(k, v) for k, v in form.multi_items() if k not in ("csrf", "step_up_code")]
    return render(
        request,
        "step_up.html",
        401 if error else 200,
        action=request.url.path,
        keep=keep,
        why=why,
        error=error,
    )
