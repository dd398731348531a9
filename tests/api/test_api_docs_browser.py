"""/docs in a real browser: Swagger UI renders every operation from /openapi.json, under
the CSP, without a violation and without a request to any other origin."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import serve_tokenward, tokenward_cmd

CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium")


def test_swagger_ui_renders_from_this_origin_only(tmp_path):
    from playwright.sync_api import sync_playwright

    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENWARD_")}
    env["TOKENWARD_DATA_DIR"] = str(tmp_path)
    subprocess.run(tokenward_cmd("init", "--json"), env=env, capture_output=True, check=True)
    served = serve_tokenward(env=env)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"]
            )
            page = browser.new_page()
            problems: list[str] = []
            page.on("console", lambda m: m.type == "error" and problems.append(m.text))
            page.on("pageerror", lambda e: problems.append(str(e)))
            requested: list[str] = []
            page.on("request", lambda r: requested.append(r.url))
            page.goto(f"{served.url}/docs")
            page.wait_for_selector(".opblock", timeout=20_000)
            operations = page.locator(".opblock").count()
            browser.close()
    finally:
        served.stop()
    assert operations >= 38  # every documented operation
    assert problems == []  # a CSP violation is a console error
    assert requested and all(url.startswith(served.url + "/") for url in requested), requested
