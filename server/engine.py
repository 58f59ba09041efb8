"""The inference engine: the base model, its routed layers and the expert library, used together.

Requests are tokenized and checked here, then handed to the :class:`~.batching.Batcher`, which
runs all of them through shared forward passes. Between batches the batcher compares the
library revision with the one the routed layers were built from, and reloads the experts when
they differ.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from quiver.client.models import GenerateDetails, GenerateParameters, GenerateResponse, Token
from quiver.library import ArrowRouter, ExpertLibrary, ExpertNotFoundError, RoutingSettings, load_base_model
from quiver.library.statistics import load_or_compute_input_means

from .batching import Batcher, Failed, Finished, FrequencyPenaltyLogitsProcessor, Job, TokenEvent
from .metrics import Metrics
from .settings import Settings

logger = logging.getLogger(__name__)


def _start_hub(library: ExpertLibrary, settings: Settings):
    """Connect the library to ``settings.hub_repo`` and pull it; serve the local copy if the Hub is unreachable."""
    if not settings.hub_repo:
        return None
    from quiver.library.hub import HubSync

    hub = HubSync(library, settings.hub_repo, revision=settings.hub_revision)
    hub.start()
    return hub


class RequestTooLargeError(ValueError):
    """A prompt or ``max_new_tokens`` beyond the server's limits."""


class ModelNotFoundError(KeyError):
    """An OpenAI ``model`` that is neither the routed library nor an expert."""

    def __init__(self, model: str, experts: list[str]) -> None:
        self.message = (
            f"model {model!r} not found; use 'quiver' to route across the library, or one expert's name: {', '.join(experts) or 'none yet'}"
        )
        super().__init__(self.message)

    def __str__(self) -> str:
        return self.message


class ChatTemplateMissingError(ValueError):
    """A chat request to a model whose tokenizer has no chat template."""


@dataclass(frozen=True)
class GenerationResult:
    response: GenerateResponse
    prompt_tokens: int
    seconds: float


