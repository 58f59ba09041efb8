"""Read a PEFT LoRA adapter folder and check it against the base model it will adapt.

A PEFT LoRA adapter is a folder with ``adapter_config.json`` and ``adapter_model.safetensors``.
Every weight key names a module of the base model and a factor, for example
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` (the adapter name may
appear before ``.weight``, as in ``lora_A.default.weight``). For one module, ``lora_A`` is
(R, D_in) and ``lora_B`` is (D_out, R), and PEFT adds ``scale · B·A·x`` to the module's output.

Checks run before anything is written, and every problem is collected into one
:class:`~quiver.library.errors.InvalidExpertError` rather than stopping at the first.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from .errors import InvalidExpertError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

_PEFT_PREFIX = "base_model.model."
_KEY_PATTERN = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")

ModuleShapes = Mapping[str, tuple[int, int]]
"""Base-model module name to its (D_in, D_out), for every module an adapter may target."""


@dataclass(frozen=True)
class LoraModule:
    """The LoRA factors of one adapted module: the update is ``scale · lora_b @ lora_a``."""

    name: str
    lora_a: torch.Tensor  # (R, D_in)
    lora_b: torch.Tensor  # (D_out, R)
    scale: float

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0]


@dataclass(frozen=True)
class LoraAdapter:
    """A validated LoRA adapter: its PEFT config and its factors by base-model module name."""

    config: dict
    modules: dict[str, LoraModule]
    weights_sha256: str

    @property
    def alpha(self) -> float:
        return float(self.config.get("lora_alpha", 8))

    @property
    def rank(self) -> int:
        """The largest rank of any module (equal to the config's ``r`` unless a rank pattern is set)."""
        return max(module.rank for module in self.modules.values())


def linear_module_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Return (D_in, D_out) of every ``nn.Linear`` in ``model``, keyed by module name.

    A linear layer already wrapped for routing counts under the wrapper's name, so the shapes are
    the same before and after routing is installed.
    """
    shapes = {}
    for name, module in model.named_modules():
        if not (isinstance(module, nn.Linear) or getattr(module, "wraps_linear", False)):
            continue
        if name.rpartition(".")[0] in shapes:
            continue  # the base layer inside a routing wrapper, already counted under the wrapper's name
        shapes[name] = (module.in_features, module.out_features)
    return shapes


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_adapter(expert: str, folder: str | Path, module_shapes: ModuleShapes) -> LoraAdapter:
    """Read the adapter in ``folder`` and check that it can adapt a model with ``module_shapes``.

    Raises:
        InvalidExpertError: listing every problem found, each naming the module and values.
    """
    folder = Path(folder)
    problems: list[str] = []

    config = _read_config(folder / CONFIG_FILE, problems)
    weights = _read_weights(folder / WEIGHTS_FILE, problems)
    if config is None or weights is None:
        raise InvalidExpertError(expert, problems)

    _check_config(config, module_shapes, problems)
    config_is_valid = not problems
    factors = _pair_factors(weights, problems)
    modules = {}
    for name, (lora_a, lora_b) in sorted(factors.items()):
        if not _check_module(name, lora_a, lora_b, module_shapes, problems) or not config_is_valid:
            continue
        expected_rank = _pattern_value(config.get("rank_pattern"), name, config["r"])
        if lora_a.shape[0] != expected_rank:
            problems.append(
                f"[{name}] the weights have rank {lora_a.shape[0]} but the config gives rank {expected_rank} "
                "(r or rank_pattern); PEFT could not load this adapter, so fix the config"
            )
            continue
        modules[name] = LoraModule(name, lora_a, lora_b, _module_scale(config, name, lora_a.shape[0]))
    if not factors and not problems:
        problems.append(f"{WEIGHTS_FILE} contains no lora_A/lora_B weights")
    if problems:
        raise InvalidExpertError(expert, problems)

    return LoraAdapter(config=config, modules=modules, weights_sha256=sha256_file(folder / WEIGHTS_FILE))


def _read_config(path: Path, problems: list[str]) -> dict | None:
    if not path.is_file():
        problems.append(f"{CONFIG_FILE} is missing; a PEFT LoRA adapter folder has {CONFIG_FILE} and {WEIGHTS_FILE}")
        return None
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        problems.append(f"{CONFIG_FILE} is not valid JSON: {error}")
        return None
    if not isinstance(config, dict):
        problems.append(f"{CONFIG_FILE} must contain a JSON object, found {type(config).__name__}")
        return None
    return config


def _read_weights(path: Path, problems: list[str]) -> dict[str, torch.Tensor] | None:
    if not path.is_file():
        problems.append(f"{WEIGHTS_FILE} is missing; a PEFT LoRA adapter folder has {CONFIG_FILE} and {WEIGHTS_FILE}")
        return None
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        problems.append(f"{WEIGHTS_FILE} is not a readable safetensors file: {error}")
        return None


def _check_config(config: dict, module_shapes: ModuleShapes, problems: list[str]) -> None:
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        problems.append(f"peft_type is {peft_type!r}; Quiver serves LoRA adapters only (peft_type 'LORA')")
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        problems.append(f"r is {rank!r}; expected a positive integer rank in {CONFIG_FILE}")
    alpha = config.get("lora_alpha", 8)
    if not _is_positive_number(alpha):
        problems.append(f"lora_alpha is {alpha!r}; expected a positive finite number")
    for field in ("alpha_pattern", "rank_pattern"):
        pattern = config.get(field) or {}
        if not isinstance(pattern, dict):
            problems.append(f"{field} is {pattern!r}; expected a JSON object of module pattern to number")
            continue
        for key, value in pattern.items():
            if not _is_positive_number(value):
                problems.append(f"{field}[{key!r}] is {value!r}; expected a positive finite number")

    # Variants whose output is not plain scale·B·A·x cannot be routed as Arrow experts.
    if config.get("use_dora"):
        problems.append("use_dora is true; DoRA adapters are not supported, train a plain LoRA adapter")
    if config.get("bias", "none") != "none":
        problems.append(f"bias is {config['bias']!r}; only bias 'none' is supported")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save is {config['modules_to_save']!r}; fully trained modules cannot be routed")

    targets = config.get("target_modules")
    if isinstance(targets, list):
        for target in targets:
            if not any(name == target or name.endswith("." + str(target)) for name in module_shapes):
                problems.append(f"target module {target!r} not found in the base model's linear modules")


def _is_positive_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _pair_factors(
    weights: dict[str, torch.Tensor], problems: list[str]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        match = _KEY_PATTERN.match(key.removeprefix(_PEFT_PREFIX))
        if match is None:
            problems.append(f"weight {key!r} is not a LoRA factor (expected '<module>.lora_A.weight' or '<module>.lora_B.weight')")
            continue
        factors.setdefault(match["module"], {})[match["factor"]] = tensor

    pairs = {}
    for module, pair in factors.items():
        missing = sorted({"A", "B"} - pair.keys())
        if missing:
            problems.append(f"[{module}] lora_{missing[0]} weight is missing")
            continue
        pairs[module] = (pair["A"], pair["B"])
    return pairs


def _check_module(
    name: str, lora_a: torch.Tensor, lora_b: torch.Tensor, module_shapes: ModuleShapes, problems: list[str]
) -> bool:
    if name not in module_shapes:
        problems.append(f"[{name}] module not found in the base model (is the adapter for another base model?)")
        return False
    d_in, d_out = module_shapes[name]
    if lora_a.ndim != 2 or lora_b.ndim != 2:
        problems.append(f"[{name}] lora_A and lora_B must be 2-D, got shapes {tuple(lora_a.shape)} and {tuple(lora_b.shape)}")
        return False

    found = len(problems)
    rank = lora_a.shape[0]
    if lora_a.shape[1] != d_in:
        problems.append(f"[{name}] lora_A shape {tuple(lora_a.shape)} does not match the module's input size {d_in}: expected ({rank}, {d_in})")
    if lora_b.shape != (d_out, rank):
        problems.append(f"[{name}] lora_B shape {tuple(lora_b.shape)} does not match: expected ({d_out}, {rank}) for output size {d_out} and rank {rank}")
    for factor, tensor in (("lora_A", lora_a), ("lora_B", lora_b)):
        if not tensor.is_floating_point():
            problems.append(f"[{name}] {factor} has dtype {tensor.dtype}; expected a floating-point dtype")
        elif not torch.isfinite(tensor).all():
            problems.append(f"[{name}] {factor} contains NaN or infinite values")
    return len(problems) == found


def _pattern_value(patterns: dict | None, module: str, default: float) -> float:
    """Return the value of the first pattern matching ``module``'s name, as PEFT matches them, else ``default``."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _module_scale(config: dict, module: str, rank: int) -> float:
    """Return PEFT's scale for ``module``: alpha / rank, or alpha / sqrt(rank) with rsLoRA."""
    alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8))
    if config.get("use_rslora"):
        return alpha / math.sqrt(rank)
    return alpha / rank
