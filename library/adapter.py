"""Read a PEFT LoRA adapter folder and check it against the base model it will adapt.

A PEFT LoRA adapter is a folder with ``adapter_config.json`` and its weights, either
``adapter_model.safetensors`` or the older pickled ``adapter_model.bin`` (read with
``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers).
Every weight key names a module of the base model and a factor, for example
``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` (the adapter name may appear
before ``.weight``, as in ``lora_A.default.weight``). For one module, ``lora_A`` is (R, D_in) and
``lora_B`` is (D_out, R), and PEFT adds ``scale · B·A·x`` to the module's output.

The modules an adapter adapts are decided as PEFT decides them: ``target_modules`` (a list of
name suffixes, a regular expression matched against the full name, or ``"all-linear"``),
narrowed by ``layers_to_transform``/``layers_pattern`` and ``exclude_modules``. Each module's
rank comes from its tensors and must agree with ``r`` or ``rank_pattern``; its scale is
``alpha / rank`` (``alpha / sqrt(rank)`` with rsLoRA), ``alpha`` from ``lora_alpha`` or
``alpha_pattern``.

Checks run before anything is written, and every problem is collected into one
:class:`~quiver.library.errors.InvalidExpertError` rather than stopping at the first.
"""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import re
import zipfile
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from .errors import InvalidExpertError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_WEIGHTS_FILE = "adapter_model.bin"

LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec/"

_PEFT_PREFIX = "base_model.model."
_KEY_PATTERN = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")
_ALL_LINEAR = "all-linear"

UNSUPPORTED_OPTIONS: dict[str, str] = {
    "use_dora": "DoRA rescales each base weight by a learned magnitude, so its output is not a low-rank update that can be routed",
    "lora_bias": "a trained bias on lora_B adds a constant to the output that no routing weight applies to",
    "modules_to_save": "fully trained copies of modules replace the base layers instead of adding a low-rank update",
    "trainable_token_indices": "trained embedding rows replace rows of the base model's embeddings",
    "alora_invocation_tokens": "activated LoRA applies its update only after its invocation tokens",
    "layer_replication": "replicated layers change the structure of the base model",
    "target_parameters": "LoRA on raw parameters (such as mixture-of-experts weights) is not a linear-layer update",
    "use_qalora": "QA-LoRA pools the input of quantized layers",
    "use_bdlora": "block-diagonal factors are stored in a layout Quiver does not read",
    "kasa_config": "KaSA inserts trained singular values between lora_A and lora_B and edits the base weight",
    "monteclora_config": "MonteCLoRA samples its update at random",
    "arrow_config": "this is a PEFT Arrow router config; upload its experts one by one instead",
}
"""PEFT LoRA options whose output Quiver cannot reproduce as a routed update, with the reason.

Each is rejected when set to anything but its default (false, empty or null).
"""

ModuleShapes = Mapping[str, tuple[int, int]]
"""Base-model module name to its (D_in, D_out), for every module an adapter may target."""

LINEAR_TYPES = (nn.Linear, Conv1D)
"""Layers an expert can adapt: ``nn.Linear`` and GPT-2's ``Conv1D`` (a linear layer with its weight stored transposed)."""


@dataclass(frozen=True)
class BaseModules:
    """The facts about a base model's modules that the adapter checks use."""

    shapes: dict[str, tuple[int, int]]
    """(D_in, D_out) of every linear layer (``nn.Linear`` or ``Conv1D``), by module name."""
    kinds: dict[str, str] = field(default_factory=dict)
    """Class name of every other named module, to explain why it cannot be adapted."""
    output_layer: str | None = None
    """The output embedding, which ``all-linear`` leaves out as PEFT does."""
    complete: bool = True
    """False when the modules were derived from an adapter's own weights rather than a model,
    so a target without weights cannot be distinguished from a target the model lacks."""

    @classmethod
    def of(cls, model: nn.Module) -> BaseModules:
        shapes = linear_module_shapes(model)
        kinds = {}
        for name, module in model.named_modules():
            if name and name not in shapes and not any(name.startswith(linear + ".") for linear in shapes):
                kinds[name] = type(module).__name__
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        output_layer = next((name for name, module in model.named_modules() if module is output), None) if output is not None else None
        return cls(shapes=shapes, kinds=kinds, output_layer=output_layer)

    @property
    def names(self) -> set[str]:
        return set(self.shapes) | set(self.kinds)


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
    weights_file: Path
    tensors: dict[str, torch.Tensor] = field(repr=False)
    """The weights as read, keyed as in the file."""

    @property
    def alpha(self) -> float:
        return float(self.config.get("lora_alpha", 8))

    @property
    def rank(self) -> int:
        """The largest rank of any module (equal to the config's ``r`` unless a rank pattern is set)."""
        return max(module.rank for module in self.modules.values())


