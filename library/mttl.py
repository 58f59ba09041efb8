"""Import expert checkpoints of the MTTL research library as PEFT LoRA adapters.

An MTTL expert checkpoint is a ``torch.save`` file holding a dict::

    {
        "expert_info": {"expert_name": ..., "expert_task_name": ...,
                        "expert_config": {"lora_rank": R, "lora_alpha": alpha, ...}, ...},
        "expert_weights": {"<module>.lora_a": (D_in, R) tensor, "<module>.lora_b": (R, D_out) tensor, ...},
        ...
    }

MTTL computes ``x @ lora_a @ lora_b · (alpha / R)``, the same update as PEFT's
``scale · B·A·x`` with ``A = lora_aᵀ`` (R, D_in), ``B = lora_bᵀ`` (D_out, R) and
``scale = alpha / R``. The converted adapter therefore has ``r = R``, ``lora_alpha = alpha``
and one target per module named in the weights.

The file is read with ``torch.load(weights_only=True)``, a restricted unpickler that rebuilds
only tensors and plain containers; a checkpoint holding any other object is rejected without
running it.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from .adapter import CONFIG_FILE, LFS_POINTER_PREFIX, WEIGHTS_FILE, load_pickled_tensors
from .errors import InvalidExpertError

_KEY_PATTERN = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[ab])$")


@dataclass(frozen=True)
class MttlExpert:
    """An MTTL checkpoint converted to PEFT's layout."""

    config: dict
    tensors: dict[str, torch.Tensor]
    expert_name: str | None
    task: str | None


def read_mttl_checkpoint(path: str | os.PathLike[str], base_model: str | None = None) -> MttlExpert:
    """Read an MTTL expert checkpoint and convert it to a PEFT LoRA config and weights.

    Args:
        path: the checkpoint file written by ``torch.save``.
        base_model: recorded as the config's ``base_model_name_or_path`` when the checkpoint
            does not name its model.

    Raises:
        InvalidExpertError: every problem found, including objects the restricted unpickler refused.
    """
    path = Path(path)
    label = path.stem or "checkpoint"
    problems: list[str] = []
    if not path.is_file() or path.stat().st_size == 0:
        raise InvalidExpertError(label, [f"{path.name} is missing or empty; upload the MTTL checkpoint file"])
    with open(path, "rb") as stream:
        if stream.read(len(LFS_POINTER_PREFIX)) == LFS_POINTER_PREFIX:
            raise InvalidExpertError(label, [f"{path.name} is a Git LFS pointer, not the checkpoint; fetch the real file and upload again"])
    checkpoint = load_pickled_tensors(path, problems)
    if checkpoint is None:
        raise InvalidExpertError(label, problems)

    info = checkpoint.get("expert_info")
    weights = checkpoint.get("expert_weights")
    if not isinstance(info, dict):
        problems.append(f"expert_info is {type(info).__name__}; an MTTL checkpoint holds a dict under 'expert_info'")
        info = {}
    if not isinstance(weights, dict) or not weights:
        problems.append("expert_weights is missing or empty; an MTTL checkpoint holds '<module>.lora_a' and '<module>.lora_b' tensors under 'expert_weights'")
        weights = {}
    expert_config = info.get("expert_config") or {}
    if not isinstance(expert_config, dict):
        problems.append(f"expert_info.expert_config is {type(expert_config).__name__}; expected a dict with lora_rank and lora_alpha")
        expert_config = {}
    alpha = expert_config.get("lora_alpha")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not alpha > 0:
        problems.append(f"expert_info.expert_config.lora_alpha is {alpha!r}; expected a positive number")

    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        match = _KEY_PATTERN.match(str(key))
        if match is None or not isinstance(tensor, torch.Tensor):
            problems.append(f"expert_weights[{key!r}] is not a LoRA factor (expected '<module>.lora_a' or '<module>.lora_b' tensors)")
            continue
        factors.setdefault(match["module"], {})[match["factor"]] = tensor

    tensors: dict[str, torch.Tensor] = {}
    ranks = set()
    for module, pair in sorted(factors.items()):
        if pair.keys() != {"a", "b"}:
            missing = "lora_b" if "a" in pair else "lora_a"
            problems.append(f"[{module}] {missing} is missing; each module needs lora_a (D_in, R) and lora_b (R, D_out)")
            continue
        lora_a, lora_b = pair["a"], pair["b"]
        if lora_a.ndim != 2 or lora_b.ndim != 2 or lora_a.shape[1] != lora_b.shape[0]:
            problems.append(
                f"[{module}] lora_a {tuple(lora_a.shape)} and lora_b {tuple(lora_b.shape)} do not chain: expected (D_in, R) and (R, D_out)"
            )
            continue
        ranks.add(lora_a.shape[1])
        prefix = f"base_model.model.{module}"
        tensors[f"{prefix}.lora_A.weight"] = lora_a.T.contiguous()  # (R, D_in)
        tensors[f"{prefix}.lora_B.weight"] = lora_b.T.contiguous()  # (D_out, R)
    if len(ranks) > 1:
        problems.append(f"the modules have different ranks {sorted(ranks)}; Quiver imports MTTL experts with one rank")
    declared = expert_config.get("lora_rank")
    if ranks and declared is not None and declared not in ranks:
        problems.append(f"expert_info.expert_config.lora_rank is {declared!r} but the weights have rank {min(ranks)}")
    if problems:
        raise InvalidExpertError(label, problems)

    rank = ranks.pop()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": info.get("expert_model") or info.get("model") or base_model,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": sorted({name.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for name in tensors}),
        "fan_in_fan_out": False,
        "use_rslora": False,
    }
    task = info.get("expert_task_name")
    name = info.get("expert_name")
    return MttlExpert(config=config, tensors=tensors, expert_name=name if isinstance(name, str) else None, task=task if isinstance(task, str) else None)


def convert_mttl_checkpoint(path: str | os.PathLike[str], folder: str | os.PathLike[str], base_model: str | None = None) -> MttlExpert:
    """Write the MTTL checkpoint at ``path`` as a PEFT LoRA adapter folder ``folder``."""
    expert = read_mttl_checkpoint(path, base_model)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(json.dumps(expert.config, indent=2) + "\n", encoding="utf-8")
    save_file(expert.tensors, str(folder / WEIGHTS_FILE))
    return expert
