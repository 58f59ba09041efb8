"""OpenAI-compatible routes: ``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions``.

``model`` picks what generates: ``quiver`` (or no model) routes every token across the library, an
expert's name serves that expert alone. Sampling follows OpenAI's defaults: temperature 1 unless
given, and temperature 0 is greedy decoding. Stop sequences are left out of the returned text,
as OpenAI does. Quiver's ``routing`` settings can be added to the body (``extra_body`` in the
``openai`` package).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.concurrency import run_in_threadpool

from quiver.client.models import GenerateParameters, RoutingParameters

from ..batching import Failed, Finished, Job, TokenEvent
from ..deps import EngineDep
from ..engine import ChatTemplateMissingError, Engine, ModelNotFoundError, RequestTooLargeError
from ..errors import stream_error_payload
from .generate import SSE_HEADERS, collect, first_event, log_request, sse

router = APIRouter(prefix="/v1", tags=["openai"])

ROUTED_MODEL = "quiver"
"""The model name that routes across the whole library."""


class _OpenAIRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="'quiver' (or null) routes across the library; an expert's name serves that expert alone")
    temperature: float | None = Field(None, ge=0, le=2, description="sampling temperature; 0 is greedy decoding; null for 1")
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, description="only 1 is supported")
    stream: bool = False
    stream_options: dict | None = Field(None, description="{'include_usage': true} adds a last chunk with the token counts")
    stop: str | list[str] | None = Field(None, description="up to 8 strings that end the generated text; they are left out of the response")
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    presence_penalty: float | None = Field(None, description="only 0 (or null) is supported")
    logit_bias: dict | None = Field(None, description="not supported; must be null or empty")
    user: str | None = Field(None, description="accepted and ignored")
    routing: RoutingParameters | None = Field(None, description="Quiver's routing settings for this request")

    @model_validator(mode="after")
    def _supported(self):
        unsupported = {
            "n": self.n != 1,
            "presence_penalty": bool(self.presence_penalty),
            "logit_bias": bool(self.logit_bias),
        }
        named = [name for name, present in unsupported.items() if present]
        if named:
            raise ValueError(f"{', '.join(named)} is not supported by this server; leave it unset (n must be 1)")
        return self

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_OpenAIRequest):
    prompt: str | list[str] = Field(..., description="the prompt; a list must contain exactly one string")
    max_tokens: int | None = Field(16, ge=1, description="maximum number of tokens to generate; null for the server's limit")
    echo: bool = Field(False, description="only false is supported")
    logprobs: int | None = Field(None, description="not supported; must be null or 0")
    suffix: str | None = Field(None, description="not supported; must be null")
    best_of: int | None = Field(None, description="only 1 (or null) is supported")

    @model_validator(mode="after")
    def _one_prompt(self):
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            raise ValueError(f"prompt is a list of {len(self.prompt)} strings; this server takes one prompt per request")
        named = [name for name, present in {"echo": self.echo, "logprobs": bool(self.logprobs), "suffix": self.suffix is not None, "best_of": self.best_of not in (None, 1)}.items() if present]
        if named:
            raise ValueError(f"{', '.join(named)} is not supported by this server; leave it unset")
        return self

    @property
    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict] | None = None

    @model_validator(mode="after")
    def _text_only(self):
        for part in self.content if isinstance(self.content, list) else []:
            if part.get("type") != "text":
                raise ValueError(f"message content of type {part.get('type')!r} is not supported; send text parts only")
        return self

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(str(part.get("text", "")) for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_OpenAIRequest):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="maximum number of tokens to generate; null for the server's limit")
    max_completion_tokens: int | None = Field(None, ge=1, description="the newer name of max_tokens")
    logprobs: bool | None = Field(None, description="not supported; must be null or false")
    top_logprobs: int | None = Field(None, description="not supported; must be null")
    response_format: dict | None = Field(None, description="only {'type': 'text'} is supported")
    tools: list | None = Field(None, description="not supported; must be null")
    tool_choice: str | dict | None = Field(None, description="not supported; must be null or 'none'")
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _no_tools(self):
        unsupported = {
            "logprobs": bool(self.logprobs),
            "top_logprobs": self.top_logprobs is not None,
            "response_format": self.response_format not in (None, {"type": "text"}),
            "tools": bool(self.tools),
            "tool_choice": self.tool_choice not in (None, "none"),
        }
        named = [name for name, present in unsupported.items() if present]
        if named:
            raise ValueError(f"{', '.join(named)} is not supported by this server; leave it unset")
        return self


def _parameters(engine: Engine, body: _OpenAIRequest, max_tokens: int | None) -> GenerateParameters:
    """Translate an OpenAI request into TGI-style parameters, ``model`` deciding between routing and one expert."""
    adapter_id = None
    if body.model not in (None, "", ROUTED_MODEL):
        if body.model not in engine.library.names():
            raise ModelNotFoundError(body.model, engine.library.names())
        adapter_id = body.model
    temperature = 1.0 if body.temperature is None else body.temperature
    sampling = temperature > 0
    return GenerateParameters(
        max_new_tokens=max_tokens or engine.settings.max_new_tokens,
        do_sample=sampling,
        temperature=temperature if sampling and temperature != 1.0 else None,
        top_p=body.top_p if sampling else None,
        frequency_penalty=body.frequency_penalty,
        seed=body.seed,
        stop=body.stop_list,
        adapter_id=adapter_id,
        routing=body.routing or RoutingParameters(),
    )


def _finish_reason(reason: str) -> str:
    return "length" if reason == "length" else "stop"


class _StopTrimmer:
    """Holds back streamed text that may be the start of a stop sequence, and cuts the text at the first one."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = stops
        self.hold = max((len(stop) for stop in stops), default=1) - 1
        self.text = ""
        self.sent = 0
        self.stopped = False

    def feed(self, piece: str) -> str:
        """Add ``piece`` and return the text that can be sent now."""
        if self.stopped:
            return ""
        self.text += piece
        cut = self._first_stop()
        if cut is not None:
            self.stopped = True
            return self._send(cut)
        return self._send(max(self.sent, len(self.text) - self.hold))

    def flush(self) -> str:
        """Return whatever is still held back, at the end of the generation."""
        return "" if self.stopped else self._send(len(self.text))

    def _first_stop(self) -> int | None:
        found = [index for index in (self.text.find(stop) for stop in self.stops) if index >= 0]
        return min(found) if found else None

    def _send(self, end: int) -> str:
        out = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return out


