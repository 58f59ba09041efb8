"""The FastAPI application: ``create_app(settings)`` builds it, its lifespan loads the model once."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .auth import BearerTokenMiddleware
from .engine import Engine
from .errors import install_error_handlers
from .limits import BodyLimitMiddleware
from .routes import experts, generate, health, library, openai
from .settings import Settings

logger = logging.getLogger(__name__)


def _poll_hub(hub, interval: float, stop: threading.Event) -> None:
    """Sync every ``interval`` seconds (never when 0), and retry queued pushes as their backoff allows."""
    from quiver.library.hub import HubError

    next_sync = time.monotonic() + interval
    while not stop.wait(min(interval, 2.0) if interval > 0 else 2.0):
        try:
            if interval > 0 and time.monotonic() >= next_sync:
                next_sync = time.monotonic() + interval
                hub.sync()
            else:
                hub.push_pending()
        except HubError as error:
            logger.warning("Hub sync failed, serving the local copy: %s", error)
        except Exception as error:  # noqa: BLE001 - the poller must outlive one bad sync
            logger.error("Hub sync failed: %s", error, exc_info=error)


class RequestIdMiddleware:
    """Give every request an id (the client's ``X-Request-ID`` when usable), echo it, and count the response.

    A plain ASGI middleware rather than a FastAPI ``http`` middleware: the latter wraps the
    request's receive channel, and routes then never learn that their client disconnected.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        supplied = next((value.decode("latin-1") for key, value in scope["headers"] if key == b"x-request-id"), "")
        # A client's id is kept when it is short and printable, because it goes into logs and headers.
        valid = 0 < len(supplied) <= 128 and supplied.isascii() and supplied.isprintable()
        request_id = supplied if valid else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)["X-Request-ID"] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            engine = getattr(scope["app"].state, "engine", None) if "app" in scope else None
            if engine is not None:
                # The route's template, not the path, so that expert names do not multiply the series.
                route = getattr(scope.get("route"), "path", "unmatched")
                engine.metrics.requests.labels(route, str(status)).inc()
                engine.metrics.request_seconds.labels(route).observe(time.perf_counter() - started)


def create_app(settings: Settings | None = None, *, engine: Engine | None = None) -> FastAPI:
    """Build the Quiver server application.

    Args:
        settings: server settings; defaults to :meth:`Settings.from_env`.
        engine: an engine to serve instead of loading one at startup (tests share one this way).
    """
    settings = settings or Settings.from_env()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.engine = engine or Engine(settings)
        owns_engine = engine is None
        logger.info("serving %s with library %s", app.state.engine.base_model_id, settings.resolved_library_dir)
        stop = threading.Event()
        poller = None
        if app.state.engine.hub is not None:
            poller = threading.Thread(target=_poll_hub, args=(app.state.engine.hub, settings.sync_interval, stop), name="quiver-hub-poll", daemon=True)
            poller.start()
        yield
        stop.set()
        if poller is not None:
            poller.join(timeout=10)
        if owns_engine:
            app.state.engine.close()
        logger.info("server stopped")

    app = FastAPI(title="Quiver", summary="LoRA experts routed per token with Arrow", lifespan=lifespan)
    app.state.settings = settings

    # Only uploads carry large bodies, but the limit holds for every request.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_upload_mb * 2**20)
    if settings.api_token:
        # Before the body limit, so that a request without the token is refused before its body is read.
        app.add_middleware(BearerTokenMiddleware, token=settings.api_token, protect_reads=settings.api_token_reads)
    # Added last, so it runs first: the request id and the metrics cover every response, errors included.
    app.add_middleware(RequestIdMiddleware)
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(experts.router)
    app.include_router(generate.router)
    app.include_router(library.router)
    app.include_router(openai.router)
    return app
