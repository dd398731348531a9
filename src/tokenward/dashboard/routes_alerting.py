"""Settings of alerting: detector thresholds and responses, the alert webhook (and a test).

The values are the anomaly engine's global overrides (scope ``*``), validated as a whole by
its own model before they are stored; every replica picks them up within its settings TTL.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import ValidationError
from starlette.datastructures import FormData

from tokenward.anomaly.config import DETECTORS, Action, AnomalyConfig, effective
from tokenward.anomaly.store import GLOBAL, Alert
from tokenward.dashboard.web import (
    checked_form,
    dash,
    form_list,
    form_text,
    redirect,
    require_owner,
    services_of,
    session_of,
    url,
)
from tokenward.events import AdminEvent
from tokenward.sealing import Sealer
from tokenward.webhooks.sender import new_message_id
from tokenward.webhooks.signing import new_webhook_secret

router = APIRouter()

COMMON = ("enabled", "severity", "actions")


def detector_rows(config: AnomalyConfig) -> list[dict[str, Any]]:
    """What the form shows per detector: its doc, common settings, and numeric fields."""
    rows = []
    for name in DETECTORS:
        detector = getattr(config, name)
        numbers = [
            (field, getattr(detector, field), info.description or "")
            for field, info in type(detector).model_fields.items()
            if field not in COMMON
        ]
        rows.append(
            {
                "name": name,
                "doc": (type(detector).__doc__ or "").strip(),
                "enabled": detector.enabled,
                "severity": detector.severity,
                "actions": [a.value for a in detector.actions],
                "numbers": numbers,
            }
        )
    return rows


def overrides_from_form(form: FormData) -> dict[str, Any]:
    out: dict[str, Any] = {}
    defaults = AnomalyConfig()
    for name in DETECTORS:
        detector = getattr(defaults, name)
        values: dict[str, Any] = {
            "enabled": form_text(form, f"{name}.enabled", 4) == "on",
            "severity": form_text(form, f"{name}.severity", 16) or detector.severity,
            "actions": form_list(form, f"{name}.actions", 16),
        }
        for field in type(detector).model_fields:
            if field in COMMON:
                continue
            text = form_text(form, f"{name}.{field}", 24)
            if text:
                values[field] = text  # the model validates and converts
        out[name] = values
    return out


async def alerting_context(request: Request) -> dict[str, Any]:
    store = dash(request).alerts
    stored, sealed = await store.get_settings(GLOBAL)
    try:
        config = effective(stored)
    except ValueError:
        config = effective()
    return {
        "detectors": detector_rows(config),
        "all_actions": [a.value for a in Action],
        "webhook_url": str(config.webhook_url) if config.webhook_url else "",
        "webhook_secret_set": sealed is not None,
        "anomaly_enabled": services_of(request).anomaly is not None,
    }


async def _save(request: Request, config: dict[str, Any], sealed: str | None) -> None:
    services = services_of(request)
    await dash(request).alerts.put_settings(GLOBAL, config, sealed, services.verifier.clock())
    if services.anomaly is not None:
        services.anomaly.forget_settings()


async def _event(request: Request, action: str, detail: dict[str, Any]) -> None:
    services = services_of(request)
    await services.events.admin(
        AdminEvent(
            at=services.verifier.clock(),
            action="dashboard." + action,
            actor_id=request.state.session.user.id,
            detail=detail,
        )
    )


@router.post("/settings/detectors")
async def save_detectors(request: Request) -> Response:
    from tokenward.dashboard.routes_admin import settings_response

    session = await session_of(request)
    form = await checked_form(request)
    require_owner(session.user)
    stored, sealed = await dash(request).alerts.get_settings(GLOBAL)
    override = overrides_from_form(form)
    try:
        effective(stored, override)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5]
        )
        return await settings_response(request, 422, error=f"Not saved: {problems}")
    await _save(request, {**stored, **override}, sealed)
    await _event(request, "detectors", {"detectors": list(override)})
    return redirect(url("/settings?done=detectors#alerting"))


@router.post("/settings/webhook")
async def save_webhook(request: Request) -> Response:
    from tokenward.dashboard.routes_admin import settings_response

    session = await session_of(request)
    form = await checked_form(request)
    require_owner(session.user)
    store = dash(request).alerts
    stored, sealed = await store.get_settings(GLOBAL)
    webhook_url = form_text(form, "webhook_url", 2048) or None
    config = {**stored, "webhook_url": webhook_url}
    try:
        effective(config)
    except ValidationError as exc:
        reasons = [str(e.get("ctx", {}).get("error", "")) for e in exc.errors()]
        reason = next((r for r in reasons if "https" in r), "it is not a valid URL")
        return await settings_response(request, 422, error=f"Not saved: {reason}.")
    new_secret = None
    if webhook_url and (sealed is None or form_text(form, "new_secret", 4) == "on"):
        new_secret = new_webhook_secret()
        sealed = Sealer(services_of(request).hasher, "webhook").seal(new_secret)
    await _save(request, config, sealed)
    await _event(request, "webhook", {"url_set": webhook_url is not None})
    if new_secret:
        return await settings_response(request, 200, webhook_secret=new_secret)
    return redirect(url("/settings?done=webhook#alerting"))


@router.post("/settings/webhook/test")
async def test_webhook(request: Request) -> Response:
    """Send a signed test alert to the configured URL now and show what came back."""
    from tokenward.dashboard.routes_admin import settings_response

    session = await session_of(request)
    await checked_form(request)
    require_owner(session.user)
    services = services_of(request)
    stored, sealed = await dash(request).alerts.get_settings(GLOBAL)
    secret = Sealer(services.hasher, "webhook").open(sealed) if sealed else None
    webhook_url = stored.get("webhook_url")
    if not webhook_url or not secret:
        return await settings_response(request, 422, error="Set a webhook URL first.")
    alert = Alert(
        "test",
        "info",
        f"Test delivery requested by {session.user.login} in the dashboard",
        services.verifier.clock(),
    )
    # One attempt, answered while the person waits (alerts themselves are queued, retried).
    sender = services.webhooks
    assert sender is not None
    body = sender.body("alert.raised", {"alert": alert.public(), "test": True}, alert.created_at)
    code, error = await sender.post(webhook_url, secret, new_message_id(), body)
    delivered = error is None
    outcome = f"HTTP {code}" if code else str(error or "no answer")
    message = f"Test alert {'delivered' if delivered else 'NOT delivered'}: {outcome}"
    return await settings_response(request, 200 if delivered else 502, webhook_result=message)
