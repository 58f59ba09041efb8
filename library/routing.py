"""Arrow routing inside the base model: every token, in every adapted module, picks its experts.

:class:`ArrowRouter` replaces each adapted linear layer (``nn.Linear`` or GPT-2's ``Conv1D``) of the base model with a
:class:`RoutedLinear` that keeps the base layer and the factors of every expert adapting that
module. For a token whose input to the module is x (D_in,), with the experts E in scope:

1. logits ℓ_e = |v_e · x| / T, with v_e the expert's prototype and T the temperature;
2. keep the k largest (k clamped to |E|) and take w = softmax over those k;
3. output W·x + Σ_{e in top-k} w_e · s_e · B_e·(A_e·x), each expert with its own scale s_e.

Prompt and generated tokens are routed alike. Dimension letters used in shape comments:
N tokens, E experts in scope, K selected per token, R rank, D_in and D_out the module's sizes.

NOTE: this is the plain reference implementation. It already computes only the selected
experts (tokens are grouped by expert), but loops over experts in Python and keeps one factor
pair per expert rather than a stacked tensor.
"""

from __future__ import annotations

import contextlib
import logging
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

    @property
    def needs_input_means(self) -> bool:
        return self.method != "arrow"

    @property
    def needs_prompt_scores(self) -> bool:
        return self.method in ("sequence", "hybrid")


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

    def record(self, module: str, expert_names: Sequence[str], weights: torch.Tensor) -> None:
        """Add one decision per sequence from ``weights`` (B, T, E), dense over ``expert_names``."""
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


class _RouterState:
    """Settings and recorder shared by every routed layer of one model."""

    def __init__(self) -> None:
        self.settings = RoutingSettings()
        self.recorder: RoutingRecorder | None = None
        self.scoring_mask: torch.Tensor | None = None  # (B, T) while a prompt scoring pass runs