def trim_at_stop(text: str, stops: list[str]) -> str:
    trimmer = _StopTrimmer(stops)
    return trimmer.feed(text) + trimmer.flush()


def _render_chat(engine: Engine, body: ChatCompletionRequest) -> list[int]:
    """Render the messages with the model's chat template and tokenize them."""
    if not getattr(engine.tokenizer, "chat_template", None):
        raise ChatTemplateMissingError(
            f"the served model {engine.base_model_id!r} has no chat template; send a plain prompt to /v1/completions instead"
        )
    messages = [{"role": message.role, "content": message.text()} for message in body.messages]
    rendered = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = engine.tokenizer(rendered, add_special_tokens=False)["input_ids"]
    if len(ids) > engine.settings.max_input_tokens:
        raise RequestTooLargeError(
            f"the conversation has {len(ids)} tokens after the chat template; this server accepts at most "
            f"{engine.settings.max_input_tokens}; drop earlier messages"
        )
    return ids


async def _submit(engine: Engine, request: Request, prompt_ids: list[int], parameters: GenerateParameters) -> Job:
    return engine.submit(prompt_ids, parameters, request_id=request.state.request_id, loop=asyncio.get_running_loop())


def _usage(finished: Finished) -> dict:
    return {
        "prompt_tokens": finished.prompt_tokens,
        "completion_tokens": finished.generated_tokens,
        "total_tokens": finished.prompt_tokens + finished.generated_tokens,
    }


