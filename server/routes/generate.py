"""Text generation in the TGI / LoRAX wire format: ``/generate``, ``/generate_stream``, ``POST /`` and ``/info``.

Every request goes through the engine's batcher, so concurrent requests share forward passes.
A client that disconnects cancels its generation at the next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from importlib.metadata import PackageNotFoundError, version

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from quiver.client.models import GenerateRequest, GenerateResponse, StreamDetails, StreamResponse, Token
from quiver.client.models import MAX_STOP_SEQUENCES

from ..batching import Failed, Finished, Job, TokenEvent
from ..deps import EngineDep
from ..engine import Engine, build_response
from ..errors import stream_error_payload

logger = logging.getLogger(__name__)

router = APIRouter(tags=["generation"])

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def start_job(engine: Engine, request: Request, inputs: str, body: GenerateRequest) -> Job:
    """Tokenize and queue a generation, raising errors in the request before the response starts."""
    prompt_ids = await run_in_threadpool(engine.encode, inputs, body.parameters.truncate)
    return engine.submit(prompt_ids, body.parameters, request_id=request.state.request_id, loop=asyncio.get_running_loop())


async def _cancel_on_disconnect(request: Request, job: Job) -> None:
    while not job.cancelled:
        if await request.is_disconnected():
            job.cancel()
            return
        await asyncio.sleep(0.2)


async def collect(job: Job, request: Request) -> tuple[Finished, list[TokenEvent]]:
    """Wait for a generation to finish; a client that disconnects meanwhile cancels it.

    Raises:
        Exception: the error that ended the generation (a timeout, a removed expert).
    """
    watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
    tokens: list[TokenEvent] = []
    try:
        async for event in job.events():
            if isinstance(event, TokenEvent):
                tokens.append(event)
            elif isinstance(event, Failed):
                raise event.error
            else:
                return event, tokens
    except asyncio.CancelledError:
        job.cancel()
        raise
    finally:
        watcher.cancel()
    raise RuntimeError("the generation ended without a result")  # pragma: no cover - events() always ends with one


async def first_event(job: Job) -> tuple[AsyncIterator, TokenEvent | Finished]:
    """Wait for a job's first event, so that an error before the first token is an HTTP error, not a stream event."""
    events = job.events()
    try:
        event = await anext(events)
    except asyncio.CancelledError:
        job.cancel()
        raise
    if isinstance(event, Failed):
        raise event.error
    return events, event


def log_request(route: str, request: Request, finished: Finished) -> None:
    """Write the one INFO line each generation request gets."""
    top = sorted(finished.routing.items(), key=lambda item: -item[1])[:3]
    logger.info(
        "generate request_id=%s route=%s prompt_tokens=%d generated_tokens=%d seconds=%.3f ttft=%.3f finish_reason=%s top_experts=%s",
        request.state.request_id,
        route,
        finished.prompt_tokens,
        finished.generated_tokens,
        finished.seconds,
        finished.time_to_first_token or 0.0,
        finished.finish_reason,
        ",".join(f"{name}:{weight:.2f}" for name, weight in top) or "-",
    )


def sse(payload: dict) -> bytes:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()


@router.post("/generate", response_model=GenerateResponse)
async def generate(body: GenerateRequest, engine: EngineDep, request: Request) -> GenerateResponse:
    """Generate a continuation of ``inputs`` (TGI's ``/generate``)."""
    job = await start_job(engine, request, body.inputs, body)
    finished, tokens = await collect(job, request)
    log_request("/generate", request, finished)
    return build_response(finished, tokens, body.parameters, body.inputs)


@router.post("/generate_stream", response_class=StreamingResponse)
async def generate_stream(body: GenerateRequest, engine: EngineDep, request: Request) -> StreamingResponse:
    """Stream a continuation of ``inputs`` as server-sent events, one per token (TGI's ``/generate_stream``)."""
    job = await start_job(engine, request, body.inputs, body)
    events, first = await first_event(job)
    return StreamingResponse(_tgi_stream(job, events, first, body, request), media_type="text/event-stream", headers=SSE_HEADERS)


async def _tgi_stream(job: Job, events: AsyncIterator, first, body: GenerateRequest, request: Request) -> AsyncIterator[bytes]:
    parameters = body.parameters
    try:
        event = first
        while True:
            if isinstance(event, Failed):
                yield sse(stream_error_payload(event.error))
                return
            if isinstance(event, TokenEvent) and not event.last:
                yield sse(StreamResponse(index=event.index, token=_token(event)).model_dump())
            elif isinstance(event, TokenEvent):
                # The last token carries the whole text and the details, which follow it at once.
                finished = await anext(events)
                if isinstance(finished, Failed):
                    yield sse(stream_error_payload(finished.error))
                    return
                text = (body.inputs if parameters.return_full_text else "") + finished.generated_text
                details = StreamDetails(
                    finish_reason=finished.finish_reason,
                    generated_tokens=finished.generated_tokens,
                    prompt_tokens=finished.prompt_tokens,
                    input_length=finished.prompt_tokens,
                    seed=finished.seed,
                    routing=finished.routing,
                )
                yield sse(StreamResponse(index=event.index, token=_token(event), generated_text=text, details=details).model_dump())
                log_request(request.url.path, request, finished)
                return
            event = await anext(events)
    finally:
        job.cancel()  # does nothing to a finished job; stops one whose client went away


def _token(event: TokenEvent) -> Token:
    return Token(id=event.id, text=event.text, logprob=event.logprob, special=event.special)


@router.post("/", response_model=None)
async def compat_generate(body: GenerateRequest, engine: EngineDep, request: Request):
    """Serve TGI's and LoRAX's root route: ``/generate``'s response as a one-item list, or ``/generate_stream`` when ``stream`` is true."""
    if body.stream:
        return await generate_stream(body, engine, request)
    return [await generate(body, engine, request)]


def _version() -> str:
    with contextlib.suppress(PackageNotFoundError):
        return version("quiver")
    return "unknown"


@router.get("/info")
def info(engine: EngineDep) -> dict:
    """Describe the served model and the limits in TGI's ``/info`` shape, with Quiver's experts and routing added."""
    settings = engine.settings
    return {
        "model_id": engine.base_model_id,
        "model_sha": None,
        "model_dtype": str(engine.model.dtype).removeprefix("torch."),
        "model_device_type": engine.device.type,
        "model_pipeline_tag": "text-generation",
        "max_concurrent_requests": settings.max_batch_size + settings.max_queue,
        "max_best_of": 1,
        "max_stop_sequences": MAX_STOP_SEQUENCES,
        "max_input_tokens": settings.max_input_tokens,
        "max_input_length": settings.max_input_tokens,
        "max_total_tokens": settings.max_input_tokens + settings.max_new_tokens,
        "max_new_tokens": settings.max_new_tokens,
        "max_batch_size": settings.max_batch_size,
        "max_batch_prefill_tokens": settings.max_batch_prefill_tokens,
        "max_queue": settings.max_queue,
        "request_timeout": settings.request_timeout,
        "validation_workers": 1,
        "router": "quiver",
        "version": _version(),
        "sha": None,
        "docker_label": None,
        "experts": engine.router.expert_names,
        "routing": {
            "method": settings.routing_method,
            "pooling": settings.routing_pooling,
            "top_k": settings.routing_top_k,
            "temperature": settings.routing_temperature,
        },
    }
