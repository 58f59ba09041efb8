"""Arrow routing inside the base model: every token, in every adapted module, picks its experts.

:class:`ArrowRouter` replaces each adapted linear layer (``nn.Linear`` or GPT-2's ``Conv1D``) of
the base model with a :class:`RoutedLinear` that keeps the base layer and the factors of every
expert adapting that module. For a token whose input to the module is x (D_in,), with the
experts E in scope:

1. logits ℓ_e = |v_e · x| / T, with v_e the expert's prototype and T the temperature;
2. keep the k largest (k clamped to |E|) and take w = softmax over those k;
3. output W·x + Σ_{e in top-k} w_e · s_e · B_e·(A_e·x), each expert with its own scale s_e.

Each layer keeps the experts' factors stacked once, on the model's device and in its dtype:
A (E, R, D_in) and s·B (E, D_out, R), with smaller ranks zero-padded to the largest. Only the k
selected experts are computed per token: by gathering their factors when the batch is small
(decode steps), or by grouping tokens per expert when it is large (prompts). The stacks are
rebuilt only when the experts change (:meth:`ArrowRouter.load_experts`), never per request.

Every row of a batch may carry its own :class:`RoutingSettings` (experts in scope, k,
temperature, method, or a fixed weighted mix of named experts), so requests with different
settings share one forward pass. Dimension letters used in shape comments: N tokens, E experts,
K selected per token, R rank, D_in and D_out the module's sizes, B sequences, T positions.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .adapter import LINEAR_TYPES
from .errors import ExpertNotFoundError, QuiverError
from .store import LoadedExpert

logger = logging.getLogger(__name__)

DEFAULT_TOP_K = 4
DEFAULT_TEMPERATURE = 1.0
MIN_TEMPERATURE = 1e-4
"""Smaller temperatures overflow the softmax of logits that are about 1 or more."""


ROUTING_METHODS = ("arrow", "centered", "normalized", "sequence", "hybrid")
"""Scoring methods, each selectable per request:

- ``arrow``: ℓ_e = |v_e·x|, plain Arrow, per token;
- ``centered``: ℓ_e = |v_e·(x − μ)|, with μ the base model's mean input to the module, per token;
- ``normalized``: ℓ_e = |v_e·(x − μ)| / ‖x − μ‖, the centred score as a cosine, per token;
- ``sequence``: one mix per request, from the ``normalized`` scores averaged over the prompt
  tokens and applied to every token (``pooling`` picks per-module mixes or one vote across modules);
- ``hybrid``: per token, ``(1 − sequence_weight)·normalized + sequence_weight·sequence`` logits.
"""

POOLING_MODES = ("module", "vote")


class InvalidRoutingError(QuiverError, ValueError):
    """Routing settings that cannot be applied (unknown method, k below 1, temperature not positive)."""


@dataclass(frozen=True)
class RoutingSettings:
    """Routing settings of one forward pass.

    ``experts`` narrows the experts in scope: None means every expert in the library, an empty
    tuple means the base model alone. ``pooling`` and ``sequence_weight`` apply to the
    ``sequence`` and ``hybrid`` methods only.
    """

    top_k: int = DEFAULT_TOP_K
    temperature: float = DEFAULT_TEMPERATURE
    experts: tuple[str, ...] | None = None
    method: str = "arrow"
    pooling: str = "module"
    sequence_weight: float = 0.5
    weights: tuple[tuple[str, float], ...] | None = None
    """A fixed mix instead of routing: (expert, weight) pairs, the output being the weighted sum of
    those experts' outputs. One pair with weight 1 serves a single adapter (multi-LoRA serving)."""

    def __post_init__(self) -> None:
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise InvalidRoutingError(f"top_k is {self.top_k!r}; expected an integer of at least 1")
        if not self.temperature >= MIN_TEMPERATURE:
            raise InvalidRoutingError(f"temperature is {self.temperature!r}; expected a number of at least {MIN_TEMPERATURE}")
        if self.method not in ROUTING_METHODS:
            raise InvalidRoutingError(f"method is {self.method!r}; expected one of {', '.join(ROUTING_METHODS)}")
        if self.pooling not in POOLING_MODES:
            raise InvalidRoutingError(f"pooling is {self.pooling!r}; expected one of {', '.join(POOLING_MODES)}")
        if not 0 <= self.sequence_weight <= 1:
            raise InvalidRoutingError(f"sequence_weight is {self.sequence_weight!r}; expected a number from 0 to 1")
        if self.weights is not None:
            if not self.weights:
                raise InvalidRoutingError("weights is empty; name at least one expert with its weight")
            names = [name for name, _ in self.weights]
            if len(set(names)) != len(names):
                raise InvalidRoutingError(f"weights names an expert twice: {names}")
            for name, weight in self.weights:
                if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not math.isfinite(weight):
                    raise InvalidRoutingError(f"the weight of expert {name!r} is {weight!r}; expected a finite number")

    @property
    def needs_input_means(self) -> bool:
        return self.weights is None and self.method != "arrow"

    @property
    def needs_prompt_scores(self) -> bool:
        return self.weights is None and self.method in ("sequence", "hybrid")

    @property
    def named_experts(self) -> tuple[str, ...]:
        """The experts these settings name, which must be loaded."""
        if self.weights is not None:
            return tuple(name for name, _ in self.weights)
        return self.experts or ()


