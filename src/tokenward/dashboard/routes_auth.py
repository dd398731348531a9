"""Sign-in (password, then TOTP or a recovery code), MFA enrolment, step-up, sign-out."""

from __future__ import annotations

import io

import segno
from fastapi import APIRouter, Request
from fastapi.responses import Response
from markupsafe import Markup

from tokenward.dashboard import security
from tokenward.dashboard.web import (
    checked_form,
    clear_session_cookie,
    client_ip,
    dash,
    ensure_step_up,
    form_text,
    redirect,
    render,
    safe_next,
    session_of,
    set_session_cookie,
    url,
)
from tokenward.errors import TooManyRequests
from tokenward.events import recorded_header

router = APIRouter()


def qr_svg(text: str) -> Markup:
    """The QR code of ``text`` as inline SVG, made here (the secret never leaves the server)."""
    out = io.BytesIO()
    segno.make(text, error="m").save(
        out, kind="svg", scale=5, border=3, xmldecl=False, svgclass="qr", dark="#111", light="#fff"
    )
    return Markup(out.getvalue().decode())  # noqa: S704 - SVG generated here, no user markup


@router.get("/login")
async def login_page(request: Request, next: str | None = None) -> Response:
    return render(request, "login.html", next=safe_next(next))


@router.post("/login")
async def login(request: Request) -> Response:
    form = await checked_form(request)
    accounts = dash(request).accounts
    login_name = form_text(form, "login", 64)
    next_url = safe_next(form_text(form, "next", 512))
    try:
        user = await accounts.check_password(
            login_name, form_text(form, "password"), client_ip(request)
        )
    except TooManyRequests as exc:
        return render(
            request, "login.html", 429, error=exc.message, next=next_url, login=login_name
        )
    if user is None:
        return render(
            request,
            "login.html",
            401,
            error="Wrong login or password.",
            next=next_url,
            login=login_name,
        )
    session_id = await accounts.open_session(
        user, client_ip(request), recorded_header(request.headers.get("user-agent"))
    )
    target = url("/login/mfa") if user.mfa_enrolled else url("/mfa/setup")
    response = redirect(target + "?next=" + next_url)
    set_session_cookie(request, response, session_id)
    return response


@router.get("/login/mfa")
async def mfa_page(request: Request, next: str | None = None) -> Response:
    session = await session_of(request, partial=True)
    if session.signed_in:
        return redirect(safe_next(next))
    if not session.user.mfa_enrolled:
        return redirect(url("/mfa/setup"))
    return render(request, "mfa.html", next=safe_next(next))


@router.post("/login/mfa")
async def mfa_submit(request: Request) -> Response:
    session = await session_of(request, partial=True)
    form = await checked_form(request)
    accounts = dash(request).accounts
    next_url = safe_next(form_text(form, "next", 512))
    try:
        ok = await accounts.verify_second_factor(
            session.user, form_text(form, "code", 32), client_ip(request)
        )
    except TooManyRequests as exc:
        return render(request, "mfa.html", 429, error=exc.message, next=next_url)
    if not ok:
        return render(
            request,
            "mfa.html",
            401,
            error="That code is not valid, or was already used. Wait for the next one.",
            next=next_url,
        )
    new_id = await accounts.complete_mfa(session)
    response = redirect(next_url)
    set_session_cookie(request, response, new_id)
    return response


@router.get("/mfa/setup")
async def enrol_page(request: Request) -> Response:
    session = await session_of(request, partial=True)
    if session.user.mfa_enrolled:
        return redirect(url("/"))
    secret = await dash(request).accounts.begin_enrolment(session)
    uri = security.totp_uri(secret, session.user.login)
    return render(request, "enrol.html", qr=qr_svg(uri), secret=secret)


@router.post("/mfa/setup")
async def enrol_submit(request: Request) -> Response:
    session = await session_of(request, partial=True)
    form = await checked_form(request)
    if session.user.mfa_enrolled:
        return redirect(url("/"))
    accounts = dash(request).accounts
    codes = await accounts.finish_enrolment(session, form_text(form, "code", 32))
    if codes is None:
        secret = await accounts.begin_enrolment(session)
        uri = security.totp_uri(secret, session.user.login)
        return render(
            request,
            "enrol.html",
            401,
            qr=qr_svg(uri),
            secret=secret,
            error="That code does not match. Check the time on your device and try again.",
        )
    new_id = await accounts.complete_mfa(session)
    request.state.session_id = new_id
    request.state.session = await accounts.load_session(new_id)
    response = render(request, "recovery_codes.html", codes=codes, first=True)
    set_session_cookie(request, response, new_id)
    return response


@router.post("/logout")
async def logout(request: Request) -> Response:
    session = await session_of(request, partial=True)
    await checked_form(request)
    await dash(request).accounts.close_session(session)
    response = redirect(url("/login"))
    clear_session_cookie(response)
    return response


@router.get("/account")
async def account_page(request: Request) -> Response:
    session = await session_of(request)
    accounts = dash(request).accounts
    return render(
        request,
        "account.html",
        codes_left=await accounts.recovery_codes_left(session.user),
        sessions=await accounts.count_sessions(session.user),
    )


@router.post("/account/password")
async def change_password(request: Request) -> Response:
    session = await session_of(request)
    form = await checked_form(request)
    accounts = dash(request).accounts
    current, new, again = (
        form_text(form, "current"),
        form_text(form, "new"),
        form_text(form, "again"),
    )
    error = None
    try:
        user = await accounts.check_password(session.user.login, current, client_ip(request))
    except TooManyRequests as exc:
        user, error = None, exc.message
    if user is None:
        error = error or "The current password is wrong."
    elif new != again:
        error = "The two new passwords differ."
    if error is None:
        try:
            await accounts.set_password(session.user.id, new, actor=session.user)
        except Exception as exc:  # Invalid: too short
            error = getattr(exc, "message", "That password cannot be used.")
    if error is not None:
        return render(
            request,
            "account.html",
            422,
            error=error,
            codes_left=await accounts.recovery_codes_left(session.user),
            sessions=await accounts.count_sessions(session.user),
        )
    response = redirect(url("/login?next=/dashboard/account"))
    clear_session_cookie(response)
    return response


@router.post("/account/recovery-codes")
async def regenerate_codes(request: Request) -> Response:
    session = await session_of(request)
    form = await checked_form(request)
    prompt = await ensure_step_up(
        request, session, form, "New recovery codes replace the old ones."
    )
    if prompt is not None:
        return prompt
    codes = await dash(request).accounts.new_recovery_codes(session.user)
    return render(request, "recovery_codes.html", codes=codes, first=False)
