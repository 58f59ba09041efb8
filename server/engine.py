"""The inference engine: the base model, its routed layers and the expert library, used together.

Requests are served one at a time under a lock, because routing settings apply to the whole
model during a forward pass. Before each request the engine compares the library revision with
the one its routed layers were built from, and reloads the experts when they differ.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from quiver.client.models import GenerateDetails, GenerateParameters, GenerateResponse
from quiver.library import (
    ArrowRouter,
    ExpertLibrary,
    RoutingRecorder,
    RoutingSettings,
    load_base_model,
)
from quiver.library.statistics import load_or_compute_input_means

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


@dataclass(frozen=True)
class GenerationResult:
    response: GenerateResponse
    prompt_tokens: int
    seconds: float


class Engine:
    """Owns the model, tokenizer, library and router of one server."""

    def __init__(self, settings: Settings, model: PreTrainedModel | None = None, tokenizer: PreTrainedTokenizerBase | None = None) -> None:
        """Load the base model named by ``settings``, or serve ``model`` and ``tokenizer`` when both are given."""
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
        self._lock = threading.Lock()
        with self._lock:
            self._refresh()
            with torch.inference_mode(), self.router.routing(RoutingSettings(experts=())):
                self.router.set_input_means(load_or_compute_input_means(self.library.root, self.model, self.tokenizer))

    @property
    def device(self) -> torch.device:
        return self.model.device

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

    def generate(self, inputs: str, parameters: GenerateParameters) -> GenerationResult:
        """Generate a continuation of ``inputs`` with Arrow routing across the library.

        Raises:
            RequestTooLargeError: the prompt or ``max_new_tokens`` exceeds the server's limits.
            ExpertNotFoundError: ``routing.experts`` names an expert that is not in the library.
        """
        if parameters.max_new_tokens > self.settings.max_new_tokens:
            raise RequestTooLargeError(
                f"max_new_tokens is {parameters.max_new_tokens}; this server allows at most {self.settings.max_new_tokens}"
            )
        # A token is rarely longer than a few dozen characters, so a much longer text can be
        # rejected before the tokenizer spends time on it.
        if len(inputs) > 64 * self.settings.max_input_tokens:
            raise RequestTooLargeError(
                f"the prompt has {len(inputs)} characters; this server accepts at most {self.settings.max_input_tokens} tokens"
            )
        encoded = self.tokenizer(inputs, return_tensors="pt").to(self.device)
        prompt_tokens = encoded["input_ids"].shape[1]
        if prompt_tokens > self.settings.max_input_tokens:
            raise RequestTooLargeError(
                f"the prompt has {prompt_tokens} tokens; this server accepts at most {self.settings.max_input_tokens}"
            )

        settings = self.routing_settings(parameters)
        sampling = {"do_sample": parameters.do_sample}
        if parameters.do_sample:
            sampling.update(temperature=parameters.temperature or 1.0, top_p=parameters.top_p or 1.0, top_k=0)

        started = time.perf_counter()
        recorder = RoutingRecorder()
        with self._lock:
            self._refresh()
            with torch.inference_mode(), self.router.routing(settings, recorder):
                self.router.score_prompt(encoded["input_ids"], encoded["attention_mask"])
                if parameters.seed is not None:
                    torch.manual_seed(parameters.seed)
                output = self.model.generate(
                    **encoded,
                    max_new_tokens=parameters.max_new_tokens,
                    pad_token_id=self.tokenizer.pad_token_id,
                    eos_token_id=self.tokenizer.eos_token_id,
                    **sampling,
                )
        new_tokens = output[0, prompt_tokens:].tolist()
        finished = bool(new_tokens) and new_tokens[-1] == self.tokenizer.eos_token_id
        response = GenerateResponse(
            generated_text=self.tokenizer.decode(new_tokens, skip_special_tokens=True),
            details=GenerateDetails(
                generated_tokens=len(new_tokens),
                finish_reason="eos_token" if finished else "length",
                routing=dict(settings.weights) if settings.weights is not None else recorder.mean_weights(),
            ),
        )
        return GenerationResult(response, prompt_tokens, time.perf_counter() - started)