def linear_module_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Return (D_in, D_out) of every linear layer (``nn.Linear`` or ``Conv1D``) in ``model``, by module name.

    A linear layer already wrapped for routing counts under the wrapper's name, so the shapes are
    the same before and after routing is installed.
    """
    shapes = {}
    for name, module in model.named_modules():
        if getattr(module, "wraps_linear", False):
            shapes[name] = (module.in_features, module.out_features)
        elif isinstance(module, nn.Linear):
            shapes[name] = (module.in_features, module.out_features)
        elif isinstance(module, Conv1D):
            shapes[name] = tuple(module.weight.shape)  # Conv1D stores (D_in, D_out)
        else:
            continue
        if name.rpartition(".")[0] in shapes:
            del shapes[name]  # the base layer inside a routing wrapper, already counted under the wrapper's name
    return shapes


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_adapter(expert: str, folder: str | Path, base: BaseModules | ModuleShapes) -> LoraAdapter:
    """Read the adapter in ``folder`` and check that it can adapt a model with modules ``base``.

    Raises:
        InvalidExpertError: listing every problem found, each naming the module and values.
    """
    folder = Path(folder)
    if not isinstance(base, BaseModules):
        base = BaseModules(shapes=dict(base), complete=False)
    problems: list[str] = []

    config = _read_config(folder / CONFIG_FILE, problems)
    weights_file = weights_path(folder)
    weights = _read_weights(weights_file, problems) if weights_file is not None else None
    if weights_file is None:
        problems.append(f"the weights are missing; a PEFT LoRA adapter folder has {CONFIG_FILE} and {WEIGHTS_FILE} (or {PICKLE_WEIGHTS_FILE})")
    if config is None or weights is None:
        raise InvalidExpertError(expert, problems)

    config_is_valid = _check_config(config, problems)
    if config.get("peft_type") not in (None, "LORA"):
        raise InvalidExpertError(expert, problems)  # the weights of another method are not LoRA factors
    targeted = _targeted_modules(config, base, problems) if config_is_valid else None
    factors = _pair_factors(weights, weights_file.name, problems, dora=bool(config.get("use_dora")))
    modules = {}
    for name, (lora_a, lora_b) in sorted(factors.items()):
        if not _check_module(name, lora_a, lora_b, base, targeted, problems) or targeted is None:
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
        problems.append(f"{weights_file.name} contains no lora_A/lora_B weights")
    if problems:
        raise InvalidExpertError(expert, group_module_problems(problems))

    return LoraAdapter(config=config, modules=modules, weights_file=weights_file, tensors=weights)


def weights_path(folder: Path) -> Path | None:
    """Return the adapter's weights file, preferring safetensors as PEFT does, or None."""
    for name in (WEIGHTS_FILE, PICKLE_WEIGHTS_FILE):
        if (folder / name).is_file():
            return folder / name
    return None


def _read_config(path: Path, problems: list[str]) -> dict | None:
    if not path.is_file():
        problems.append(f"{CONFIG_FILE} is missing; a PEFT LoRA adapter folder has {CONFIG_FILE} and {WEIGHTS_FILE}")
        return None
    raw = path.read_bytes()
    if raw.startswith(LFS_POINTER_PREFIX):
        problems.append(f"{CONFIG_FILE} is a Git LFS pointer, not the file itself; fetch the real file (git lfs pull) and upload again")
        return None
    try:
        config = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        problems.append(f"{CONFIG_FILE} is not valid JSON: {error}")
        return None
    if not isinstance(config, dict):
        problems.append(f"{CONFIG_FILE} must contain a JSON object, found {type(config).__name__}")
        return None
    return config