@router.get("/models")
def list_models(engine: EngineDep) -> dict:
    """``quiver`` (routing across the library) and every expert, each usable as ``model``."""
    created = int(time.time())
    models = [{"id": ROUTED_MODEL, "object": "model", "created": created, "owned_by": "quiver", "root": engine.base_model_id}]
    models += [{"id": name, "object": "model", "created": created, "owned_by": "quiver", "root": engine.base_model_id, "parent": ROUTED_MODEL} for name in engine.library.names()]
    return {"object": "list", "data": models}


@router.post("/completions", response_model=None)
async def completions(body: CompletionRequest, engine: EngineDep, request: Request):
    """Complete a prompt (OpenAI's legacy completions)."""
    parameters = _parameters(engine, body, body.max_tokens)
    prompt_ids = await run_in_threadpool(engine.encode, body.text)
    job = await _submit(engine, request, prompt_ids, parameters)
    completion_id = f"cmpl-{uuid.uuid4().hex}"
    model = body.model or ROUTED_MODEL
    if body.stream:
        events, first = await first_event(job)
        chunks = _stream(job, events, first, body, request, lambda text, reason: {
            "id": completion_id,
            "object": "text_completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}],
        })
        return StreamingResponse(chunks, media_type="text/event-stream", headers=SSE_HEADERS)
    finished, _ = await collect(job, request)
    log_request("/v1/completions", request, finished)
    return {
        "id": completion_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": 0, "text": trim_at_stop(finished.generated_text, body.stop_list), "logprobs": None, "finish_reason": _finish_reason(finished.finish_reason)}
        ],
        "usage": _usage(finished),
        "routing": finished.routing,
    }


@router.post("/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, engine: EngineDep, request: Request):
    """Continue a conversation, rendered with the model's chat template."""
    parameters = _parameters(engine, body, body.max_completion_tokens or body.max_tokens)
    prompt_ids = await run_in_threadpool(_render_chat, engine, body)
    job = await _submit(engine, request, prompt_ids, parameters)
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    model = body.model or ROUTED_MODEL
    if body.stream:
        events, first = await first_event(job)
        started = {"value": False}

        def chunk(text: str, reason: str | None) -> dict:
            delta: dict = {} if reason is not None and not text else {"content": text}
            if not started["value"]:
                delta = {"role": "assistant", **delta, "content": text}
                started["value"] = True
            return {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": int(time.time()),
                "model": model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}],
            }

        return StreamingResponse(_stream(job, events, first, body, request, chunk), media_type="text/event-stream", headers=SSE_HEADERS)
    finished, _ = await collect(job, request)
    log_request("/v1/chat/completions", request, finished)
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": trim_at_stop(finished.generated_text, body.stop_list)},
                "logprobs": None,
                "finish_reason": _finish_reason(finished.finish_reason),
            }
        ],
        "usage": _usage(finished),
        "routing": finished.routing,
    }


async def _stream(job: Job, events: AsyncIterator, first, body: _OpenAIRequest, request: Request, chunk) -> AsyncIterator[bytes]:
    """Yield the server-sent chunks of an OpenAI stream, ending with ``data: [DONE]``."""
    trimmer = _StopTrimmer(body.stop_list)
    try:
        event = first
        while True:
            if isinstance(event, TokenEvent):
                if not event.special:
                    text = trimmer.feed(event.text)
                    if text:
                        yield sse(chunk(text, None))
            elif isinstance(event, Failed):
                yield sse(stream_error_payload(event.error))
                return
            else:
                last = chunk(trimmer.flush(), _finish_reason(event.finish_reason))
                last["routing"] = event.routing
                yield sse(last)
                if body.include_usage:
                    usage = chunk("", None)
                    usage["choices"], usage["usage"] = [], _usage(event)
                    yield sse(usage)
                yield b"data: [DONE]\n\n"
                log_request(request.url.path, request, event)
                return
            event = await anext(events)
    finally:
        job.cancel()
