"""Continuous batching: concurrent requests share the model's forward passes.

One scheduler thread owns the model. Each iteration admits waiting requests up to the batch
size, and their prompts run together in one prefill pass. Then one decode step runs for every
running request, and the requests that finished, were cancelled or timed out leave the batch. A
request therefore joins at the next step and leaves as soon as it is done, without waiting for
the others.

The running requests share one transformers ``DynamicCache``. Prompts are left-padded, so the
cache of a new group is padded on the left to the batch's length (or the batch's to the
group's) and concatenated along the batch dimension. Leaving rows are removed with the cache's
``batch_select_indices``, and columns that only padding still uses are trimmed. Positions are
tracked per row, so padding never shifts a request's positions.

Each row keeps its own sampling (transformers logits processors and a seeded generator) and its
own routing settings. The router applies one settings object per row in the same forward pass,
and a request's prompt-level expert mix (sequence and hybrid routing) travels with its row.
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import logging
import math
import queue
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicLayer
from transformers.generation.logits_process import LogitsProcessor, LogitsProcessorList

from quiver.library import ArrowRouter, QuiverError, RoutingSettings, RowRecorder

logger = logging.getLogger(__name__)


class QueueFullError(QuiverError):
    """The server's queue of waiting requests is full; retry after ``retry_after`` seconds."""

    def __init__(self, waiting: int, retry_after: int) -> None:
        self.retry_after = retry_after
        super().__init__(
            f"the server is at capacity: {waiting} requests are already waiting; retry in about {retry_after} s "
            "or raise QUIVER_MAX_QUEUE on the server"
        )


class RequestTimeoutError(QuiverError):
    """A request did not finish within the server's request timeout."""

    def __init__(self, seconds: float, generated: int) -> None:
        self.seconds = seconds
        super().__init__(
            f"the request did not finish within the server's timeout of {seconds:g} s ({generated} tokens generated); "
            "ask for fewer max_new_tokens, retry when the server is less busy, or raise QUIVER_REQUEST_TIMEOUT"
        )


class GenerationCancelledError(QuiverError):
    """A request stopped because its client disconnected."""

    def __init__(self) -> None:
        super().__init__("the client closed the connection, so the generation was stopped")


class FrequencyPenaltyLogitsProcessor(LogitsProcessor):
    """Subtracts ``penalty`` times each token's count among the generated tokens from its logit (OpenAI's frequency penalty)."""

    def __init__(self, penalty: float, prompt_length: int) -> None:
        self.penalty = penalty
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_length :]
        if generated.shape[1] == 0:
            return scores
        counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        return scores - self.penalty * counts


@dataclass(frozen=True)
class TokenEvent:
    """One generated token, as streamed."""

    index: int
    id: int
    text: str
    logprob: float
    special: bool
    last: bool = False
    """Whether this is the generation's last token; its ``Finished`` event follows at once."""


@dataclass(frozen=True)
class PrefillToken:
    id: int
    text: str
    logprob: float | None


@dataclass(frozen=True)
class Finished:
    """The end of a generation, sent after its last token."""

    finish_reason: str
    generated_text: str
    generated_tokens: int
    prompt_tokens: int
    seed: int | None
    routing: dict[str, float]
    prefill: list[PrefillToken]
    seconds: float
    time_to_first_token: float | None


@dataclass(frozen=True)
class Failed:
    """A generation that stopped with an error."""

    error: Exception


Event = TokenEvent | Finished | Failed