def _read_weights(path: Path, problems: list[str]) -> dict[str, torch.Tensor] | None:
    """Read safetensors or pickled weights, appending a problem and returning None if they are unreadable."""
    size = path.stat().st_size
    if size == 0:
        problems.append(f"{path.name} is empty (0 bytes); upload the adapter's weights file")
        return None
    with open(path, "rb") as stream:
        head = stream.read(len(LFS_POINTER_PREFIX))
    if head == LFS_POINTER_PREFIX:
        problems.append(
            f"{path.name} is a Git LFS pointer ({size} bytes), not the weights; fetch the real file (git lfs pull or hf download) and upload again"
        )
        return None

    if path.name == PICKLE_WEIGHTS_FILE:
        return load_pickled_tensors(path, problems)
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        problems.append(f"{path.name} is not a readable safetensors file ({error}); the file is truncated or corrupt, upload it again")
        return None


def load_pickled_tensors(path: Path, problems: list[str], *, top_level: type = dict) -> object | None:
    """Load a ``torch.save`` file with the restricted unpickler of ``torch.load(weights_only=True)``.

    That unpickler rebuilds only tensors and plain containers (dict, list, tuple, str, numbers)
    and refuses every other global, so a pickle that would run code is rejected, never executed.
    """
    if not zipfile.is_zipfile(path):
        problems.append(f"{path.name} is not a torch.save file (expected a zip archive); the file is truncated or corrupt")
        return None
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        refused = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        what = f"the object {refused[1]}" if refused else "an object that is not a tensor or a plain container"
        problems.append(f"{path.name} contains {what}; only tensors and plain containers are accepted, so it was not loaded")
        return None
    except Exception as error:  # torch raises RuntimeError, EOFError or zip errors for damaged files.
        problems.append(f"{path.name} cannot be read by torch.load ({type(error).__name__}: {error}); the file is truncated or corrupt")
        return None
    if not isinstance(loaded, top_level):
        problems.append(f"{path.name} holds a {type(loaded).__name__}; expected a {top_level.__name__}")
        return None
    if top_level is dict and path.name == PICKLE_WEIGHTS_FILE:
        not_tensors = sorted(str(key) for key, value in loaded.items() if not isinstance(key, str) or not isinstance(value, torch.Tensor))
        if not_tensors:
            problems.append(f"{path.name} maps {', '.join(not_tensors[:5])} to values that are not tensors; expected a dict of name to tensor")
            return None
    return loaded


def _check_config(config: dict, problems: list[str]) -> bool:
    """Check the config's own fields; return False when it is too broken to match modules against."""
    found = len(problems)
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        what = "missing" if peft_type is None else repr(peft_type)
        problems.append(f"peft_type is {what}; Quiver serves LoRA adapters only (peft_type 'LORA' in {CONFIG_FILE})")
    if "r" not in config:
        problems.append(f"{CONFIG_FILE} has no 'r' (the LoRA rank); PEFT writes it in every LoRA config")
    else:
        rank = config["r"]
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            problems.append(f"r is {rank!r}; expected a positive integer rank in {CONFIG_FILE}")
    alpha = config.get("lora_alpha", 8)
    if not _is_positive_number(alpha):
        problems.append(f"lora_alpha is {alpha!r}; expected a positive finite number")
    for pattern_field in ("alpha_pattern", "rank_pattern"):
        pattern = config.get(pattern_field) or {}
        if not isinstance(pattern, dict):
            problems.append(f"{pattern_field} is {pattern!r}; expected a JSON object of module pattern to number")
            continue
        for key, value in pattern.items():
            if not _is_positive_number(value) or (pattern_field == "rank_pattern" and not isinstance(value, int)):
                kind = "integer" if pattern_field == "rank_pattern" else "finite number"
                problems.append(f"{pattern_field}[{key!r}] is {value!r}; expected a positive {kind}")
            elif not _is_regex(key):
                problems.append(f"{pattern_field} key {key!r} is not a valid regular expression")

    if config.get("bias", "none") != "none":
        problems.append(f"bias is {config['bias']!r}; only bias 'none' is supported, since trained biases are not a routed update")
    for option, reason in UNSUPPORTED_OPTIONS.items():
        if config.get(option):
            problems.append(f"{option} is {config[option]!r}; Quiver does not serve this LoRA variant: {reason}")

    layers = config.get("layers_to_transform")
    if layers is not None and not (_is_index(layers) or (isinstance(layers, list) and all(_is_index(item) for item in layers))):
        problems.append(f"layers_to_transform is {layers!r}; expected a layer index or a list of layer indices")
    pattern = config.get("layers_pattern")
    if pattern is not None and not (isinstance(pattern, str) or (isinstance(pattern, list) and all(isinstance(item, str) for item in pattern))):
        problems.append(f"layers_pattern is {pattern!r}; expected a string or a list of strings")
    if isinstance(config.get("target_modules"), str):
        for option in ("layers_to_transform", "layers_pattern"):
            if config.get(option) not in (None, [], ""):
                problems.append(f"{option} is set but target_modules is a string; PEFT refuses this pair, so list the target modules instead")
    return len(problems) == found


