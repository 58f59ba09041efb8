"""``/generate``: text generation with Arrow routing across the library."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from quiver.client.models import GenerateRequest, GenerateResponse

from ..deps import EngineDep

logger = logging.getLogger(__name__)

router = APIRouter(tags=["generation"])


@router.post("/generate", response_model=GenerateResponse)
async def generate(body: GenerateRequest, engine: EngineDep, request: Request) -> GenerateResponse:
    result = await run_in_threadpool(engine.generate, body.inputs, body.parameters)
    response = result.response
    top = sorted(response.details.routing.items(), key=lambda item: -item[1])[:3]
    logger.info(
        "generate request_id=%s prompt_tokens=%d generated_tokens=%d seconds=%.2f top_experts=%s",
        request.state.request_id,
        result.prompt_tokens,
        response.details.generated_tokens,
        result.seconds,
        ",".join(f"{name}:{weight:.2f}" for name, weight in top) or "-",
    )
    return response