class RoutedLinear(nn.Module):
    """A linear layer whose output adds the Arrow-routed updates of the experts adapting it."""

    wraps_linear = True

    def __init__(self, name: str, base: nn.Module, state: _RouterState) -> None:
        super().__init__()
        self.name = name
        self.base = base
        # nn.Linear stores its weight as (D_out, D_in); GPT-2's Conv1D as (D_in, D_out).
        d_out, d_in = base.weight.shape if isinstance(base, nn.Linear) else base.weight.shape[::-1]
        self.in_features, self.out_features = int(d_in), int(d_out)
        self._state = state
        self.expert_names: list[str] = []
        self._position: dict[str, int] = {}
        self.lora_a = nn.ParameterList()  # E × (R_e, D_in)
        self.lora_b = nn.ParameterList()  # E × (D_out, R_e)
        weight = base.weight
        self.register_buffer("scales", torch.empty(0), persistent=False)  # (E,)
        self.register_buffer("prototypes", torch.empty(0, self.in_features), persistent=False)  # (E, D_in)
        self.register_buffer("input_mean", torch.zeros(self.in_features, device=weight.device, dtype=weight.dtype), persistent=False)  # (D_in,)
        # Prompt scores of the experts in scope, (B, E): pooled by a scoring pass, then the
        # per-sequence logits that the sequence and hybrid methods apply to every token.
        self.prompt_scores: torch.Tensor | None = None
        self.sequence_logits: torch.Tensor | None = None

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def set_experts(self, names: Sequence[str], lora_a: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor], scales: Sequence[float], prototypes: Sequence[torch.Tensor]) -> None:
        """Replace the experts of this layer; factors are moved to the base layer's device and dtype."""
        weight = self.base.weight
        self.expert_names = list(names)
        self._position = {name: index for index, name in enumerate(self.expert_names)}
        self.lora_a = nn.ParameterList([nn.Parameter(a.to(weight.device, weight.dtype), requires_grad=False) for a in lora_a])
        self.lora_b = nn.ParameterList([nn.Parameter(b.to(weight.device, weight.dtype), requires_grad=False) for b in lora_b])
        self.scales = torch.tensor(list(scales), dtype=weight.dtype, device=weight.device)  # (E,)
        if prototypes:
            self.prototypes = torch.stack(list(prototypes)).to(weight.device, weight.dtype)  # (E, D_in)
        else:
            self.prototypes = torch.empty(0, self.in_features, device=weight.device, dtype=weight.dtype)

    def set_input_mean(self, mean: torch.Tensor | None) -> None:
        """Set μ, the base model's mean input to this layer; None sets zeros (plain Arrow)."""
        weight = self.base.weight
        if mean is None:
            self.input_mean = torch.zeros(self.in_features, device=weight.device, dtype=weight.dtype)
        else:
            self.input_mean = mean.to(weight.device, weight.dtype)  # (D_in,)

    def scope(self, experts: tuple[str, ...] | None) -> list[int]:
        """Return the indices of this layer's experts that are in ``experts`` (None: all)."""
        if experts is None:
            return list(range(len(self.expert_names)))
        return [self._position[name] for name in experts if name in self._position]

    def token_logits(self, flat: torch.Tensor, scope: list[int], method: str) -> torch.Tensor:
        """Return the unscaled logits (N, E) of the tokens ``flat`` (N, D_in) for the experts in ``scope``."""
        prototypes = self.prototypes[torch.tensor(scope, device=flat.device)]  # (E, D_in)
        if method == "arrow":
            return (flat @ prototypes.T).abs()  # (N, E)
        centered = flat - self.input_mean  # (N, D_in)
        logits = (centered @ prototypes.T).abs()  # (N, E)
        if method == "centered":
            return logits
        return logits / centered.norm(dim=-1, keepdim=True).clamp_min(1e-6)  # (N, E)

    def _routing_logits(self, x: torch.Tensor, flat: torch.Tensor, scope: list[int]) -> torch.Tensor:
        settings = self._state.settings
        if settings.method in ("arrow", "centered", "normalized"):
            return self.token_logits(flat, scope, settings.method)  # (N, E)

        if self.sequence_logits is None:
            raise QuiverError(f"routing method {settings.method!r} needs the prompt scores; score the prompt first")
        batch, length = x.shape[0], x.shape[1]
        sequence = self.sequence_logits[:, None, :].expand(batch, length, -1).reshape(batch * length, -1)  # (N, E)
        if settings.method == "sequence":
            return sequence
        token = self.token_logits(flat, scope, "normalized")  # (N, E)
        return (1 - settings.sequence_weight) * token + settings.sequence_weight * sequence

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = self.base(x)
        state = self._state
        settings = state.settings
        scope = self.scope(settings.experts)
        if not scope:
            return output

        flat = x.reshape(-1, x.shape[-1])  # (N, D_in)
        if state.scoring_mask is not None:
            self._pool_prompt_scores(flat, scope, state.scoring_mask)
            return output

        # 1. Logits of every expert in scope, per token.
        logits = self._routing_logits(x, flat, scope) / settings.temperature  # (N, E)

        # 2. Top-k experts per token, softmax over the k kept.
        k = min(settings.top_k, len(scope))
        top_logits, top_index = logits.topk(k, dim=-1)  # (N, K), (N, K)
        top_weights = torch.softmax(top_logits.float(), dim=-1).to(x.dtype)  # (N, K)
        weights = torch.zeros_like(logits).scatter(1, top_index, top_weights)  # (N, E)

        # 3. Weighted sum of the selected experts' outputs, computing each expert on its tokens only.
        update = torch.zeros(flat.shape[0], output.shape[-1], device=x.device, dtype=output.dtype)  # (N, D_out)
        for column, expert in enumerate(scope):
            tokens = (top_index == column).any(dim=-1).nonzero().squeeze(-1)  # (N_e,)
            if tokens.numel() == 0:
                continue
            hidden = flat[tokens] @ self.lora_a[expert].T  # (N_e, R)
            expert_output = hidden @ self.lora_b[expert].T  # (N_e, D_out)
            update.index_add_(0, tokens, expert_output * (weights[tokens, column] * self.scales[expert]).unsqueeze(-1))

        if state.recorder is not None:
            names = [self.expert_names[index] for index in scope]
            state.recorder.record(self.name, names, weights.reshape(*x.shape[:-1], len(scope)))

        return output + update.reshape(output.shape)

    def _pool_prompt_scores(self, flat: torch.Tensor, scope: list[int], mask: torch.Tensor) -> None:
        """Average the normalized logits over each prompt's tokens, ignoring padding."""
        batch, length = mask.shape
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
        for name in settings.experts or ():
            if name not in self.expert_names:
                raise ExpertNotFoundError(name, self.expert_names)
        if settings.needs_input_means and self.input_means is None:
            raise InvalidRoutingError(
                f"routing method {settings.method!r} needs the base model's input statistics, which are not loaded; "
                "use method 'arrow' or load them with set_input_means"
            )

    @contextlib.contextmanager
    def routing(self, settings: RoutingSettings, recorder: RoutingRecorder | None = None) -> Iterator[None]:
        """Route forward passes inside the block with ``settings``, reporting to ``recorder``.

        For the ``sequence`` and ``hybrid`` methods, call :meth:`score_prompt` inside the block
        before generating.

        NOTE: the settings apply to the whole model, so one routed forward pass serves one
        request's settings at a time; callers serialise requests.
        """
        self.check_settings(settings)
        previous = (self._state.settings, self._state.recorder)
        self._state.settings, self._state.recorder = settings, recorder
        try:
            yield
        finally:
            self._state.settings, self._state.recorder = previous
            for layer in self.layers.values():
                layer.prompt_scores = None
                layer.sequence_logits = None

    @torch.no_grad()
    def score_prompt(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> None:
        """Decide the per-sequence expert mix of the sequence and hybrid methods from the prompts.

        Runs the base model alone over ``input_ids`` (B, T), pools each layer's normalized scores
        over the unpadded prompt tokens and stores the resulting logits in the layers. With
        ``pooling="vote"``, every layer votes for its best expert and all layers share the vote
        shares as logits. Does nothing for the other methods.
        """
        settings = self._state.settings
        if not settings.needs_prompt_scores:
            return
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        self._state.scoring_mask = mask
        try:
            self.model(input_ids=input_ids, attention_mask=mask)
        finally:
            self._state.scoring_mask = None

        active = [layer for layer in self.layers.values() if layer.prompt_scores is not None]
        if settings.pooling == "module":
            for layer in active:
                layer.sequence_logits = layer.prompt_scores.to(layer.weight.dtype)
            return

        names = sorted({name for layer in active for name in (layer.expert_names[i] for i in layer.scope(settings.experts))})
        column = {name: index for index, name in enumerate(names)}
        votes = torch.zeros(input_ids.shape[0], len(names))  # (B, E_all)
        for layer in active:
            layer_names = [layer.expert_names[i] for i in layer.scope(settings.experts)]
            winners = layer.prompt_scores.argmax(dim=-1).cpu()  # (B,)
            votes[torch.arange(votes.shape[0]), torch.tensor([column[layer_names[w]] for w in winners.tolist()])] += 1
        shares = votes / votes.sum(dim=-1, keepdim=True).clamp_min(1)  # (B, E_all)
        for layer in active:
            layer_columns = [column[layer.expert_names[i]] for i in layer.scope(settings.experts)]
            layer.sequence_logits = shares[:, layer_columns].to(layer.weight.device, layer.weight.dtype)  # (B, E)