def _is_positive_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _is_index(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_regex(pattern: str) -> bool:
    try:
        re.compile(pattern)
    except re.error:
        return False
    return True


def _targeted_modules(config: dict, base: BaseModules, problems: list[str]) -> set[str] | None:
    """Return the names of the modules PEFT would adapt with ``config``, or None if it cannot tell."""
    targets = config.get("target_modules")
    names = base.names
    if targets is None:
        problems.append(f"target_modules is missing from {CONFIG_FILE}; PEFT writes the adapted modules there")
        return None

    if isinstance(targets, str) and targets.lower() == _ALL_LINEAR:
        targeted = set(base.shapes) - {base.output_layer}
    elif isinstance(targets, str):
        if not _is_regex(targets):
            problems.append(f"target_modules {targets!r} is not a valid regular expression")
            return None
        targeted = {name for name in names if re.fullmatch(targets, name)}
        if not targeted and base.complete:
            problems.append(f"target_modules pattern {targets!r} matches no module of the base model (is the adapter for another base model?)")
    elif isinstance(targets, list) and all(isinstance(target, str) for target in targets):
        targeted = set()
        for target in targets:
            matches = {name for name in names if name == target or name.endswith("." + target)}
            if not matches and base.complete:
                problems.append(f"target module {target!r} not found in the base model (is the adapter for another base model?)")
            targeted |= matches
        # PEFT 0.21.2 applies layers_to_transform to suffix matches only, so a module named in full is adapted in any layer.
        targeted = {name for name in targeted if name in targets or _in_selected_layer(config, name)}
    else:
        problems.append(f"target_modules is {targets!r}; expected a list of module names, a regular expression or 'all-linear'")
        return None

    targeted -= _excluded_modules(config, names, problems)
    by_kind: dict[str, list[str]] = defaultdict(list)
    for name in sorted(targeted - set(base.shapes)):
        by_kind[base.kinds.get(name, "unknown module")].append(name)
    for kind, modules in sorted(by_kind.items()):
        shown = ", ".join(modules[:3]) + (f" and {len(modules) - 3} more" if len(modules) > 3 else "")
        problems.append(f"target_modules selects {kind} modules ({shown}); Quiver routes only nn.Linear and Conv1D layers")
    return targeted & set(base.shapes)


def _in_selected_layer(config: dict, name: str) -> bool:
    """Apply ``layers_to_transform`` and ``layers_pattern`` to a module matched by a name suffix in a target list, as PEFT does."""
    layers = config.get("layers_to_transform")
    if layers is None or layers == []:
        return True
    patterns = config.get("layers_pattern")
    if isinstance(patterns, str):
        patterns = [patterns]
    if not patterns:
        match = re.match(r".*?\.[^.]*\.(?P<index>\d+)\.", name)  # the first numbered segment
    else:
        match = next((found for pattern in patterns if (found := re.match(rf"(?:^|.*?\.){pattern}\.(?P<index>\d+)\.", name))), None)
    if match is None:
        return False
    index = int(match["index"])
    return index == layers if isinstance(layers, int) else index in layers


def _excluded_modules(config: dict, names: set[str], problems: list[str]) -> set[str]:
    excluded = config.get("exclude_modules")
    if not excluded:
        return set()
    if isinstance(excluded, str):
        if not _is_regex(excluded):
            problems.append(f"exclude_modules {excluded!r} is not a valid regular expression")
            return set()
        return {name for name in names if re.fullmatch(excluded, name)}
    if isinstance(excluded, list):
        return {name for name in names if any(name == item or name.endswith(f".{item}") for item in excluded)}
    problems.append(f"exclude_modules is {excluded!r}; expected a list of module names or a regular expression")
    return set()


def _pair_factors(
    weights: dict[str, torch.Tensor], file_name: str, problems: list[str], *, dora: bool = False
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    factors: dict[str, dict[str, torch.Tensor]] = {}
    adapter_names = set()
    unknown, tied = [], []
    for key, tensor in weights.items():
        match = _KEY_PATTERN.match(key.removeprefix(_PEFT_PREFIX))
        if match is None:
            if dora and "lora_magnitude_vector" in key:
                continue  # already reported through use_dora
            (tied if key.endswith(".base_layer.weight") else unknown).append(key)
            continue
        adapter_names.add(match["adapter"])
        pair = factors.setdefault(match["module"], {})
        if match["factor"] in pair:
            problems.append(f"[{match['module']}] lora_{match['factor']} appears twice, under more than one adapter name")
        pair[match["factor"]] = tensor
    if tied:
        problems.append(
            f"{file_name} contains the base weights of {_shown(tied)}: PEFT saves them when an adapter targets a layer "
            "tied to the embeddings (such as lm_head), and Quiver cannot serve a change to tied layers; leave those layers out of target_modules"
        )
    if unknown:
        problems.append(
            f"{file_name} has {len(unknown)} {'tensor that is not a LoRA factor' if len(unknown) == 1 else 'tensors that are not LoRA factors'} ({_shown(unknown)}); "
            "expected only '<module>.lora_A.weight' and '<module>.lora_B.weight', so remove them"
        )
    if len(adapter_names) > 1:
        shown = ", ".join(sorted(repr(name) if name else "none" for name in adapter_names))
        problems.append(f"{file_name} mixes adapter names ({shown}) in its keys; upload one adapter at a time")

    pairs = {}
    for module, pair in factors.items():
        missing = sorted({"A", "B"} - pair.keys())
        if missing:
            present = "B" if missing[0] == "A" else "A"
            problems.append(f"[{module}] lora_{present} has no matching lora_{missing[0]} weight; both factors are needed")
            continue
        pairs[module] = (pair["A"], pair["B"])
    return pairs


def _shown(items: list[str], limit: int = 3) -> str:
    shown = ", ".join(repr(item) for item in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def group_module_problems(problems: list[str]) -> list[str]:
    """Merge problems that differ only in their ``[module]`` prefix into one line naming the modules.

    An adapter for another model, or with a wrong dtype, fails the same way in every module; one
    line per kind of problem keeps the error readable on models with hundreds of modules.
    """
    by_text: dict[str, list[str]] = {}
    order: list[str] = []
    for problem in problems:
        match = re.match(r"^\[([^\]]+)\] (.*)$", problem, re.DOTALL)
        key = match[2] if match else problem
        if key not in by_text:
            by_text[key] = []
            order.append(key)
        if match:
            by_text[key].append(match[1])
    grouped = []
    for text in order:
        modules = by_text[text]
        if not modules:
            grouped.append(text)
        elif len(modules) == 1:
            grouped.append(f"[{modules[0]}] {text}")
        else:
            names = ", ".join(modules[:3]) + (f" and {len(modules) - 3} more" if len(modules) > 3 else "")
            grouped.append(f"[{len(modules)} modules: {names}] {text}")
    return grouped


def _check_module(
    name: str,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    base: BaseModules,
    targeted: set[str] | None,
    problems: list[str],
) -> bool:
    if name not in base.shapes:
        if name in base.kinds:
            problems.append(f"[{name}] is a {base.kinds[name]} in the base model; Quiver routes only nn.Linear and Conv1D layers")
        else:
            problems.append(f"[{name}] module not found in the base model (is the adapter for another base model?)")
        return False
    if targeted is not None and name not in targeted:
        problems.append(
            f"[{name}] has weights but the config's target_modules (with layers_to_transform and exclude_modules) does not select it; "
            "PEFT would ignore them, so fix target_modules or remove the weights"
        )
        return False
    d_in, d_out = base.shapes[name]
    if lora_a.ndim != 2 or lora_b.ndim != 2:
        problems.append(f"[{name}] lora_A and lora_B must be 2-D, got shapes {tuple(lora_a.shape)} and {tuple(lora_b.shape)}")
        return False

    found = len(problems)
    rank = lora_a.shape[0]
    if lora_b.shape[1] != rank:
        problems.append(f"[{name}] lora_A has rank {rank} but lora_B has rank {lora_b.shape[1]}; the two factors must share one rank")
    if lora_a.shape[1] != d_in:
        problems.append(f"[{name}] lora_A shape {tuple(lora_a.shape)} does not match the module's input size {d_in}: expected ({rank}, {d_in})")
    if lora_b.shape[0] != d_out:
        problems.append(f"[{name}] lora_B shape {tuple(lora_b.shape)} does not match the module's output size {d_out}: expected ({d_out}, {lora_b.shape[1]})")
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
