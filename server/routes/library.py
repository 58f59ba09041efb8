"""``/library`` and ``/hub/webhook``: the library's sync status, a manual sync, and the Hub's webhook."""

from __future__ import annotations

import hmac
import logging
import threading
from typing import Annotated, Any

from fastapi import APIRouter, Body, Header
from fastapi.responses import JSONResponse

from quiver.library.hub import HubError

from ..deps import EngineDep

logger = logging.getLogger(__name__)

router = APIRouter(tags=["library"])


def _require_hub(engine):
    if engine.hub is None:
        raise HubError(
            "this server keeps its library locally; set QUIVER_HUB_REPO to sync it with a Hub repo", status=409, code="hub_not_configured"
        )
    return engine.hub


@router.get("/library")
def library_status(engine: EngineDep) -> dict[str, Any]:
    """Return the local revision, the experts and, when a Hub repo is set, its sync status."""
    library = engine.library
    return {
        "revision": library.revision,
        "experts": library.names(),
        "hub": engine.hub.status() if engine.hub is not None else None,
    }


@router.post("/library/sync")
def sync_library(engine: EngineDep) -> dict[str, Any]:
    """Pull the Hub repo, update experts that follow a branch, push queued changes, and report."""
    return _require_hub(engine).sync().to_json()


@router.post("/hub/webhook", status_code=202)
def hub_webhook(
    engine: EngineDep,
    payload: Annotated[dict[str, Any] | None, Body()] = None,
    secret: Annotated[str | None, Header(alias="X-Webhook-Secret")] = None,
) -> JSONResponse:
    """Start a pull when the Hub reports a change to the library repo."""
    expected = engine.settings.webhook_secret
    if not expected:
        raise HubError("the webhook is off on this server; set QUIVER_WEBHOOK_SECRET to turn it on", status=404, code="webhook_disabled")
    if secret is None or not hmac.compare_digest(secret.encode(), expected.encode()):
        raise HubError("X-Webhook-Secret is missing or wrong; use the secret set in QUIVER_WEBHOOK_SECRET", status=401, code="unauthorized")
    hub = _require_hub(engine)
    repo = ((payload or {}).get("repo") or {}).get("name")
    if repo is not None and repo != hub.repo_id:
        logger.info("ignoring a webhook about %s; this server follows %s", repo, hub.repo_id)
        return JSONResponse({"status": "ignored", "detail": f"this server follows {hub.repo_id}, not {repo}"}, status_code=202)
    threading.Thread(target=_pull_quietly, args=(hub,), name="quiver-webhook-sync", daemon=True).start()
    return JSONResponse({"status": "accepted"}, status_code=202)


def _pull_quietly(hub) -> None:
    try:
        hub.sync()
    except Exception as error:  # noqa: BLE001 - a background sync logs its failure; the status shows it.
        logger.error("sync after webhook failed: %s", error)