class Engine:
    """Owns the model, tokenizer, library, router and batcher of one server."""

    def __init__(self, settings: Settings, model: PreTrainedModel | None = None, tokenizer: PreTrainedTokenizerBase | None = None) -> None:
        """Load the base model named by ``settings``, or serve ``model`` and ``tokenizer`` when both are given."""
        settings.check()
        self.settings = settings
        # Reject a bad default routing at startup rather than on the first request.
        RoutingSettings(
            method=settings.routing_method,
            pooling=settings.routing_pooling,
            top_k=settings.routing_top_k,
            temperature=settings.routing_temperature,
        )
        if model is None or tokenizer is None:
            model, tokenizer = load_base_model(settings.base_model, device=settings.device, dtype=settings.dtype, cache_dir=settings.cache_dir)
        self.model, self.tokenizer = model, tokenizer
        self.base_model_id = str(self.model.config.name_or_path)
        self.library = ExpertLibrary(settings.resolved_library_dir, self.model, base_model_id=self.base_model_id)
        self.hub = _start_hub(self.library, settings)
        self.router = ArrowRouter(self.model)
        self.metrics = Metrics()
        self._refresh()
        with torch.inference_mode(), self.router.routing(RoutingSettings(experts=())):
            self.router.set_input_means(load_or_compute_input_means(self.library.root, self.model, self.tokenizer))
        self.batcher = Batcher(
            self.model,
            self.tokenizer,
            self.router,
            max_batch_size=settings.max_batch_size,
            max_queue=settings.max_queue,
            max_prefill_tokens=max(settings.max_batch_prefill_tokens, settings.max_input_tokens),
            refresh=self._refresh,
            needs_refresh=lambda: self.library.revision != self.router.revision,
            observer=self.metrics.batch_observer(),
        )
        self.metrics.watch(self.batcher)
        self.eos_token_ids = frozenset(_eos_ids(self.model, self.tokenizer))
        self.max_total_tokens = int(getattr(self.model.config, "max_position_embeddings", 0) or 0) or None

    @property
    def device(self) -> torch.device:
        return self.model.device

    def close(self) -> None:
        """Stop the batcher; requests still in flight fail with a clear error."""
        self.batcher.close()

    def _refresh(self) -> None:
        """Reload the routed experts when the library changed since they were loaded."""
        if self.library.revision == self.router.revision:
            return
        revision, experts, failures = self.library.load_all()
        for name, error in failures.items():
            logger.error("skipping expert %s, which cannot be loaded: %s", name, error)
        self.router.load_experts(experts, revision)

    def routing_settings(self, parameters: GenerateParameters) -> RoutingSettings:
        """Return the routing settings of a request, filling unset fields with the server's defaults."""
        routing = parameters.routing
        weights = None
        if parameters.adapter_id is not None:
            weights = ((parameters.adapter_id, 1.0),)
        elif parameters.merged_adapters is not None:
            merged = parameters.merged_adapters
            values = merged.weights or [1.0 / len(merged.ids)] * len(merged.ids)
            weights = tuple(zip(merged.ids, values))
        return RoutingSettings(
            top_k=routing.top_k or self.settings.routing_top_k,
            temperature=routing.temperature or self.settings.routing_temperature,
            experts=None if routing.experts is None else tuple(routing.experts),
            method=routing.method or self.settings.routing_method,
            pooling=routing.pooling or self.settings.routing_pooling,
            sequence_weight=routing.sequence_weight,
            weights=weights,
        )

    def encode(self, inputs: str, truncate: int | None = None) -> list[int]:
        """Tokenize a prompt, keeping its last ``truncate`` tokens when set.

        Raises:
            RequestTooLargeError: the prompt is longer than the server accepts.
        """
        # A token is rarely longer than a few dozen characters, so a much longer text can be
        # rejected before the tokenizer spends time on it.
        if truncate is None and len(inputs) > 64 * self.settings.max_input_tokens:
            raise RequestTooLargeError(
                f"the prompt has {len(inputs)} characters; this server accepts at most {self.settings.max_input_tokens} tokens"
            )
        ids = self.tokenizer(inputs)["input_ids"]
        if truncate is not None:
            ids = ids[-truncate:]
        if len(ids) > self.settings.max_input_tokens:
            raise RequestTooLargeError(
                f"the prompt has {len(ids)} tokens; this server accepts at most {self.settings.max_input_tokens}; "
                "shorten it or set parameters.truncate"
            )
        return ids

    def submit(
        self,
        prompt_ids: list[int],
        parameters: GenerateParameters,
        *,
        request_id: str,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> Job:
        """Queue a generation of ``prompt_ids``; its events arrive on the returned job.

        Raises:
            RequestTooLargeError: ``max_new_tokens`` or the total length exceeds the server's limits.
            ExpertNotFoundError: the request names an expert that is not in the library.
            InvalidRoutingError: the routing settings cannot be applied.
            QueueFullError: too many requests are waiting already.
        """
        max_new_tokens = parameters.max_new_tokens or 20
        if max_new_tokens > self.settings.max_new_tokens:
            raise RequestTooLargeError(
                f"max_new_tokens is {max_new_tokens}; this server allows at most {self.settings.max_new_tokens}"
            )
        if not prompt_ids:
            raise RequestTooLargeError("the prompt has no tokens; give at least one")
        if self.max_total_tokens and len(prompt_ids) + max_new_tokens > self.max_total_tokens:
            raise RequestTooLargeError(
                f"the prompt's {len(prompt_ids)} tokens plus max_new_tokens {max_new_tokens} exceed the model's "
                f"{self.max_total_tokens} positions; shorten the prompt or lower max_new_tokens"
            )
        settings = self.routing_settings(parameters)
        known = set(self.library.names())
        for name in settings.named_experts:
            if name not in known:
                raise ExpertNotFoundError(name, sorted(known))
        job = Job(
            request_id=request_id,
            prompt_ids=list(prompt_ids),
            max_new_tokens=max_new_tokens,
            routing=settings,
            processors=_processors(parameters, len(prompt_ids)),
            sample=parameters.sampling,
            seed=parameters.seed,
            stop=tuple(parameters.stop),
            eos_token_ids=frozenset() if parameters.ignore_eos_token else self.eos_token_ids,
            prefill_details=parameters.details and parameters.decoder_input_details,
            timeout=self.settings.request_timeout,
            loop=loop,
        )
        self.batcher.submit(job)
        return job

    def generate(self, inputs: str, parameters: GenerateParameters, request_id: str = "local") -> GenerationResult:
        """Generate a continuation of ``inputs`` and wait for it (a blocking call for scripts and tests).

        Raises:
            RequestTooLargeError: the prompt or ``max_new_tokens`` exceeds the server's limits.
            ExpertNotFoundError: the request names an expert that is not in the library.
        """
        prompt_ids = self.encode(inputs, parameters.truncate)
        job = self.submit(prompt_ids, parameters, request_id=request_id)
        tokens: list[TokenEvent] = []
        for event in job.iter_events():
            if isinstance(event, TokenEvent):
                tokens.append(event)
            elif isinstance(event, Failed):
                raise event.error
            else:
                return GenerationResult(build_response(event, tokens, parameters, inputs), event.prompt_tokens, event.seconds)
        raise RuntimeError("the generation ended without a result")  # pragma: no cover - iter_events always ends with one


def build_response(finished: Finished, tokens: list[TokenEvent], parameters: GenerateParameters, inputs: str) -> GenerateResponse:
    """Build the TGI-style response of a finished generation."""
    text = finished.generated_text
    if parameters.return_full_text:
        text = inputs + text
    details = parameters.details
    return GenerateResponse(
        generated_text=text,
        details=GenerateDetails(
            finish_reason=finished.finish_reason,
            generated_tokens=finished.generated_tokens,
            prompt_tokens=finished.prompt_tokens,
            seed=finished.seed,
            prefill=[Token(id=token.id, text=token.text, logprob=token.logprob) for token in finished.prefill] if details else [],
            tokens=[Token(id=t.id, text=t.text, logprob=t.logprob, special=t.special) for t in tokens] if details else [],
            routing=finished.routing,
        ),
    )


def _eos_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """Return the token ids that end a generation: the tokenizer's and the generation config's end-of-sequence tokens."""
    ids: set[int] = set()
    for value in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(item) for item in value)
    return ids


def _processors(parameters: GenerateParameters, prompt_length: int) -> LogitsProcessorList:
    """Build the transformers logits processors of a request's penalties and sampling settings."""
    processors = LogitsProcessorList()
    if parameters.repetition_penalty not in (None, 1.0):
        processors.append(RepetitionPenaltyLogitsProcessor(parameters.repetition_penalty))
    if parameters.frequency_penalty:
        processors.append(FrequencyPenaltyLogitsProcessor(parameters.frequency_penalty, prompt_length))
    if parameters.sampling:
        if parameters.temperature not in (None, 1.0):
            processors.append(TemperatureLogitsWarper(parameters.temperature))
        if parameters.top_k:
            processors.append(TopKLogitsWarper(parameters.top_k))
        if parameters.top_p not in (None, 1.0):
            processors.append(TopPLogitsWarper(parameters.top_p))
        if parameters.typical_p not in (None, 1.0):
            processors.append(TypicalLogitsWarper(parameters.typical_p))
    return processors