@dataclass
class Job:
    """One request in flight: what to generate, and how far it got."""

    request_id: str
    prompt_ids: list[int]
    max_new_tokens: int
    routing: RoutingSettings
    processors: LogitsProcessorList
    sample: bool
    seed: int | None
    stop: tuple[str, ...] = ()
    eos_token_ids: frozenset[int] = frozenset()
    prefill_details: bool = False
    timeout: float = 300.0
    loop: asyncio.AbstractEventLoop | None = None

    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    routing_sums: dict[str, float] = field(default_factory=lambda: collections.defaultdict(float))
    decisions: int = 0
    prefill: list[PrefillToken] = field(default_factory=list)
    submitted: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    cancelled: bool = False

    def __post_init__(self) -> None:
        self.generator: torch.Generator | None = None
        if self.sample:
            self.generator = torch.Generator()
            if self.seed is None:
                self.seed = int(torch.randint(0, 2**62, (1,)).item())
            self.generator.manual_seed(self.seed)
        self._async_events: asyncio.Queue[Event] | None = asyncio.Queue() if self.loop is not None else None
        self._events: queue.SimpleQueue[Event] = queue.SimpleQueue()

    @property
    def deadline(self) -> float:
        return self.submitted + self.timeout

    def cancel(self) -> None:
        """Stop generating for this request at the next step (its client went away)."""
        self.cancelled = True

    def emit(self, event: Event) -> None:
        if self._async_events is None:
            self._events.put(event)
            return
        try:
            self.loop.call_soon_threadsafe(self._async_events.put_nowait, event)
        except RuntimeError:  # the event loop is closed, so no reader is left
            self.cancelled = True

    async def events(self) -> AsyncIterator[Event]:
        """Yield the request's events as they come, ending after ``Finished`` or ``Failed``."""
        if self._async_events is None:
            raise RuntimeError("this job was created without an event loop; read it with iter_events()")
        while True:
            event = await self._async_events.get()
            yield event
            if not isinstance(event, TokenEvent):
                return

    def iter_events(self) -> Iterator[Event]:
        """The blocking version of :meth:`events`, for callers without an event loop."""
        while True:
            event = self._events.get()
            yield event
            if not isinstance(event, TokenEvent):
                return

    def mean_routing(self) -> dict[str, float]:
        if self.routing.weights is not None:
            return dict(self.routing.weights)
        if not self.decisions:
            return {}
        return {name: total / self.decisions for name, total in sorted(self.routing_sums.items())}


def check_batchable(model: PreTrainedModel) -> None:
    """Raise when the model's cache is not a plain growing key/value cache in every layer."""
    cache = DynamicCache(config=model.config)
    kinds = {type(layer).__name__ for layer in cache.layers if type(layer) is not DynamicLayer}
    if kinds:
        raise QuiverError(
            f"continuous batching needs full attention in every layer, but this model's cache has {', '.join(sorted(kinds))} "
            "layers (sliding-window or recurrent); serve a model with full attention"
        )


