"""Arrow routing inside the base model: every token, in every adapted module, picks its experts.

:class:`ArrowRouter` replaces each adapted ``nn.Linear`` of the base model with a
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

from .errors import ExpertNotFoundError, QuiverError
from .store import LoadedExpert

logger = logging.getLogger(__name__)

DEFAULT_TOP_K = 4
DEFAULT_TEMPERATURE = 1.0


class InvalidRoutingError(QuiverError, ValueError):
    """Routing settings that cannot be applied (k below 1, temperature not positive)."""


@dataclass(frozen=True)
class RoutingSettings:
    """Routing settings of one forward pass.

    ``experts`` narrows the experts in scope: None means every expert in the library, an empty
    tuple means the base model alone.
    """

    top_k: int = DEFAULT_TOP_K
    temperature: float = DEFAULT_TEMPERATURE
    experts: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise InvalidRoutingError(f"top_k is {self.top_k!r}; expected an integer of at least 1")
        if not self.temperature > 0:
            raise InvalidRoutingError(f"temperature is {self.temperature!r}; expected a number above 0")


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

    def record(self, expert_names: Sequence[str], weights: torch.Tensor) -> None:
        """Add one decision per row of ``weights`` (rows, E), dense over ``expert_names``."""
        sums = weights.detach().float().sum(dim=0).tolist()  # (E,)
        top1 = torch.bincount(weights.argmax(dim=-1), minlength=len(expert_names)).tolist()  # (E,)
        for name, total, count in zip(expert_names, sums, top1):
            self._weight_sums[name] += total
            self._top1_counts[name] += count
        self.decisions += weights.shape[0]

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


class RoutedLinear(nn.Module):
    """A linear layer whose output adds the Arrow-routed updates of the experts adapting it."""

    wraps_linear = True

    def __init__(self, base: nn.Linear, state: _RouterState) -> None:
        super().__init__()
        self.base = base
        self._state = state
        self.expert_names: list[str] = []
        self._position: dict[str, int] = {}
        self.lora_a = nn.ParameterList()  # E × (R_e, D_in)
        self.lora_b = nn.ParameterList()  # E × (D_out, R_e)
        self.register_buffer("scales", torch.empty(0), persistent=False)  # (E,)
        self.register_buffer("prototypes", torch.empty(0, base.in_features), persistent=False)  # (E, D_in)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

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
            self.prototypes = torch.empty(0, self.base.in_features, device=weight.device, dtype=weight.dtype)

    def _scope(self, experts: tuple[str, ...] | None) -> list[int]:
        if experts is None:
            return list(range(len(self.expert_names)))
        return [self._position[name] for name in experts if name in self._position]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = self.base(x)
        settings = self._state.settings
        scope = self._scope(settings.experts)
        if not scope:
            return output

        flat = x.reshape(-1, x.shape[-1])  # (N, D_in)
        scope_index = torch.tensor(scope, device=x.device)  # (E,)

        # 1. Logits: alignment of each token with each prototype, sign ignored.
        logits = (flat @ self.prototypes[scope_index].T).abs() / settings.temperature  # (N, E)

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

        recorder = self._state.recorder
        if recorder is not None:
            last = weights.reshape(*x.shape[:-1], len(scope))  # (..., T, E)
            last = last.reshape(-1, last.shape[-2], len(scope))[:, -1] if x.dim() > 2 else last  # (B, E)
            recorder.record([self.expert_names[index] for index in scope], last)

        return output + update.reshape(output.shape)


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

    def _wrap(self, module_name: str) -> None:
        base = self.model.get_submodule(module_name)
        if not isinstance(base, nn.Linear):
            raise QuiverError(f"module {module_name!r} is a {type(base).__name__}; only nn.Linear modules can be routed")
        layer = RoutedLinear(base, self._state)
        self.model.set_submodule(module_name, layer)
        self.layers[module_name] = layer

    def check_settings(self, settings: RoutingSettings) -> None:
        """Raise :class:`ExpertNotFoundError` for experts in ``settings`` that are not loaded."""
        for name in settings.experts or ():
            if name not in self.expert_names:
                raise ExpertNotFoundError(name, self.expert_names)

    @contextlib.contextmanager
    def routing(self, settings: RoutingSettings, recorder: RoutingRecorder | None = None) -> Iterator[None]:
        """Route forward passes inside the block with ``settings``, reporting to ``recorder``.

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
