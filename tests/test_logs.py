"""The access log: JSON lines, written in blocks, nothing lost at the end."""

from __future__ import annotations

import asyncio
import io
import json

import pytest

from tokenward.logs import AccessLogSink


class _Stderr(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.buffer = io.BytesIO()


@pytest.fixture
def stderr() -> _Stderr:
    return _Stderr()


def lines(stream: _Stderr) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.buffer.getvalue().splitlines()]


async def test_lines_wait_for_the_interval_then_go_out_together(stderr):
    sink = AccessLogSink(interval=0.05, stream=stderr)
    sink.enabled = True
    for n in range(3):
        sink.request(request_id=f"req_{n}", status=200, path="/v1/verify")
    assert stderr.buffer.getvalue() == b""
    await asyncio.sleep(0.1)
    written = lines(stderr)
    assert [e["request_id"] for e in written] == ["req_0", "req_1", "req_2"]
    assert {"event", "level", "timestamp", "status", "path"} <= set(written[0])
    assert written[0]["event"] == "request" and str(written[0]["timestamp"]).endswith("Z")


async def test_a_full_buffer_is_written_at_once(stderr):
    sink = AccessLogSink(interval=60, limit=1000, stream=stderr)
    sink.enabled = True
    for n in range(20):
        sink.request(request_id=f"req_{n}", path="/x" * 10)
    assert len(lines(stderr)) >= 10
    sink.flush()
    assert len(lines(stderr)) == 20


def test_a_path_no_encoder_takes_is_escaped_not_lost(stderr):
    sink = AccessLogSink(stream=stderr)
    sink.enabled = True
    sink.request(path="/a\udcffb")  # a lone surrogate, as a server may decode a raw byte
    [entry] = lines(stderr)  # written at once: no loop to wait on
    assert entry["path"] == "/a\udcffb"


def test_a_loop_that_ended_does_not_keep_lines_back(stderr):
    sink = AccessLogSink(interval=0.01, stream=stderr)
    sink.enabled = True

    async def one(n: int) -> None:
        sink.request(request_id=f"req_{n}")
        await asyncio.sleep(0.05)

    asyncio.run(one(1))
    asyncio.run(one(2))  # a new loop: the first loop's timer is gone with it
    assert [e["request_id"] for e in lines(stderr)] == ["req_1", "req_2"]


def test_off_writes_nothing(stderr):
    sink = AccessLogSink(stream=stderr)
    sink.request(path="/x")
    sink.flush()
    assert stderr.buffer.getvalue() == b""


async def test_a_token_pasted_into_a_path_is_kept_out_of_the_logs(api, monkeypatch, stderr):
    """A secret sent where an id belongs (``/v1/tokens/tw_live_…``) is redacted in the
    access log line and in the audit event the request leaves; the rest of the path stays."""
    from tokenward.logs import access_log

    await api.post("/v1/projects", json={"name": "app"})
    created = await api.post("/v1/tokens", json={"project": "app", "scopes": ["records:read"]})
    secret = created.json()["token"]
    monkeypatch.setattr(access_log, "stream", stderr)
    monkeypatch.setattr(access_log, "enabled", True)
    # Denied (a read-only credential may not revoke): the denial is an audited decision.
    reader = await api.post("/v1/tokens", json={"project": "app", "scopes": ["admin:read"]})
    response = await api.post(
        f"/v1/tokens/{secret}/revoke",
        json={},
        headers={"Authorization": f"Bearer {reader.json()['token']}"},
    )
    assert response.status_code in (403, 404, 422) and secret not in response.text
    await api.get(f"/v1/tokens/{secret}")
    access_log.flush()
    logged = stderr.buffer.getvalue().decode()
    assert secret not in logged
    assert f"/v1/tokens/{secret[:8]}[redacted]" in logged
    events = (await api.get("/v1/audit", params={"limit": 500})).text
    assert secret not in events
    assert f"{secret[:8]}[redacted]" in events


def test_redaction_keeps_text_without_tokens_as_it_is():
    from tokenward.tokens.format import generate_token, redact_tokens

    token = generate_token("test")
    assert redact_tokens("/v1/tokens/tok_abc") == "/v1/tokens/tok_abc"
    redacted = "tw_test_[redacted]"
    assert redact_tokens(f"/a/{token}/b?x={token}") == f"/a/{redacted}/b?x={redacted}"
    assert redact_tokens("tw_live_short") == "tw_live_short"
    # Glued to other characters, or with its underscores percent-encoded: still redacted.
    glued = f"/v1/tokens/tok_{token}x/revoke"
    assert token not in redact_tokens(glued) and "tw_test_[redacted]" in redact_tokens(glued)
    encoded = token.replace("_", "%5F", 2)
    assert redact_tokens(f"/records/{encoded}/1") == f"/records/{redacted}/1"


def test_every_logger_writes_one_json_shape_without_tokens():
    """tokenward's (structlog) and libraries' (stdlib, one with a traceback): each one JSON
    line with the same first keys, a token in any of them cut out; alembic's start-up chatter
    and what is below the level left out."""
    import logging

    import structlog

    from tokenward.logs import configure_logging
    from tokenward.tokens.format import generate_token

    secret = generate_token("live")
    stream = io.StringIO()
    configure_logging("info", stream=stream)
    try:
        structlog.get_logger("tokenward.test").warning("seen", where=f"/x/{secret}")
        try:
            raise ValueError(f"bad {secret}")
        except ValueError:
            logging.getLogger("uvicorn.error").exception("Exception in ASGI application")
        logging.getLogger("aiohttp.server").info("quiet %s", "library")
        logging.getLogger("alembic.runtime.migration").info("Context impl SQLiteImpl.")
        logging.getLogger("tokenward.test").debug("below the level")
    finally:
        configure_logging("info")
    text = stream.getvalue()
    entries = [json.loads(line) for line in text.splitlines()]
    assert [list(e)[:4] for e in entries] == [["event", "level", "logger", "timestamp"]] * 3
    seen, failed, library = entries
    assert (seen["logger"], seen["level"]) == ("tokenward.test", "warning")
    assert seen["where"] == "/x/tw_live_[redacted]"
    assert failed["logger"] == "uvicorn.error" and failed["level"] == "error"
    assert "ValueError: bad tw_live_[redacted]" in failed["exception"]
    assert (library["event"], library["logger"]) == ("quiet library", "aiohttp.server")
    assert secret not in text