class Batcher:
    """Runs every request through one shared batch, in a background thread."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        router: ArrowRouter,
        *,
        max_batch_size: int,
        max_queue: int,
        max_prefill_tokens: int,
        refresh: Callable[[], None],
        needs_refresh: Callable[[], bool],
        observer: BatchObserver | None = None,
    ) -> None:
        check_batchable(model)
        self.model, self.tokenizer, self.router = model, tokenizer, router
        self.max_batch_size, self.max_queue, self.max_prefill_tokens = max_batch_size, max_queue, max_prefill_tokens
        self._refresh, self._needs_refresh = refresh, needs_refresh
        self.observer = observer or BatchObserver()
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        self._special_ids = set(tokenizer.all_special_ids)
        self._waiting: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._recent_seconds = 1.0  # a moving average of request durations, for Retry-After
        # The running batch: one row per job, with its cache, attention mask, next positions and
        # the per-layer sequence logits (B, E_layer) of prompt-level routing.
        self._active: list[Job] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None  # (B, T)
        self._positions: torch.Tensor | None = None  # (B,)
        self._sequence_logits: dict[str, torch.Tensor] | None = None

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._active)

    def retry_after(self) -> int:
        """Seconds until the queue has likely moved by one batch, at least 1."""
        batches = max(1, math.ceil(len(self._waiting) / self.max_batch_size))
        return max(1, math.ceil(batches * self._recent_seconds))

    def submit(self, job: Job) -> None:
        """Queue ``job``; it joins the batch at the next step that has room.

        Raises:
            QueueFullError: ``max_queue`` requests are already waiting.
        """
        with self._cond:
            # Requests that can join the batch at the next step do not count against the queue.
            room = max(0, self.max_batch_size - len(self._active))
            if len(self._waiting) >= self.max_queue + room:
                raise QueueFullError(len(self._waiting), self.retry_after())
            self._waiting.append(job)
            self._ensure_thread()
            self._cond.notify()

    def close(self) -> None:
        """Stop the scheduler thread; requests still waiting or running fail."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)
        for job in [*self._waiting, *self._active]:
            job.emit(Failed(QuiverError("the server is shutting down; retry on another replica or after the restart")))
        self._waiting.clear()
        self._reset_batch()

    def _ensure_thread(self) -> None:
        if self._thread is None and not self._stopped:
            self._thread = threading.Thread(target=self._run, name="quiver-batcher", daemon=True)
            self._thread.start()
            # Stop the thread before the interpreter tears torch down under it.
            atexit.register(_close_if_alive, weakref.ref(self))

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and not self._waiting and not self._active:
                    self._cond.wait()
                if self._stopped:
                    return
            try:
                self._step()
            except Exception as error:  # noqa: BLE001 - one failing batch must not stop the server
                logger.error("a generation step failed; failing its %d requests", len(self._active), exc_info=error)
                for job in self._active:
                    job.emit(Failed(error))
                self._reset_batch()

    # -- one scheduler iteration ---------------------------------------------------------------

    def _step(self) -> None:
        self._drop_stopped()
        admitted = self._admit()
        if admitted:
            self._prefill(admitted)
        if self._active:
            self._decode()

    def _drop_stopped(self) -> None:
        """Remove cancelled and timed-out requests, from the queue and from the batch."""
        now = time.monotonic()
        with self._cond:
            for job in [job for job in self._waiting if job.cancelled or now > job.deadline]:
                self._waiting.remove(job)
                self._stop_job(job, now)
        stopped = [row for row, job in enumerate(self._active) if job.cancelled or now > job.deadline]
        if stopped:
            for row in stopped:
                self._stop_job(self._active[row], now)
            self._keep([row for row in range(len(self._active)) if row not in stopped])

    def _stop_job(self, job: Job, now: float) -> None:
        if job.cancelled:
            # A reader may still wait on the job (a route that has not noticed the disconnect yet).
            job.emit(Failed(GenerationCancelledError()))
            self.observer.cancelled(job)
            return
        job.emit(Failed(RequestTimeoutError(job.timeout, len(job.output_ids))))
        self.observer.timed_out(job)

    def _admit(self) -> list[Job]:
        """Take waiting requests that fit in the batch; reload changed experts once the batch is empty."""
        with self._cond:
            if not self._waiting or len(self._active) >= self.max_batch_size:
                return []
        # Experts change only between batches, so a running request is never served by two versions.
        if self._needs_refresh():
            if self._active:
                return []
            self._refresh()
        admitted: list[Job] = []
        longest = 0
        with self._cond:
            while self._waiting and len(self._active) + len(admitted) < self.max_batch_size:
                candidate = self._waiting[0]
                length = max(longest, len(candidate.prompt_ids))
                if admitted and length * (len(admitted) + 1) > self.max_prefill_tokens:
                    break
                admitted.append(self._waiting.popleft())
                longest = length
        usable = []
        for job in admitted:
            try:
                self.router.check_settings(job.routing)
            except QuiverError as error:  # an expert removed while the request waited
                job.emit(Failed(error))
                continue
            usable.append(job)
        return usable

    def _prefill(self, jobs: list[Job]) -> None:
        """Run the prompts of ``jobs`` in one forward pass, choose their first tokens, and add them to the batch."""
        length = max(len(job.prompt_ids) for job in jobs)
        input_ids = torch.full((len(jobs), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(jobs), length), dtype=torch.long)
        for row, job in enumerate(jobs):
            input_ids[row, length - len(job.prompt_ids) :] = torch.tensor(job.prompt_ids)
            mask[row, length - len(job.prompt_ids) :] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(dim=-1) - 1).clamp_min(0)  # (B, T)
        cache = DynamicCache(config=self.model.config)
        recorder = RowRecorder(len(jobs))
        full_logits = any(job.prefill_details for job in jobs)
        with torch.inference_mode(), self.router.routing([job.routing for job in jobs], recorder):
            self.router.score_prompt(input_ids, mask)
            sequence_logits = self.router.sequence_logits()
            output = self.model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=positions,
                cache=cache,
                use_cache=True,
                logits_to_keep=0 if full_logits else 1,
            )
        if full_logits:
            self._record_prefill(jobs, input_ids, mask, output.logits)
        self._join(jobs, cache, mask, positions[:, -1] + 1, sequence_logits)
        self._advance(output.logits[:, -1], recorder, start=len(self._active) - len(jobs))

    def _decode(self) -> None:
        """Generate one token for every running request."""
        jobs = self._active
        self.observer.step(len(jobs), len(self._waiting))
        input_ids = torch.tensor([[job.output_ids[-1]] for job in jobs], device=self.device)  # (B, 1)
        mask = torch.cat([self._mask, self._mask.new_ones(len(jobs), 1)], dim=1)  # (B, T + 1)
        recorder = RowRecorder(len(jobs))
        with torch.inference_mode(), self.router.routing([job.routing for job in jobs], recorder, self._sequence_logits):
            output = self.model(
                input_ids=input_ids,
                attention_mask=mask,
                position_ids=self._positions[:, None],
                cache=self._cache,
                use_cache=True,
            )
        self._mask = mask
        self._positions = self._positions + 1
        self._advance(output.logits[:, -1], recorder, start=0)

    def _advance(self, logits: torch.Tensor, recorder: RowRecorder, start: int) -> None:
        """Choose the next token of the rows from ``start`` on, then drop the rows that finished."""
        jobs = self._active[start:]
        logits = logits.float()  # (B, V)
        greedy_logprobs = torch.log_softmax(logits, dim=-1)
        for row, (job, weights) in enumerate(zip(jobs, recorder.mean_weights())):
            for name, weight in weights.items():
                job.routing_sums[name] += weight
            job.decisions += 1
            if job.processors or job.sample:
                ids = torch.tensor([job.prompt_ids + job.output_ids], device=logits.device)
                scores = job.processors(ids, logits[row : row + 1]) if job.processors else logits[row : row + 1]
                logprobs = torch.log_softmax(scores, dim=-1)[0]
                if job.sample:
                    token = int(torch.multinomial(logprobs.exp().cpu(), 1, generator=job.generator))
                else:
                    token = int(logprobs.argmax())
            else:
                logprobs = greedy_logprobs[row]
                token = int(logprobs.argmax())
            self._add_token(job, token, float(logprobs[token]))
        finished = [row for row, job in enumerate(self._active) if job.finish_reason is not None]
        if finished:
            self._keep([row for row in range(len(self._active)) if row not in finished])

    def _add_token(self, job: Job, token: int, logprob: float) -> None:
        now = time.monotonic()
        if job.first_token_at is None:
            job.first_token_at = now
            self.observer.first_token(job, now - job.submitted)
        job.output_ids.append(token)
        special = token in self._special_ids
        text = ""  # a special token (end of sequence) adds nothing to the text, so its text is empty
        if not special:
            decoded = self.tokenizer.decode(job.output_ids, skip_special_tokens=True)
            # An incomplete multi-byte character decodes as U+FFFD; wait for the next token.
            if not decoded.endswith("\ufffd"):
                if decoded.startswith(job.text):
                    text = decoded[len(job.text) :]
                job.text = decoded
        if token in job.eos_token_ids:
            job.finish_reason = "eos_token"
        elif job.stop and not special and any(stop in job.text[-(len(stop) + len(text)) :] for stop in job.stop):
            job.finish_reason = "stop_sequence"
        elif len(job.output_ids) >= job.max_new_tokens:
            job.finish_reason = "length"
        job.emit(TokenEvent(len(job.output_ids) - 1, token, text, logprob, special, last=job.finish_reason is not None))
        if job.finish_reason is not None:
            seconds = now - job.submitted
            self._recent_seconds = 0.8 * self._recent_seconds + 0.2 * seconds
            job.emit(
                Finished(
                    finish_reason=job.finish_reason,
                    generated_text=self.tokenizer.decode(job.output_ids, skip_special_tokens=True),
                    generated_tokens=len(job.output_ids),
                    prompt_tokens=len(job.prompt_ids),
                    seed=job.seed if job.sample else None,
                    routing=job.mean_routing(),
                    prefill=job.prefill,
                    seconds=seconds,
                    time_to_first_token=job.first_token_at - job.submitted,
                )
            )
            self.observer.finished(job, seconds)

    def _record_prefill(self, jobs: list[Job], input_ids: torch.Tensor, mask: torch.Tensor, logits: torch.Tensor) -> None:
        """Give the jobs that asked for it each prompt token with its log-probability given the tokens before it."""
        for row, job in enumerate(jobs):
            if not job.prefill_details:
                continue
            start = int(mask.shape[1] - mask[row].sum())
            ids = input_ids[row, start:]
            logprobs = torch.log_softmax(logits[row, start:-1].float(), dim=-1).gather(1, ids[1:, None])[:, 0].tolist()
            texts = self.tokenizer.convert_ids_to_tokens(ids.tolist())
            job.prefill = [PrefillToken(int(ids[0]), texts[0], None)] + [
                PrefillToken(int(token), text, logprob) for token, text, logprob in zip(ids[1:].tolist(), texts[1:], logprobs)
            ]

    # -- the shared batch state ----------------------------------------------------------------

    def _join(
        self,
        jobs: list[Job],
        cache: DynamicCache,
        mask: torch.Tensor,
        positions: torch.Tensor,
        sequence_logits: dict[str, torch.Tensor] | None,
    ) -> None:
        """Append the rows of a prefilled group to the running batch."""
        if not self._active:
            self._active, self._cache, self._mask, self._positions = list(jobs), cache, mask, positions
            self._sequence_logits = sequence_logits
            return
        old_length, new_length = self._mask.shape[1], mask.shape[1]
        length = max(old_length, new_length)
        for old, new in zip(self._cache.layers, cache.layers):
            old.keys = torch.cat([_pad_left(old.keys, length - old_length, dim=2), _pad_left(new.keys, length - new_length, dim=2)])
            old.values = torch.cat([_pad_left(old.values, length - old_length, dim=2), _pad_left(new.values, length - new_length, dim=2)])
        self._mask = torch.cat([_pad_left(self._mask, length - old_length, dim=1), _pad_left(mask, length - new_length, dim=1)])
        self._positions = torch.cat([self._positions, positions])
        self._sequence_logits = _merge_rows(self._sequence_logits, sequence_logits, len(self._active), len(jobs))
        self._active.extend(jobs)

    def _keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` of the batch, then trim the cache columns that only padding uses."""
        if not rows:
            self._reset_batch()
            return
        index = torch.tensor(rows, device=self.device)
        self._active = [self._active[row] for row in rows]
        self._cache.batch_select_indices(index)
        self._mask = self._mask[index]
        self._positions = self._positions[index]
        if self._sequence_logits is not None:
            self._sequence_logits = {name: logits[index.to(logits.device)] for name, logits in self._sequence_logits.items()}
        unused = int(self._mask.any(dim=0).long().argmax())  # leading columns where every row is padding
        if unused > 0:
            for layer in self._cache.layers:
                layer.keys = layer.keys[:, :, unused:]
                layer.values = layer.values[:, :, unused:]
            self._mask = self._mask[:, unused:]

    def _reset_batch(self) -> None:
        self._active, self._cache, self._mask, self._positions, self._sequence_logits = [], None, None, None, None


class BatchObserver:
    """Receives what the batcher does, for metrics; the default does nothing."""

    def step(self, running: int, waiting: int) -> None: ...

    def first_token(self, job: Job, seconds: float) -> None: ...

    def finished(self, job: Job, seconds: float) -> None: ...

    def cancelled(self, job: Job) -> None: ...

    def timed_out(self, job: Job) -> None: ...


def _close_if_alive(reference: weakref.ref) -> None:
    batcher = reference()
    if batcher is not None:
        batcher.close()


def _pad_left(tensor: torch.Tensor, amount: int, dim: int) -> torch.Tensor:
    if amount == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = amount
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _merge_rows(
    old: dict[str, torch.Tensor] | None, new: dict[str, torch.Tensor] | None, old_rows: int, new_rows: int
) -> dict[str, torch.Tensor] | None:
    """Stack two groups' per-layer sequence logits, with zero rows where a group has none."""
    if old is None and new is None:
        return None
    merged = {}
    for name in {*(old or {}), *(new or {})}:
        reference = (old or {}).get(name)
        if reference is None:
            reference = new[name]
        top = old.get(name) if old else None
        bottom = new.get(name) if new else None
        top = top if top is not None else reference.new_zeros(old_rows, reference.shape[1])
        bottom = bottom if bottom is not None else reference.new_zeros(new_rows, reference.shape[1])
        merged[name] = torch.cat([top, bottom])
    return merged
