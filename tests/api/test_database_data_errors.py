"""The safety net under input validation: a database data error is a 400, never a 500.

Validation at the edges should catch every value a database cannot store; should one slip
through, SQLSTATE class 22 (a NUL byte, a number out of range) is the client's fault, so
the answer is a clean ``400 invalid_request`` (a form error in the dashboard), and neither
the answer nor the log carries the statement's parameters.
"""

from __future__ import annotations

import logging

import httpx
import pytest
from sqlalchemy import text

from tokenward.api.errors import is_data_error
from tokenward.app import create_app
from tokenward.store.engine import create_engine

from .test_bad_input import assert_clean_error

SECRETISH = "needle-7Qx"


def _probe_app(services):
    app = create_app(services=services)

    @app.get("/v1/probe")
    async def probe(kind: str) -> dict[str, str]:
        await _run_bad_statement(services.engine, kind)
        return {"ok": "stored"}

    @app.get("/dashboard/probe")
    async def dashboard_probe(kind: str) -> dict[str, str]:
        await _run_bad_statement(services.engine, kind)
        return {"ok": "stored"}

    return app


async def _run_bad_statement(engine, kind: str) -> None:
    async with engine.connect() as conn:
        if kind == "nul":
            await conn.execute(text("SELECT CAST(:v AS TEXT)"), {"v": SECRETISH + "\x00"})
        elif kind == "range":
            await conn.execute(text("SELECT CAST(:v AS INTEGER) + 1"), {"v": 2**31})
        else:
            await conn.execute(text("SELECT * FROM no_such_table WHERE x = :v"), {"v": SECRETISH})


@pytest.fixture
async def probe(services):
    transport = httpx.ASGITransport(app=_probe_app(services), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://tokenward.test") as c:
        yield c


async def test_a_data_error_is_a_400_without_parameters(probe, services, caplog):
    if services.engine.dialect.name != "postgresql":
        pytest.skip("SQLite stores these values: nothing to refuse")
    caplog.set_level(logging.DEBUG)
    for kind in ("nul", "range"):
        response = await probe.get("/v1/probe", params={"kind": kind})
        body = assert_clean_error(response, 400)
        assert body["error"] == "invalid_request"
        assert SECRETISH not in response.text
        page = await probe.get("/dashboard/probe", params={"kind": kind})
        assert page.status_code == 400
        assert page.headers["content-type"].startswith("text/html")
        assert "cannot be stored" in page.text and SECRETISH not in page.text
    assert SECRETISH not in caplog.text


async def test_other_database_errors_stay_server_errors(probe, caplog):
    response = await probe.get("/v1/probe", params={"kind": "missing"})
    assert response.status_code == 500
    assert response.json()["error"] == "internal_error"
    assert SECRETISH not in response.text and SECRETISH not in caplog.text


async def test_engines_hide_parameters(database_url):
    engine = create_engine(database_url)
    try:
        assert engine.sync_engine.hide_parameters
        with pytest.raises(Exception) as caught:
            await _run_bad_statement(engine, "missing")
        assert SECRETISH not in str(caught.value)
        assert "parameters hidden" in str(caught.value)
    finally:
        await engine.dispose()


def test_is_data_error_follows_the_wrapped_exceptions():
    class Driver(Exception):
        sqlstate = "22021"

    wrapped = RuntimeError("wrapper")
    wrapped.__cause__ = Driver()
    assert is_data_error(wrapped)
    assert not is_data_error(RuntimeError("plain"))

    class Syntax(Exception):
        sqlstate = "42601"

    assert not is_data_error(Syntax())
