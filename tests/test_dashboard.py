"""The dashboard over HTTP (in process), on SQLite and PostgreSQL: sign-in, MFA, sessions,
CSRF, roles, step-up, tenant isolation, and bad input."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pyotp
import pytest
from sqlalchemy import select

from tokenward.app import Services, create_app
from tokenward.audit.query import parse_cursor
from tokenward.dashboard.accounts import Accounts, Role, actor_for
from tokenward.dashboard.tables import admin_sessions, admin_users
from tokenward.dashboard.web import CSP, DashboardState
from tokenward.service import TokenSpec
from tokenward.tokens.model import TokenState

PASSWORD = "correct horse battery staple"
T0 = datetime(2026, 5, 4, 12, 0, 0, tzinfo=UTC)


class Clock:
    """A clock the test moves; TOTP codes are computed for it."""

    def __init__(self, services: Services) -> None:
        self.now = T0
        services.verifier.clock = lambda: self.now

    def tick(self, seconds: float = 30) -> None:
        self.now += timedelta(seconds=seconds)


class Person:
    """One browser: a cookie jar, the last page's CSRF token, and an authenticator."""

    def __init__(self, client: httpx.AsyncClient, clock: Clock) -> None:
        self.client = client
        self.clock = clock
        self.secret: str | None = None
        self.csrf = ""

    def code(self) -> str:
        assert self.secret
        self.clock.tick(30)  # a new time step: a used code is never accepted twice
        return pyotp.TOTP(self.secret).at(self.clock.now)

    async def get(self, path: str, **kw) -> httpx.Response:
        response = await self.client.get(path, **kw)
        found = re.search(r'name="csrf" value="([^"]+)"', response.text)
        if found:
            self.csrf = found.group(1)
        return response

    async def post(self, path: str, data: dict | None = None, **kw) -> httpx.Response:
        response = await self.client.post(path, data={"csrf": self.csrf, **(data or {})}, **kw)
        found = re.search(r'name="csrf" value="([^"]+)"', response.text)
        if found:
            self.csrf = found.group(1)
        return response

    async def sign_in(self, login: str, password: str = PASSWORD) -> httpx.Response:
        await self.get("/dashboard/login")
        response = await self.post("/dashboard/login", {"login": login, "password": password})
        if response.status_code != 303:
            return response
        page = await self.get(response.headers["location"])
        if "totp-secret" in page.text:
            self.secret = re.search(r'id="totp-secret"[^>]*>([A-Z2-7]+)<', page.text).group(1)
            return await self.post("/dashboard/mfa/setup", {"code": self.code()})
        response = await self.post("/dashboard/login/mfa", {"code": self.code()})
        if response.status_code == 303:
            await self.get(response.headers["location"])
        return response