class RoutingRecorder:
    """Accumulates routing weights per expert over the positions it is shown.

    Each routed module reports, for every sequence, the weights of the last position of its
    input: in generation that is the position whose output predicts the next token, so over a
    whole ``generate`` call the recorder receives exactly the computations that produced the
    generated tokens.
    """

    def __init__(self) -> None:
        self._weight_sums: dict[str, float] = defaultdict(float)
        self._top1_counts: dict[str, int] = defaultdict(int)
        self.decisions = 0

    def record(self, module: str, expert_names: Sequence[str], weights: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """Add one decision per sequence from ``weights`` (B, T, E), dense over ``expert_names``.

        ``rows`` gives the batch rows that ``weights`` covers (None: every row); this recorder
        pools all rows together.
        """
        last = weights[:, -1].detach().float()  # (B, E)
        sums = last.sum(dim=0).tolist()  # (E,)
        top1 = torch.bincount(last.argmax(dim=-1), minlength=len(expert_names)).tolist()  # (E,)
        for name, total, count in zip(expert_names, sums, top1):
            self._weight_sums[name] += total
            self._top1_counts[name] += count
        self.decisions += last.shape[0]

    def mean_weights(self) -> dict[str, float]:
        """Return each expert's weight averaged over all decisions (modules × positions), summing to 1."""
        if not self.decisions:
            return {}
        return {name: total / self.decisions for name, total in sorted(self._weight_sums.items())}

    def top1_shares(self) -> dict[str, float]:
        """Return the share of decisions in which each expert had the largest weight."""
        if not self.decisions:
            return {}
        return {name: count / self.decisions for name, count in sorted(self._top1_counts.items())}


class RowRecorder:
    """Accumulates routing weights per batch row, so that requests sharing a batch are kept apart.

    Like :class:`RoutingRecorder`, each routed module reports the weights of the last position
    of every row. Call :meth:`mean_weights` once, after the forward pass.
    """

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.expert_names: list[str] = []
        self._column: dict[str, int] = {}
        self._records: list[tuple[tuple[str, ...], torch.Tensor | None, torch.Tensor]] = []

    def record(self, module: str, expert_names: Sequence[str], weights: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        """Keep the last position's weights (B_g, T, E) of ``rows`` (None: every row) for :meth:`mean_weights`."""
        # Summing is left to mean_weights, which adds the records of each group of rows in one
        # operation; a forward pass records once per routed module.
        self._records.append((tuple(expert_names), rows, weights[:, -1].detach()))

    def mean_weights(self) -> list[dict[str, float]]:
        """Return, per row, each expert's weight averaged over that row's decisions."""
        groups: dict[tuple, list[torch.Tensor]] = defaultdict(list)
        row_sets: dict[tuple, torch.Tensor | None] = {}
        for names, rows, last in self._records:
            key = (names, None if rows is None else tuple(rows.tolist()))
            groups[key].append(last)
            row_sets[key] = rows
        self._records.clear()

        for (names, _), lasts in groups.items():
            for name in names:
                if name not in self._column:
                    self._column[name] = len(self.expert_names)
                    self.expert_names.append(name)
        sums = torch.zeros(self.batch_size, len(self.expert_names))
        seen = torch.zeros(self.batch_size, len(self.expert_names), dtype=torch.bool)
        decisions = torch.zeros(self.batch_size)
        for key, lasts in groups.items():
            names, rows = key[0], row_sets[key]
            row_index = torch.arange(self.batch_size) if rows is None else rows.cpu()
            columns = torch.tensor([self._column[name] for name in names])
            total = torch.stack(lasts).float().sum(dim=0).cpu()  # (B_g, E)
            sums.index_put_((row_index[:, None], columns[None, :]), total, accumulate=True)
            seen[row_index[:, None], columns[None, :]] = True
            decisions[row_index] += len(lasts)

        result = []
        for row in range(self.batch_size):
            count = float(decisions[row])
            if not count:
                result.append({})
                continue
            result.append({name: float(sums[row, column]) / count for name, column in self._column.items() if seen[row, column]})
        return result


class _RouterState:
    """Settings and recorder shared by every routed layer of one model.

    ``groups`` splits the batch rows by settings: one ``(settings, rows)`` pair per distinct
    settings, ``rows`` None meaning every row. Every layer reads it, so it is computed once per
    request batch rather than per layer.
    """

    def __init__(self) -> None:
        self.groups: list[tuple[RoutingSettings, torch.Tensor | None]] = [(RoutingSettings(), None)]
        self.recorder: RoutingRecorder | RowRecorder | None = None
        self.scoring_mask: torch.Tensor | None = None  # (B, T) while a prompt scoring pass runs
        self.reference = False

    @property
    def settings(self) -> RoutingSettings:
        return self.groups[0][0]

    def set(self, settings: RoutingSettings | Sequence[RoutingSettings]) -> None:
        if isinstance(settings, RoutingSettings):
            self.groups = [(settings, None)]
            return
        distinct: dict[RoutingSettings, list[int]] = {}
        for row, row_settings in enumerate(settings):
            distinct.setdefault(row_settings, []).append(row)
        if len(distinct) == 1:
            self.groups = [(next(iter(distinct)), None)]
        else:
            self.groups = [(group, torch.tensor(rows)) for group, rows in distinct.items()]


GATHER_MAX_PAIRS = 64
"""Up to this many (token, expert) pairs, the selected factors are gathered per pair and applied
in one batched product (decode steps). Above it, tokens are grouped per expert (prompts), so each
selected expert's factors are read once. A padded batched product over all groups measured
2.2-3.2× slower than this loop on 2 CPU cores at 64-256 experts, since its products have an
inner size of only the rank."""


class RoutedLinear(nn.Module):
    """A linear layer whose output adds the Arrow-routed updates of the experts adapting it."""

    wraps_linear = True

    def __init__(self, name: str, base: nn.Module, state: _RouterState) -> None:
        super().__init__()
        self.name = name
        self.base = base
        self._state = state
        # nn.Linear stores its weight as (D_out, D_in); GPT-2's Conv1D as (D_in, D_out).
        d_out, d_in = base.weight.shape if isinstance(base, nn.Linear) else base.weight.shape[::-1]
        self.in_features, self.out_features = int(d_in), int(d_out)
        self.expert_names: list[str] = []
        self._position: dict[str, int] = {}
        weight = base.weight
        options = {"device": weight.device, "dtype": weight.dtype}
        self.register_buffer("lora_a", torch.empty(0, 0, self.in_features, **options), persistent=False)  # (E, R, D_in)
        self.register_buffer("lora_b", torch.empty(0, self.out_features, 0, **options), persistent=False)  # (E, D_out, R), scale folded in
        self.register_buffer("prototypes", torch.empty(0, self.in_features, **options), persistent=False)  # (E, D_in)
        self.register_buffer("input_mean", torch.zeros(self.in_features, **options), persistent=False)  # (D_in,)
        # Prompt scores of every expert of this layer, (B, E): pooled by a scoring pass, then the
        # per-sequence logits that the sequence and hybrid methods apply to every token.
        self.prompt_scores: torch.Tensor | None = None
        self.sequence_logits: torch.Tensor | None = None

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def set_experts(
        self,
        names: Sequence[str],
        lora_a: Sequence[torch.Tensor],
        lora_b: Sequence[torch.Tensor],
        scales: Sequence[float],
        prototypes: Sequence[torch.Tensor],
    ) -> None:
        """Stack the factors of this layer's experts on the base layer's device and dtype, replacing the old ones."""
        weight = self.base.weight
        options = {"device": weight.device, "dtype": weight.dtype}
        self.expert_names = list(names)
        self._position = {name: index for index, name in enumerate(self.expert_names)}
        self._scopes: dict[tuple[str, ...] | None, tuple[list[int], torch.Tensor]] = {}
        rank = max((a.shape[0] for a in lora_a), default=0)
        stacked_a = torch.zeros(len(lora_a), rank, self.in_features, **options)  # (E, R, D_in)
        stacked_b = torch.zeros(len(lora_b), self.out_features, rank, **options)  # (E, D_out, R)
        for index, (a, b, scale) in enumerate(zip(lora_a, lora_b, scales)):
            stacked_a[index, : a.shape[0]] = a.to(**options)
            stacked_b[index, :, : b.shape[1]] = (b.to(torch.float32) * scale).to(**options)
        self.lora_a, self.lora_b = stacked_a, stacked_b
        if prototypes:
            self.prototypes = torch.stack(list(prototypes)).to(**options)  # (E, D_in)
        else:
            self.prototypes = torch.empty(0, self.in_features, **options)

    def set_input_mean(self, mean: torch.Tensor | None) -> None:
        """Set μ, the base model's mean input to this layer; None sets zeros (plain Arrow)."""
        weight = self.base.weight
        if mean is None:
            self.input_mean = torch.zeros(self.in_features, device=weight.device, dtype=weight.dtype)
        else:
            self.input_mean = mean.to(weight.device, weight.dtype)  # (D_in,)

    def scope(self, experts: tuple[str, ...] | None) -> list[int]:
        """Return the indices of this layer's experts that are in ``experts`` (None: all)."""
        return self._scope(experts)[0]

    def _scope(self, experts: tuple[str, ...] | None) -> tuple[list[int], torch.Tensor]:
        """Return the indices of :meth:`scope` as a list and as a tensor, cached per set of experts because every decode step needs them."""
        cached = self._scopes.get(experts)
        if cached is None:
            if experts is None:
                indices = list(range(len(self.expert_names)))
            else:
                indices = [self._position[name] for name in experts if name in self._position]
            cached = self._scopes[experts] = (indices, torch.tensor(indices, device=self.lora_a.device, dtype=torch.long))
        return cached

    def token_logits(self, flat: torch.Tensor, scope: list[int], method: str) -> torch.Tensor:
        """Return the unscaled logits (N, E) of the tokens ``flat`` (N, D_in) for the experts in ``scope``."""
        prototypes = self.prototypes if len(scope) == len(self.expert_names) else self.prototypes[scope]  # (E, D_in)
        if method == "arrow":
            return (flat @ prototypes.T).abs()  # (N, E)
        centered = flat - self.input_mean  # (N, D_in)
        logits = (centered @ prototypes.T).abs()  # (N, E)
        if method == "centered":
            return logits
        return logits / centered.norm(dim=-1, keepdim=True).clamp_min(1e-6)  # (N, E)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = self.base(x)
        state = self._state
        if not self.expert_names:
            return output
        flat = x.reshape(-1, x.shape[-1])  # (N, D_in)
        if state.scoring_mask is not None:
            self._pool_prompt_scores(flat, state.scoring_mask)
            return output

        batch, length = (x.shape[0], x.shape[1]) if x.dim() == 3 else (1, flat.shape[0])
        update = None
        for settings, rows in state.groups:
            tokens = flat if rows is None else x[rows.to(x.device)].reshape(-1, x.shape[-1])  # (N_g, D_in)
            selected = self._select(tokens, settings, rows, length)
            if selected is None:
                continue
            index, weights, names, dense = selected
            if state.reference:
                group_update = self._reference_update(tokens, index, weights)
            else:
                group_update = self._sparse_update(tokens, index, weights)  # (N_g, D_out)
            if state.recorder is not None and dense is not None:
                state.recorder.record(self.name, names, dense.reshape(-1, length, len(names)), rows)
            if rows is None:
                update = group_update
            else:
                if update is None:
                    update = torch.zeros(batch, length, output.shape[-1], device=x.device, dtype=output.dtype)
                update = update.reshape(batch, length, -1)
                update[rows.to(x.device)] = group_update.reshape(len(rows), length, -1)
        if update is None:
            return output
        return output + update.reshape(output.shape)

    def _select(self, tokens: torch.Tensor, settings: RoutingSettings, rows: torch.Tensor | None, length: int):
        """Return the selected experts (N, K), their weights (N, K), the scope's names and dense weights (N, E), or None."""
        if settings.weights is not None:
            fixed = [(self._position[name], weight) for name, weight in settings.weights if name in self._position]
            if not fixed:
                return None
            index = torch.tensor([position for position, _ in fixed], device=tokens.device).expand(tokens.shape[0], -1)  # (N, K)
            weights = torch.tensor([weight for _, weight in fixed], device=tokens.device, dtype=tokens.dtype).expand(tokens.shape[0], -1)
            names = [self.expert_names[position] for position, _ in fixed]
            return index, weights, names, None

        scope, scope_index = self._scope(settings.experts)
        if not scope:
            return None
        logits = self._routing_logits(tokens, scope, settings, rows, length) / settings.temperature  # (N, E)
        k = min(settings.top_k, len(scope))
        top_logits, top_local = logits.topk(k, dim=-1)  # (N, K)
        weights = torch.softmax(top_logits.float(), dim=-1).to(tokens.dtype)  # (N, K)
        dense = None
        if self._state.recorder is not None:
            dense = torch.zeros_like(logits).scatter(1, top_local, weights)  # (N, E)
        return scope_index[top_local], weights, [self.expert_names[i] for i in scope], dense

    def _routing_logits(self, tokens: torch.Tensor, scope: list[int], settings: RoutingSettings, rows, length: int) -> torch.Tensor:
        if settings.method in ("arrow", "centered", "normalized"):
            return self.token_logits(tokens, scope, settings.method)  # (N, E)
        if self.sequence_logits is None:
            raise QuiverError(f"routing method {settings.method!r} needs the prompt scores; score the prompt first")
        per_row = self.sequence_logits if rows is None else self.sequence_logits[rows.to(self.sequence_logits.device)]  # (B_g, E_all)
        if len(scope) != per_row.shape[1]:
            per_row = per_row[:, scope]
        per_row = per_row.to(tokens.dtype)  # (B_g, E)
        sequence = per_row if length == 1 else per_row.repeat_interleave(length, dim=0)  # (N, E)
        if settings.method == "sequence":
            return sequence
        token = self.token_logits(tokens, scope, "normalized")  # (N, E)
        return (1 - settings.sequence_weight) * token + settings.sequence_weight * sequence

    def _sparse_update(self, tokens: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Return Σ_k w_k · s·B_k·(A_k·x) for each token, computing only the selected experts."""
        count, k = index.shape
        if count * k <= GATHER_MAX_PAIRS:
            pairs = index.reshape(-1)  # (N·K,)
            inputs = (tokens if k == 1 else tokens.repeat_interleave(k, dim=0))[:, :, None]  # (N·K, D_in, 1)
            hidden = torch.bmm(self.lora_a[pairs], inputs) * weights.reshape(-1, 1, 1)  # (N·K, R, 1)
            outputs = torch.bmm(self.lora_b[pairs], hidden)  # (N·K, D_out, 1)
            return outputs.reshape(count, k, -1).sum(dim=1)  # (N, D_out)

        # Group the (token, expert) pairs by expert and apply each selected expert to its tokens.
        pairs = index.reshape(-1)  # (N·K,)
        order = torch.argsort(pairs, stable=True)
        experts, counts = torch.unique_consecutive(pairs[order], return_counts=True)
        token_of_pair = order // k
        weight_of_pair = weights.reshape(-1)[order]
        update = torch.zeros(count, self.out_features, device=tokens.device, dtype=tokens.dtype)  # (N, D_out)
        start = 0
        for expert, size in zip(experts.tolist(), counts.tolist()):
            members = token_of_pair[start : start + size]  # (N_e,)
            hidden = (tokens[members] @ self.lora_a[expert].T) * weight_of_pair[start : start + size, None]  # (N_e, R)
            update.index_add_(0, members, hidden @ self.lora_b[expert].T)  # (N_e, D_out)
            start += size
        return update

    def _reference_update(self, tokens: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The plain version of :meth:`_sparse_update`, one token and one expert at a time, for tests."""
        update = torch.zeros(tokens.shape[0], self.out_features, device=tokens.device, dtype=tokens.dtype)
        for token in range(tokens.shape[0]):
            for slot in range(index.shape[1]):
                expert = int(index[token, slot])
                update[token] += weights[token, slot] * (self.lora_b[expert] @ (self.lora_a[expert] @ tokens[token]))
        return update

    def _pool_prompt_scores(self, flat: torch.Tensor, mask: torch.Tensor) -> None:
        """Average the normalized logits of every expert over each prompt's tokens, ignoring padding."""
        batch, length = mask.shape
        scope = list(range(len(self.expert_names)))
        logits = self.token_logits(flat, scope, "normalized").reshape(batch, length, -1).float()  # (B, T, E)
        weights = mask.to(logits.dtype)[..., None]  # (B, T, 1)
        self.prompt_scores = (logits * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1)  # (B, E)


class ArrowRouter:
    """Installs :class:`RoutedLinear` layers in a model and keeps their experts current.

    The model is changed in place: each adapted ``nn.Linear`` is replaced by a routed layer that
    wraps it, so the base weights are shared, never copied.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._state = _RouterState()
        self.layers: dict[str, RoutedLinear] = {}
        self.expert_names: list[str] = []
        self.revision: int | None = None
        self.input_means: dict[str, torch.Tensor] | None = None

    def load_experts(self, experts: Sequence[LoadedExpert], revision: int | None = None) -> None:
        """Place ``experts`` in the model, replacing whatever experts it had before."""
        by_module: dict[str, list[tuple[LoadedExpert, str]]] = defaultdict(list)
        for expert in experts:
            for module in expert.modules:
                by_module[module].append((expert, module))

        for module in by_module:
            if module not in self.layers:
                self._wrap(module)
        for module, layer in self.layers.items():
            entries = by_module.get(module, [])
            layer.set_experts(
                [expert.info.name for expert, _ in entries],
                [expert.modules[name].lora_a for expert, name in entries],
                [expert.modules[name].lora_b for expert, name in entries],
                [expert.modules[name].scale for expert, name in entries],
                [expert.prototypes[name] for expert, name in entries],
            )
        self.expert_names = sorted(expert.info.name for expert in experts)
        self.revision = revision
        logger.info("routing across %d experts in %d modules", len(experts), len(by_module))

    def set_input_means(self, means: dict[str, torch.Tensor]) -> None:
        """Give every routed layer μ, its mean input in the base model, for the centred methods."""
        self.input_means = dict(means)
        for name, layer in self.layers.items():
            layer.set_input_mean(self.input_means.get(name))

    def _wrap(self, module_name: str) -> None:
        base = self.model.get_submodule(module_name)
        if not isinstance(base, LINEAR_TYPES):
            raise QuiverError(f"module {module_name!r} is a {type(base).__name__}; only nn.Linear and Conv1D modules can be routed")
        layer = RoutedLinear(module_name, base, self._state)
        if self.input_means is not None:
            layer.set_input_mean(self.input_means.get(module_name))
        self.model.set_submodule(module_name, layer)
        self.layers[module_name] = layer

    def check_settings(self, settings: RoutingSettings) -> None:
        """Raise for experts in ``settings`` that are not loaded, or a method that lacks statistics."""
        for name in settings.named_experts:
            if name not in self.expert_names:
                raise ExpertNotFoundError(name, self.expert_names)
        if settings.needs_input_means and self.input_means is None:
            raise InvalidRoutingError(
                f"routing method {settings.method!r} needs the base model's input statistics, which are not loaded; "
                "use method 'arrow' or load them with set_input_means"
            )

    @property
    def reference(self) -> bool:
        """Whether routed layers use the plain one-token-at-a-time computation (for tests)."""
        return self._state.reference

    @reference.setter
    def reference(self, value: bool) -> None:
        self._state.reference = bool(value)

    @contextlib.contextmanager
    def routing(
        self,
        settings: RoutingSettings | Sequence[RoutingSettings],
        recorder: RoutingRecorder | RowRecorder | None = None,
        sequence_logits: dict[str, torch.Tensor] | None = None,
    ) -> Iterator[None]:
        """Route forward passes inside the block with ``settings``, reporting to ``recorder``.

        ``settings`` applies to every row of the batch, or is a sequence with one entry per row,
        so that requests with different settings share one forward pass. For the ``sequence``
        and ``hybrid`` methods, call :meth:`score_prompt` inside the block before generating,
        or pass the ``sequence_logits`` that :meth:`sequence_logits` returned after scoring
        (one row per batch row), which lets a request keep its prompt's mix across batches.
        """
        rows = [settings] if isinstance(settings, RoutingSettings) else list(settings)
        if not rows:
            raise InvalidRoutingError("routing needs settings for at least one row")
        for row_settings in set(rows):
            self.check_settings(row_settings)
        previous = (self._state.groups, self._state.recorder)
        self._state.set(settings)
        self._state.recorder = recorder
        if sequence_logits is not None:
            for name, logits in sequence_logits.items():
                self.layers[name].sequence_logits = logits
        try:
            yield
        finally:
            self._state.groups, self._state.recorder = previous
            for layer in self.layers.values():
                layer.prompt_scores = None
                layer.sequence_logits = None

    @torch.no_grad()
    def score_prompt(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> None:
        """Decide the per-sequence expert mix of the sequence and hybrid methods from the prompts.

        Runs the base model alone over ``input_ids`` (B, T), pools each layer's normalized scores
        over the unpadded prompt tokens and stores the resulting logits in the layers. With
        ``pooling="vote"``, every layer votes for its best expert in scope and all layers share
        the vote shares as logits. Does nothing when no row uses those methods.
        """
        groups = self._state.groups
        if not any(settings.needs_prompt_scores for settings, _ in groups):
            return
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        self._state.scoring_mask = mask
        try:
            self.model(input_ids=input_ids, attention_mask=mask)
        finally:
            self._state.scoring_mask = None

        active = [layer for layer in self.layers.values() if layer.prompt_scores is not None]
        for layer in active:
            layer.sequence_logits = torch.zeros_like(layer.prompt_scores)  # (B, E_layer)
        for settings, rows in groups:
            if not settings.needs_prompt_scores:
                continue
            row_index = torch.arange(input_ids.shape[0]) if rows is None else rows
            if settings.pooling == "module":
                for layer in active:
                    layer.sequence_logits[row_index] = layer.prompt_scores[row_index.to(layer.prompt_scores.device)]
            else:
                self._vote(active, settings, row_index)
        for layer in active:
            layer.sequence_logits = layer.sequence_logits.to(layer.weight.dtype)

    def sequence_logits(self) -> dict[str, torch.Tensor] | None:
        """Return the per-row sequence logits (B, E_layer) of every layer that :meth:`score_prompt` set, or None."""
        logits = {name: layer.sequence_logits for name, layer in self.layers.items() if layer.sequence_logits is not None}
        return logits or None

    @staticmethod
    def _vote(layers: list[RoutedLinear], settings: RoutingSettings, rows: torch.Tensor) -> None:
        """Give every layer, for ``rows``, the share of layers whose best expert in scope is each expert."""
        names = sorted({layer.expert_names[i] for layer in layers for i in layer.scope(settings.experts)})
        column = {name: index for index, name in enumerate(names)}
        votes = torch.zeros(len(rows), len(names))  # (B_g, E_all)
        for layer in layers:
            scope = layer.scope(settings.experts)
            if not scope:
                continue
            scores = layer.prompt_scores[rows.to(layer.prompt_scores.device)][:, scope]  # (B_g, E)
            winners = scores.argmax(dim=-1).cpu()  # (B_g,)
            votes[torch.arange(len(rows)), torch.tensor([column[layer.expert_names[scope[w]]] for w in winners.tolist()])] += 1
        shares = votes / votes.sum(dim=-1, keepdim=True).clamp_min(1)  # (B_g, E_all)
        for layer in layers:
            scope = layer.scope(settings.experts)
            if not scope:
                continue
            layer_columns = [column[layer.expert_names[i]] for i in scope]
            values = shares[:, layer_columns].to(layer.sequence_logits.device, layer.sequence_logits.dtype)  # (B_g, E)
            block = layer.sequence_logits[rows.to(layer.sequence_logits.device)]
            block[:, scope] = values
            layer.sequence_logits[rows.to(layer.sequence_logits.device)] = block
