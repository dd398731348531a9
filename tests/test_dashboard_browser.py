"""The dashboard in a real browser (Chromium, driven by Playwright) against a real server.

One server, one flow, as a person would use it: sign in with password + TOTP (enrolling
first), create a project and a token, copy it, use it, see it in the token's audit trail,
revoke it, see the next use denied. Then: a viewer cannot revoke, a form without its CSRF
token is refused, and a sensitive action asks for a fresh TOTP code (step-up).
Screenshots of the main pages land in docs/screenshots/ (shown in the README).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pyotp
import pytest
from playwright.sync_api import expect

from tests.conftest import ROOT, serve_tokenward, tokenward_cmd

CHROMIUM = "/usr/bin/chromium"
#: The README's screenshots are refreshed with TOKENWARD_TEST_SCREENSHOTS=1; otherwise the
#: pictures are still taken (every page renders) but kept out of the work tree.
SHOTS = ROOT / "docs" / "screenshots"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium"),
]


def run(*args: str, env: dict[str, str]) -> dict:
    out = subprocess.run(
        tokenward_cmd(*args, "--json"), env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    data = tmp_path_factory.mktemp("dash")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENWARD_")}
    # Step-up every time, so the prompt can be seen without waiting minutes.
    env |= {"TOKENWARD_DATA_DIR": str(data), "TOKENWARD_DASHBOARD_STEP_UP_SECONDS": "0"}
    init = run("init", env=env)
    log = (data / "server.log").open("wb")
    served = serve_tokenward(env=env, stderr=log)
    try:
        yield {"url": served.url, "init": init, "env": env, "data": data}
    finally:
        served.stop()
        log.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        yield chromium
        chromium.close()


def next_code(secret: str, used: set[str]) -> str:
    """A TOTP code not used yet (a used one is refused: no replay)."""
    totp = pyotp.TOTP(secret)
    for offset in (0, 30):
        code = totp.at(time.time() + offset)
        if code not in used:
            used.add(code)
            return code
    raise AssertionError("no fresh code within the accepted window")


def sign_in(page, base: str, login: str, password: str) -> tuple[str, set[str]]:
    """Password, then MFA enrolment (first sign-in); returns the TOTP secret."""
    page.goto(base + "/dashboard/")
    assert "/dashboard/login" in page.url
    page.get_by_label("Login").fill(login)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Continue").click()
    page.wait_for_url("**/mfa/setup**")
    expect(page.locator("svg.qr")).to_be_visible()  # the QR code, drawn by the server
    secret = page.locator("#totp-secret").inner_text().strip()
    used: set[str] = set()
    page.get_by_label("Code from the app").fill(next_code(secret, used))
    page.get_by_role("button", name="Confirm").click()
    expect(page.locator("#recovery-codes li")).to_have_count(10)
    page.get_by_role("link", name="continue").click()
    page.wait_for_url(base + "/dashboard/")
    return secret, used


def verify(base: str, admin_token: str, token: str) -> dict:
    response = httpx.post(
        base + "/v1/verify",
        headers={"Authorization": f"Bearer {admin_token}"},
        json={"token": token, "scope": "records:read"},
    )
    assert response.status_code == 200
    return response.json()


def test_dashboard_flow_in_a_real_browser(server, browser, tmp_path):
    base, init = server["url"], server["init"]
    shots = SHOTS if os.environ.get("TOKENWARD_TEST_SCREENSHOTS") else tmp_path
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    context.grant_permissions(["clipboard-read", "clipboard-write"], origin=base)
    page = context.new_page()
    page.on("dialog", lambda dialog: dialog.accept())

    page.goto(base + "/dashboard/login")
    page.screenshot(path=shots / "login.png")
    secret, used = sign_in(page, base, init["owner_login"], init["owner_password"])
    cookie = next(c for c in context.cookies() if c["name"] == "tw_session")
    assert cookie["httpOnly"] and cookie["secure"] and cookie["sameSite"] == "Strict"

    # A project and a token.
    page.get_by_label("New project").fill("shop")
    page.get_by_role("button", name="Create").click()
    page.wait_for_url("**/p/shop/tokens")
    page.get_by_role("link", name="New token").click()
    page.get_by_label("Name").fill("storefront")
    page.get_by_label("Scopes").fill("records:read\nfunctions:invoke:*")
    page.get_by_label("Rate limit").fill("100/minute")
    page.get_by_role("button", name="Create token").click()
    secret_box = page.locator("#token-secret")
    token = secret_box.inner_text().strip()
    assert token.startswith("tw_live_")
    assert "shown only this once" in page.locator(".warning").inner_text()
    page.get_by_role("button", name="Copy").click()
    expect(page.locator("#copy-status")).to_have_text("Copied to the clipboard.")
    assert page.evaluate("navigator.clipboard.readText()") == token
    # The picture for the README must not carry a usable secret, even of a throwaway server.
    secret_box.evaluate("el => el.textContent = el.textContent.slice(0, 12) + '•'.repeat(30)")
    page.screenshot(path=shots / "token-created.png")

    # Use it against the decision endpoint: allowed, and in the token's audit trail.
    assert verify(base, init["admin_token"], token)["valid"] is True
    page.get_by_role("link", name="I have stored it").click()
    trail = page.locator("#trail")
    assert "access.verify_api" in trail.inner_text()
    assert "allow ok" in trail.inner_text()
    assert token not in page.content()  # never shown again
    page.screenshot(path=shots / "token-detail.png", full_page=True)

    # Revoke it (the confirmation dialog is accepted); the next use is denied and shows up.
    page.get_by_role("textbox", name="Reason").fill("leaked in a log")
    page.get_by_role("button", name="Revoke", exact=True).click()
    page.wait_for_url("**?done=revoked")
    assert page.locator("#token-state").inner_text() == "revoked"
    denied = verify(base, init["admin_token"], token)
    assert denied == {**denied, "valid": False, "reason": "revoked"}
    page.reload()
    assert "deny revoked" in page.locator("#trail").inner_text()
    assert "token.revoke" in page.locator("#trail").inner_text()

    # Overview and audit log pages.
    page.goto(base + "/dashboard/")
    assert "shop" in page.locator("main").inner_text()
    page.screenshot(path=shots / "overview.png", full_page=True)
    page.goto(base + "/dashboard/audit?project=shop")
    assert "deny revoked" in page.locator("#trail").inner_text()
    # Live tail: a decision made now appears without reloading the page.
    page.get_by_label("Live tail").check()
    rows = page.locator("#trail tbody tr")
    before = rows.count()
    verify(base, init["admin_token"], token)
    page.locator("#trail tbody tr.fresh").first.wait_for(timeout=10_000)
    assert rows.count() > before
    assert "deny revoked" in page.locator("#trail tbody tr.fresh").first.inner_text()
    page.screenshot(path=shots / "audit.png")

    # Using the revoked token raised an alert (leaked token); acknowledge it.
    page.goto(base + "/dashboard/alerts")
    alert = page.locator("article.alert").first
    assert "leaked token" in alert.inner_text()
    page.screenshot(path=shots / "alerts.png")
    with page.expect_navigation():
        alert.get_by_role("button", name="Acknowledge").click()
    page.goto(base + "/dashboard/alerts?show=all")
    assert "Acknowledged" in page.locator("article.alert").first.inner_text()

    # Every form field has a label, and Tab reaches the fields in order.
    page.goto(base + "/dashboard/p/shop/tokens/new")
    unlabelled = page.evaluate(
        """Array.from(document.querySelectorAll(
             'input:not([type=hidden]), select, textarea'))
           .filter(el => el.labels.length === 0).map(el => el.name)"""
    )
    assert unlabelled == []
    page.get_by_label("Name").focus()
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "principal"

    # Phone width: nothing forces sideways scrolling.
    page.set_viewport_size({"width": 390, "height": 844})
    for path in ("/dashboard/", "/dashboard/p/shop/tokens", "/dashboard/audit"):
        page.goto(base + path)
        assert page.evaluate("document.documentElement.scrollWidth") <= 390, path
    page.goto(base + "/dashboard/")
    page.screenshot(path=shots / "phone.png", full_page=True)
    page.set_viewport_size({"width": 1280, "height": 860})

    # A form without its CSRF token is refused (and nothing happens).
    page.get_by_role("link", name="Projects").first.click()
    page.goto(base + "/dashboard/p/shop/tokens/new")
    page.get_by_label("Scopes").fill("records:read")
    page.get_by_label("Name").fill("forged")
    page.locator("form.form-grid input[name=csrf]").evaluate("input => input.remove()")
    with page.expect_navigation():
        page.locator("form.form-grid").evaluate("form => form.submit()")
    expect(page.locator("main")).to_contain_text("Form expired or forged")
    page.goto(base + "/dashboard/p/shop/tokens?q=forged")
    assert "No tokens" in page.locator("table.tokens").inner_text()

    # Step-up: creating an admin-scoped token asks for a fresh code first.
    page.goto(base + "/dashboard/p/shop/tokens/new")
    page.get_by_label("Name").fill("deploy bot")
    page.get_by_label("Scopes").fill("admin:read")
    page.get_by_role("button", name="Create token").click()
    expect(page.locator("#step-up")).to_be_visible()
    page.screenshot(path=shots / "step-up.png")
    page.get_by_label("Authenticator code").fill(next_code(secret, used))
    page.get_by_role("button", name="Confirm").click()
    assert page.locator("#token-secret").inner_text().startswith("tw_live_")

    # A viewer of the project sees it but cannot revoke.
    viewer = run("user", "add", "vera", "--role", "viewer", "--project", "shop", env=server["env"])
    page.goto(base + "/dashboard/settings")
    assert "vera" in page.locator("main").inner_text()
    page.screenshot(path=shots / "settings.png", full_page=True)
    vctx = browser.new_context()
    vpage = vctx.new_page()
    sign_in(vpage, base, "vera", viewer["password"])
    vpage.goto(base + "/dashboard/p/shop/tokens?q=deploy")
    vpage.get_by_role("link", name="deploy bot").click()
    assert vpage.locator("#token-state").inner_text() == "active"
    assert vpage.get_by_role("button", name="Revoke").count() == 0
    token_url = vpage.url
    csrf = vpage.locator("input[name=csrf]").first.get_attribute("value")
    refused = vpage.request.post(
        token_url + "/revoke", form={"csrf": csrf, "reason": "viewer tries"}
    )
    assert refused.status == 403
    assert "viewer" in refused.text()
    vpage.reload()
    assert vpage.locator("#token-state").inner_text() == "active"
    vctx.close()
    context.close()