@pytest.fixture(autouse=True)
def _quick_password_hashing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Argon2 at its production cost takes ~0.2 s a hash; the rules tested here do not
    depend on the cost, so tests use the cheapest parameters."""
    from argon2 import PasswordHasher

    from tokenward.dashboard import security

    quick = PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1)
    monkeypatch.setattr(security, "_passwords", quick)
    monkeypatch.setattr(security, "_DUMMY_HASH", quick.hash("not a password"))


@pytest.fixture
async def dash(services: Services) -> AsyncIterator[tuple[httpx.AsyncClient, DashboardState]]:
    app = create_app(services=services)
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 50000))
    async with httpx.AsyncClient(transport=transport, base_url="https://tokenward.test") as c:
        yield c, app.state.dashboard


@pytest.fixture
def clock(services: Services) -> Clock:
    return Clock(services)


@pytest.fixture
def accounts(dash) -> Accounts:
    return dash[1].accounts


def person(dash, clock) -> Person:
    transport = dash[0]._transport
    return Person(httpx.AsyncClient(transport=transport, base_url="https://tokenward.test"), clock)


async def owner(dash, clock, accounts: Accounts, login: str = "olga") -> Person:
    await accounts.create_user(login, Role.OWNER, password=PASSWORD)
    p = person(dash, clock)
    response = await p.sign_in(login)
    assert response.status_code == 200 and "recovery-codes" in response.text
    return p


# -- sign-in ---------------------------------------------------------------------------------
async def test_enrolment_then_sign_in_with_password_and_totp(dash, clock, accounts):
    p = await owner(dash, clock, accounts)
    page = await p.get("/dashboard/")
    assert page.status_code == 200 and "Projects" in page.text
    cookie = page.request.headers.get("cookie", "")
    assert "tw_session=" in cookie
    # A second sign-in: password, then a code (enrolment is not asked again).
    q = person(dash, clock)
    q.secret = p.secret
    response = await q.sign_in("olga")
    assert response.status_code == 303 and response.headers["location"] == "/dashboard/"
    assert (await q.get("/dashboard/")).status_code == 200


async def test_session_cookie_flags_and_page_headers(dash, clock, accounts):
    await accounts.create_user("olga", Role.OWNER, password=PASSWORD)
    p = person(dash, clock)
    login = await p.get("/dashboard/login")
    assert login.headers["content-security-policy"] == CSP
    assert "script-src 'self'" in CSP and "unsafe-inline" not in CSP
    assert login.headers["cache-control"] == "no-store"
    response = await p.post("/dashboard/login", {"login": "olga", "password": PASSWORD})
    set_cookie = response.headers["set-cookie"].lower()
    assert "httponly" in set_cookie and "secure" in set_cookie and "samesite=strict" in set_cookie


async def test_wrong_password_and_unknown_login_look_the_same(dash, clock, accounts):
    await accounts.create_user("olga", Role.OWNER, password=PASSWORD)
    p = person(dash, clock)
    await p.get("/dashboard/login")
    wrong = await p.post("/dashboard/login", {"login": "olga", "password": "x" * 12})
    unknown = await p.post("/dashboard/login", {"login": "nobody", "password": "x" * 12})
    assert wrong.status_code == unknown.status_code == 401
    assert "Wrong login or password." in wrong.text and "Wrong login or password." in unknown.text


async def test_sign_in_attempts_are_rate_limited_per_account(dash, clock, accounts):
    await accounts.create_user("olga", Role.OWNER, password=PASSWORD)
    p = person(dash, clock)
    await p.get("/dashboard/login")
    statuses = [
        (await p.post("/dashboard/login", {"login": "olga", "password": "wrong" * 3})).status_code
        for _ in range(6)
    ]
    assert statuses == [401] * 5 + [429]
    # Even the right password is refused while the account is throttled.
    right = await p.post("/dashboard/login", {"login": "olga", "password": PASSWORD})
    assert right.status_code == 429 and "too many sign-in attempts" in right.text


async def test_password_alone_opens_no_page(dash, clock, accounts):
    p = await owner(dash, clock, accounts)
    q = person(dash, clock)
    await q.get("/dashboard/login")
    response = await q.post("/dashboard/login", {"login": "olga", "password": PASSWORD})
    assert response.headers["location"].startswith("/dashboard/login/mfa")
    for path in ("/dashboard/", "/dashboard/audit", "/dashboard/settings"):
        page = await q.client.get(path)
        assert page.status_code == 303 and page.headers["location"] == "/dashboard/login/mfa"
    assert p.secret


async def test_a_used_totp_code_is_refused(dash, clock, accounts):
    p = await owner(dash, clock, accounts)
    user = await accounts.get_user("olga")
    clock.tick(30)
    code = pyotp.TOTP(p.secret).at(clock.now)
    assert await accounts.verify_second_factor(user, code, "127.0.0.1")
    assert not await accounts.verify_second_factor(user, code, "127.0.0.1")  # replay
    # An older code (previous step, still inside the window) is refused after a newer one.
    older = pyotp.TOTP(p.secret).at(clock.now - timedelta(seconds=30))
    assert not await accounts.verify_second_factor(user, older, "127.0.0.1")


async def test_recovery_codes_work_once(dash, clock, accounts):
    p = await owner(dash, clock, accounts)
    user = await accounts.get_user("olga")
    codes = await accounts.new_recovery_codes(user)
    assert len(codes) == 10 and len(set(codes)) == 10
    assert await accounts.verify_second_factor(user, codes[3].upper(), None)
    assert not await accounts.verify_second_factor(user, codes[3], None)
    assert await accounts.recovery_codes_left(user) == 9
    assert p.secret


async def test_totp_secret_and_session_ids_are_not_stored_in_clear(dash, clock, accounts, services):
    p = await owner(dash, clock, accounts)
    async with services.engine.connect() as conn:
        stored = (await conn.execute(select(admin_users.c.totp_secret))).scalar_one()
        session_hashes = (await conn.execute(select(admin_sessions.c.id_hash))).scalars().all()
    assert p.secret not in stored and stored.startswith("tw1:")
    assert accounts.keys.decrypt(stored) == p.secret
    cookie = p.client.cookies.get("tw_session")
    assert cookie and cookie not in session_hashes
    tampered = stored[:-4] + ("AAAA" if not stored.endswith("AAAA") else "BBBB")
    with pytest.raises(ValueError):
        accounts.keys.decrypt(tampered)


async def test_session_id_changes_at_mfa_and_sign_out_ends_it(dash, clock, accounts):
    await accounts.create_user("olga", Role.OWNER, password=PASSWORD)
    p = person(dash, clock)
    await p.get("/dashboard/login")
    await p.post("/dashboard/login", {"login": "olga", "password": PASSWORD})
    before = p.client.cookies.get("tw_session")
    page = await p.get("/dashboard/mfa/setup")
    p.secret = re.search(r'id="totp-secret"[^>]*>([A-Z2-7]+)<', page.text).group(1)
    await p.post("/dashboard/mfa/setup", {"code": p.code()})
    after = p.client.cookies.get("tw_session")
    assert before != after
    stale = person(dash, clock)
    stale.client.cookies.set("tw_session", before, domain="tokenward.test", path="/dashboard")
    assert (
        (await stale.client.get("/dashboard/")).headers["location"].startswith("/dashboard/login")
    )
    await p.get("/dashboard/")
    out = await p.post("/dashboard/logout")
    assert out.status_code == 303
    replay = person(dash, clock)
    replay.client.cookies.set("tw_session", after, domain="tokenward.test", path="/dashboard")
    assert (await replay.client.get("/dashboard/")).status_code == 303


async def test_idle_and_absolute_timeouts(dash, clock, accounts):
    p = await owner(dash, clock, accounts)
    assert (await p.client.get("/dashboard/")).status_code == 200
    clock.tick(29 * 60)  # idle just under 30 minutes: still signed in (and touched)
    assert (await p.client.get("/dashboard/")).status_code == 200
    clock.tick(31 * 60)
    assert (await p.client.get("/dashboard/")).status_code == 303
    q = await owner(dash, clock, accounts, login="omar")
    for _ in range(25):  # active every 29 minutes, but for more than 12 hours
        clock.tick(29 * 60)
        last = await q.client.get("/dashboard/")
    assert last.status_code == 303


# -- CSRF and origin -------------------------------------------------------------------------
async def test_forms_without_csrf_or_from_another_site_are_refused(dash, clock, accounts, services):
    p = await owner(dash, clock, accounts)
    await p.get("/dashboard/")
    no_token = await p.client.post("/dashboard/projects", data={"name": "shop"})
    assert no_token.status_code == 403 and "Form expired or forged" in no_token.text
    wrong = await p.client.post("/dashboard/projects", data={"name": "shop", "csrf": "0" * 64})
    assert wrong.status_code == 403
    foreign = await p.post(
        "/dashboard/projects", {"name": "shop"}, headers={"Origin": "https://evil.example"}
    )
    assert foreign.status_code == 403
    assert await services.store.get_project("shop") is None
    ok = await p.post("/dashboard/projects", {"name": "shop"})
    assert ok.status_code == 303 and await services.store.get_project("shop") is not None


async def test_login_form_needs_its_pre_session_token(dash, clock, accounts):
    await accounts.create_user("olga", Role.OWNER, password=PASSWORD)
    p = person(dash, clock)
    response = await p.client.post("/dashboard/login", data={"login": "olga", "password": PASSWORD})
    assert response.status_code == 403


async def test_no_open_redirect_after_sign_in(dash, clock, accounts):
    await accounts.create_user("olga", Role.OWNER, password=PASSWORD)
    p = person(dash, clock)
    await p.get("/dashboard/login?next=//evil.example/x")
    response = await p.post(
        "/dashboard/login",
        {"login": "olga", "password": PASSWORD, "next": "https://evil.example/"},
    )
    assert response.headers["location"].endswith("?next=/dashboard/")


# -- roles, tenants, step-up -----------------------------------------------------------------
async def make_token(services: Services, project: str, **spec) -> str:
    admin = actor_for(
        (await Accounts(services.engine, None).list_users())[0],
        None,  # type: ignore[arg-type]
    )
    if await services.store.get_project(project) is None:
        await services.tokens.create_project(admin, project)
    issued = await services.tokens.create_token(
        admin, TokenSpec(project=project, scopes=spec.pop("scopes", ["records:read"]), **spec)
    )
    return issued.record.id


async def test_viewer_sees_but_cannot_change(dash, clock, accounts, services):
    await owner(dash, clock, accounts)
    token_id = await make_token(services, "shop")
    shop = await services.store.get_project("shop")
    await accounts.create_user("vera", Role.VIEWER, password=PASSWORD, project_ids=[shop.id])
    v = person(dash, clock)
    await v.sign_in("vera")
    page = await v.get(f"/dashboard/p/shop/tokens/{token_id}")
    assert page.status_code == 200 and "revoke-form" not in page.text
    for path, data in [
        (f"/dashboard/p/shop/tokens/{token_id}/revoke", {"reason": "x"}),
        (f"/dashboard/p/shop/tokens/{token_id}/rotate", {"grace": "0"}),
        ("/dashboard/p/shop/tokens", {"scopes": "records:read"}),
        ("/dashboard/projects", {"name": "mine"}),
    ]:
        response = await v.post(path, data)
        assert response.status_code == 403, path
    record = await services.store.get_token(token_id)
    assert record.state(clock.now) is TokenState.ACTIVE
    assert (await v.get("/dashboard/settings")).status_code == 403


async def test_members_see_only_their_projects(dash, clock, accounts, services):
    await owner(dash, clock, accounts)
    mine = await make_token(services, "shop")
    theirs = await make_token(services, "bank")
    shop = await services.store.get_project("shop")
    await accounts.create_user("adam", Role.ADMIN, password=PASSWORD, project_ids=[shop.id])
    a = person(dash, clock)
    await a.sign_in("adam")
    overview = await a.get("/dashboard/")
    assert "shop" in overview.text and "bank" not in overview.text
    assert (await a.get(f"/dashboard/p/shop/tokens/{mine}")).status_code == 200
    assert (await a.get("/dashboard/p/bank/tokens")).status_code == 404
    # A token of another project, even addressed through a visible one, does not exist.
    assert (await a.get(f"/dashboard/p/shop/tokens/{theirs}")).status_code == 404
    revoke = await a.post(f"/dashboard/p/shop/tokens/{theirs}/revoke", {"reason": "x"})
    assert revoke.status_code == 404
    assert (await a.get("/dashboard/audit?project=bank")).status_code == 404
    audit = await a.get("/dashboard/audit")
    assert mine in audit.text and theirs not in audit.text
    export = await a.client.get("/dashboard/audit/export")
    assert mine in export.text and theirs not in export.text


async def test_step_up_guards_revoke_all(dash, clock, accounts, services):
    p = await owner(dash, clock, accounts)
    first = await make_token(services, "shop")
    second = await make_token(services, "shop")
    clock.tick(6 * 60)  # the sign-in code is now older than the 5-minute step-up window
    await p.get("/dashboard/p/shop/tokens")
    prompt = await p.post("/dashboard/p/shop/revoke-all", {"reason": "breach"})
    assert prompt.status_code == 200 and 'id="step-up"' in prompt.text
    assert 'name="reason" value="breach"' in prompt.text  # the form is carried over
    assert (await services.store.get_token(first)).revoked_at is None
    bad = await p.post(
        "/dashboard/p/shop/revoke-all", {"reason": "breach", "step_up_code": "000000"}
    )
    assert bad.status_code == 401 and (await services.store.get_token(first)).revoked_at is None
    done = await p.post(
        "/dashboard/p/shop/revoke-all", {"reason": "breach", "step_up_code": p.code()}
    )
    assert done.status_code == 303
    for token_id in (first, second):
        record = await services.store.get_token(token_id)
        assert record.revoked_at is not None and record.revoked_reason == "breach"


async def test_admin_scoped_token_needs_step_up(dash, clock, accounts, services):
    p = await owner(dash, clock, accounts)
    await p.post("/dashboard/projects", {"name": "shop"})
    clock.tick(6 * 60)
    await p.get("/dashboard/p/shop/tokens/new")
    prompt = await p.post("/dashboard/p/shop/tokens", {"scopes": "admin:*", "name": "ops"})
    assert 'id="step-up"' in prompt.text
    olga = actor_for(await accounts.get_user("olga"), None)
    assert await services.tokens.list_tokens(olga, project="shop") == []
    plain = await p.post("/dashboard/p/shop/tokens", {"scopes": "records:read", "name": "app"})
    assert plain.status_code == 201 and 'id="token-secret"' in plain.text
    done = await p.post(
        "/dashboard/p/shop/tokens", {"scopes": "admin:*", "name": "ops", "step_up_code": p.code()}
    )
    assert done.status_code == 201
    names = {t.name: t.scopes for t in await services.tokens.list_tokens(olga, project="shop")}
    assert names == {"app": ["records:read"], "ops": ["admin:*"]}


async def test_the_last_owner_stays(dash, clock, accounts):
    await accounts.create_user("olga", Role.OWNER, password=PASSWORD)
    with pytest.raises(Exception, match="last owner"):
        await accounts.remove_user("olga")
    with pytest.raises(Exception, match="last owner"):
        await accounts.set_role("olga", Role.ADMIN)


async def test_token_form_errors_are_shown_not_raised(dash, clock, accounts, services):
    p = await owner(dash, clock, accounts)
    await p.post("/dashboard/projects", {"name": "shop"})
    await p.get("/dashboard/p/shop/tokens/new")
    cases = [
        {"scopes": "records read:::x:y"},
        {"scopes": "records:read", "ip_allowlist": "not-an-ip"},
        {"scopes": "records:read", "rate_limit": "lots"},
        {"scopes": "records:read", "uses": "-3"},
        {"scopes": "records:read", "expiry": "date", "expires_on": "someday"},
        {"scopes": ""},
    ]
    for data in cases:
        response = await p.post("/dashboard/p/shop/tokens", data)
        assert response.status_code == 422, data
        assert 'class="error"' in response.text


async def test_bad_query_input_is_a_4xx_page(dash, clock, accounts):
    p = await owner(dash, clock, accounts)
    await p.post("/dashboard/projects", {"name": "shop"})
    for path in (
        "/dashboard/p/shop/tokens?expiring=soon",
        "/dashboard/p/shop/tokens?state=weird",
        "/dashboard/audit?before=abc",
        "/dashboard/audit?kind=everything",
        "/dashboard/audit/feed",
        "/dashboard/p/shop/tokens/tok_nope",
        "/dashboard/p/nope/tokens",
    ):
        response = await p.client.get(path)
        assert 400 <= response.status_code < 500, path


def test_templates_have_no_inline_script_or_style():
    templates = Path(__file__).resolve().parent.parent / "src/tokenward/dashboard/templates"
    for template in templates.glob("*.html"):
        text = template.read_text()
        assert not re.search(r"<script(?![^>]*\bsrc=)", text), template.name
        assert " style=" not in text and "<style" not in text, template.name
        assert not re.search(r"\son[a-z]+=", text), template.name


async def test_user_rules(dash, clock, accounts, services):
    await accounts.create_user("olga", Role.OWNER, password=PASSWORD)
    with pytest.raises(Exception, match="already exists"):
        await accounts.create_user("OLGA", Role.VIEWER)
    with pytest.raises(Exception, match="12 to 256"):
        await accounts.create_user("pat", Role.VIEWER, password="short")
    with pytest.raises(Exception, match="a login is"):
        await accounts.create_user("no spaces", Role.VIEWER)
    user, password = await accounts.create_user("pat", "admin")
    assert user.role is Role.ADMIN and len(password) >= 16
    assert await accounts.check_password("pat", password, None) is not None


async def test_detector_thresholds_are_validated_and_stored(dash, clock, accounts, services):
    from tokenward.anomaly.store import GLOBAL

    p = await owner(dash, clock, accounts)
    page = await p.get("/dashboard/settings")
    assert 'name="brute_force.threshold" value="20"' in page.text
    form = {
        "brute_force.enabled": "on",
        "brute_force.severity": "critical",
        "brute_force.actions": ["alert", "block_ip"],
        "brute_force.threshold": "7",
    }
    bad = await p.post("/dashboard/settings/detectors", {**form, "brute_force.threshold": "-1"})
    assert bad.status_code == 422 and "brute_force.threshold" in bad.text
    ok = await p.post("/dashboard/settings/detectors", form)
    assert ok.status_code == 303
    stored, _ = await dash[1].alerts.get_settings(GLOBAL)
    assert stored["brute_force"]["threshold"] == "7"
    assert stored["brute_force"]["actions"] == ["alert", "block_ip"]
    assert stored["canary"]["enabled"] is False  # unchecked boxes mean off
    page = await p.get("/dashboard/settings")
    assert 'name="brute_force.threshold" value="7"' in page.text


async def test_webhook_secret_shown_once_and_test_delivery_is_signed(dash, clock, accounts):
    import http.server
    import threading

    from tokenward.webhooks.signing import verify_signature

    received: list[tuple[dict, bytes]] = []

    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((dict(self.headers), body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Receiver)
    port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        p = await owner(dash, clock, accounts)
        await p.get("/dashboard/settings")
        saved = await p.post(
            "/dashboard/settings/webhook", {"webhook_url": f"http://127.0.0.1:{port}/hook"}
        )
        secret = re.search(r'id="webhook-secret"[^>]*>([^<]+)<', saved.text).group(1)
        again = await p.get("/dashboard/settings")
        assert secret not in again.text
        result = await p.post("/dashboard/settings/webhook/test")
        assert result.status_code == 200 and "Test alert delivered: HTTP 204" in result.text
    finally:
        server.shutdown()
        server.server_close()
    headers, body = received[0]
    assert verify_signature(secret, body, headers)
    assert b'"detector":"test"' in body


async def test_token_settings_only_narrow(dash, clock, accounts, services):
    p = await owner(dash, clock, accounts)
    token_id = await make_token(
        services, "shop", scopes=["records:*"], ttl=timedelta(days=30), uses=10
    )
    path = f"/dashboard/p/shop/tokens/{token_id}"
    page = await p.get(path)
    assert 'name="scopes"' in page.text
    keep = {"name": "app", "scopes": "records:*", "rate_limit": "", "ip_allowlist": ""}
    for data, message in [
        ({"scopes": "records:* admin:*"}, "can only be narrowed"),
        ({"expires_on": (clock.now + timedelta(days=90)).date().isoformat()}, "only be shortened"),
        ({"uses": "11"}, "can only go down"),
        ({"ip_allowlist": "nonsense"}, "is not an IPv4"),
    ]:
        response = await p.post(path + "/settings", {**keep, **data})
        assert 400 <= response.status_code < 500, data
        assert message in response.text.replace("&#39;", "'"), data
    narrowed = await p.post(
        path + "/settings",
        {
            "name": "storefront",
            "scopes": "records:read",
            "expires_on": (clock.now + timedelta(days=7)).date().isoformat(),
            "ip_allowlist": "10.0.0.0/8",
            "rate_limit": "5/second",
            "uses": "3",
        },
    )
    assert narrowed.status_code == 303
    record = await services.store.get_token(token_id)
    assert record.name == "storefront" and record.scopes == ["records:read"]
    assert record.expires_at.date() == (clock.now + timedelta(days=7)).date()
    assert record.ip_allowlist == ["10.0.0.0/8"] and record.rate_limit == ["5/second"]
    assert record.remaining_uses == 3
    trail = (await p.get(path)).text
    assert "token.update" in trail


async def test_lifetime_policy_applies_to_the_api_and_the_dashboard(
    dash, clock, accounts, services, admin
):
    p = await owner(dash, clock, accounts)
    await p.post("/dashboard/projects", {"name": "shop"})
    await p.get("/dashboard/settings")
    bad = await p.post("/dashboard/settings/projects/shop/lifetime", {"max_days": "0"})
    assert bad.status_code == 422
    saved = await p.post("/dashboard/settings/projects/shop/lifetime", {"max_days": "30"})
    assert saved.status_code == 303
    # Through the service (as the API calls it): no expiry means the maximum; more is refused.
    issued = await services.tokens.create_token(
        admin.record, TokenSpec(project="shop", scopes=["records:read"])
    )
    assert issued.record.expires_at == clock.now + timedelta(days=30)
    with pytest.raises(Exception, match="at most 30 days"):
        await services.tokens.create_token(
            admin.record, TokenSpec(project="shop", scopes=["x:y"], ttl=timedelta(days=90))
        )
    form = await p.get("/dashboard/p/shop/tokens/new")
    assert "tokens live at most 30 days" in form.text
    refused = await p.post("/dashboard/p/shop/tokens", {"scopes": "x:y", "expiry": "90d"})
    assert refused.status_code == 422 and "at most 30 days" in refused.text
    cleared = await p.post("/dashboard/settings/projects/shop/lifetime", {"max_days": ""})
    assert cleared.status_code == 303
    free = await services.tokens.create_token(
        admin.record, TokenSpec(project="shop", scopes=["records:read"])
    )
    assert free.record.expires_at is None


async def test_role_and_mfa_changes_need_step_up_and_take_effect(dash, clock, accounts, services):
    p = await owner(dash, clock, accounts)
    await p.post("/dashboard/projects", {"name": "shop"})
    shop = await services.store.get_project("shop")
    vera, password = await accounts.create_user("vera", Role.VIEWER, project_ids=[shop.id])
    v = person(dash, clock)
    await v.sign_in("vera", password)
    assert (await v.client.get("/dashboard/")).status_code == 200
    clock.tick(6 * 60)
    await p.get("/dashboard/settings")
    change = {"role": "admin", "projects": [shop.id]}
    prompt = await p.post(f"/dashboard/settings/users/{vera.id}/role", change)
    assert 'id="step-up"' in prompt.text
    assert (await accounts.get_user("vera")).role is Role.VIEWER
    done = await p.post(
        f"/dashboard/settings/users/{vera.id}/role", {**change, "step_up_code": p.code()}
    )
    assert done.status_code == 303 and (await accounts.get_user("vera")).role is Role.ADMIN
    # Within the step-up window the next sensitive change goes through at once; resetting
    # vera's second factor ends her sessions, and she must enrol again.
    await p.get("/dashboard/settings")
    reset = await p.post(f"/dashboard/settings/users/{vera.id}/reset-mfa")
    assert reset.status_code == 303
    assert not (await accounts.get_user("vera")).mfa_enrolled
    assert (await v.client.get("/dashboard/")).status_code == 303
    audit = (await p.get("/dashboard/audit?kind=admin")).text
    assert "dashboard.user.role" in audit and "dashboard.user.mfa_reset" in audit


async def test_names_are_escaped_in_pages(dash, clock, accounts, services):
    p = await owner(dash, clock, accounts)
    evil = "<script>alert(1)</script>"
    token_id = await make_token(services, "shop", name=evil, principal=evil)
    for path in ("/dashboard/p/shop/tokens", f"/dashboard/p/shop/tokens/{token_id}"):
        page = await p.get(path)
        assert evil not in page.text and "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text


async def test_rotate_with_grace_shows_the_successor_once(dash, clock, accounts, services):
    p = await owner(dash, clock, accounts)
    token_id = await make_token(services, "shop", name="app")
    path = f"/dashboard/p/shop/tokens/{token_id}"
    await p.get(path)
    bad = await p.post(path + "/rotate", {"grace": "forever"})
    assert bad.status_code == 422
    response = await p.post(path + "/rotate", {"grace": "1h"})
    assert response.status_code == 201
    secret = re.search(r'id="token-secret"[^>]*>([^<]+)<', response.text).group(1)
    assert secret.startswith("tw_live_")
    old = await services.store.get_token(token_id)
    assert old.state(clock.now) is TokenState.ROTATED_IN_GRACE
    assert (await services.verifier.verify(secret)).allowed
    detail = await p.get(path)
    assert secret not in detail.text and old.replaced_by in detail.text


async def test_audit_pages_back_and_forth(dash, clock, accounts, services):
    p = await owner(dash, clock, accounts)
    for i in range(3):
        await make_token(services, f"p{i}")
    first = await p.get("/dashboard/audit?kind=admin")
    cursors = re.findall(r'data-cursor="([0-9a-z.-]+)"', first.text)
    positions = [parse_cursor(c) for c in cursors]
    assert positions == sorted(positions, reverse=True) and len(cursors) >= 6  # newest first
    older = await p.get(f"/dashboard/audit?kind=admin&before={cursors[2]}")
    rest = re.findall(r'data-cursor="([0-9a-z.-]+)"', older.text)
    assert rest == cursors[3:] and "← newest" in older.text
    feed = await p.client.get(f"/dashboard/audit/feed?kind=admin&after={cursors[2]}")
    assert [e["cursor"] for e in feed.json()["entries"]] == cursors[1::-1]  # oldest first
