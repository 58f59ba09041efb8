"""``/health``: whether the server is up, and what it serves."""

from __future__ import annotations

from fastapi import APIRouter, Response

from quiver.client.models import Health

from ..deps import EngineDep
from ..metrics import CONTENT_TYPE

router = APIRouter(tags=["health"])


@router.get("/health", response_model=Health)
def health(engine: EngineDep) -> Health:
    settings = engine.settings
    routing = {
        "method": settings.routing_method,
        "pooling": settings.routing_pooling,
        "top_k": settings.routing_top_k,
        "temperature": settings.routing_temperature,
    }
    return Health(status="ok", base_model=engine.base_model_id, device=str(engine.device), experts=len(engine.library), routing=routing)


@router.get("/metrics", response_class=Response)
def metrics(engine: EngineDep) -> Response:
    """Prometheus metrics in the text exposition format."""
    return Response(engine.metrics.render(), media_type=CONTENT_TYPE)
