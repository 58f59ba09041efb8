"""Statistics of the base model that routing variants use: the mean input of every linear module.

Plain Arrow scores ``|v·x|`` contain a part that does not depend on the token: the projection
of the module's mean input μ onto each prototype. An expert whose prototype leans towards μ then
wins for every token. Centred scores ``|v·(x − μ)|`` remove that part. μ is the mean of the
module's inputs over a reference text shipped with Quiver (``data/reference.txt``: about 40 short
English passages of mixed genres, questions and code), computed once per base model.

The means are stored in the library as ``base_stats.safetensors``, with a fingerprint of the base
model and the reference text in the header. A different fingerprint means a recomputation.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .adapter import linear_module_shapes

logger = logging.getLogger(__name__)

STATS_FILE = "base_stats.safetensors"


def reference_texts() -> list[str]:
    """Return the reference passages shipped with Quiver, one per non-empty line."""
    text = resources.files("quiver.library").joinpath("data/reference.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]


def model_fingerprint(model: nn.Module, texts: Sequence[str]) -> str:
    """Return a hash of the base model (id, module shapes, a checksum of every weight) and the texts."""
    checksums = [round(float(parameter.detach().double().sum()), 4) for parameter in model.parameters()]
    description = {
        "model": str(getattr(getattr(model, "config", None), "name_or_path", "")),
        "shapes": sorted(linear_module_shapes(model).items()),
        "checksums": checksums,
        "texts": hashlib.sha256("\n".join(texts).encode()).hexdigest(),
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


def _linear_inputs(model: nn.Module) -> dict[str, nn.Module]:
    """Map each linear module name to the module whose input is that module's input."""
    targets = {}
    for name in linear_module_shapes(model):
        module = model.get_submodule(name)
        targets[name] = module.base if getattr(module, "wraps_linear", False) else module
    return targets


@torch.no_grad()
def compute_input_means(model: nn.Module, tokenizer, texts: Sequence[str], batch_size: int = 8) -> dict[str, torch.Tensor]:
    """Return the mean input (D_in,) float32 of every linear module over the tokens of ``texts``.

    Padding positions are left out of the means. The caller must make sure no expert is active
    (a routed model with an empty scope), so the means are the base model's own.
    """
    sums: dict[str, torch.Tensor] = {}
    count = 0
    mask = None  # (N,) of the batch running now, read by the hooks
    handles = []
    for name, module in _linear_inputs(model).items():
        def accumulate(_module, inputs, name=name):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()  # (N, D_in)
            sums[name] = sums.get(name, 0) + (x * mask[:, None]).sum(dim=0)

        handles.append(module.register_forward_pre_hook(accumulate))
    try:
        device = next(model.parameters()).device
        for start in range(0, len(texts), batch_size):
            encoded = tokenizer(list(texts[start : start + batch_size]), return_tensors="pt", padding=True).to(device)
            mask = encoded["attention_mask"].reshape(-1).float()  # (N,)
            count += int(mask.sum())
            model(**encoded)
    finally:
        for handle in handles:
            handle.remove()
    return {name: (total / count).cpu() for name, total in sums.items()}


def load_or_compute_input_means(library_root: Path, model: nn.Module, tokenizer) -> dict[str, torch.Tensor]:
    """Return the stored input means of ``model``, computing and storing them when missing or stale."""
    texts = reference_texts()
    fingerprint = model_fingerprint(model, texts)
    path = Path(library_root) / STATS_FILE
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as stored:
                if (stored.metadata() or {}).get("fingerprint") == fingerprint:
                    return {key.removesuffix(".input_mean"): stored.get_tensor(key) for key in stored.keys()}
        except Exception as error:  # safetensors raises several unrelated types for damaged files.
            logger.warning("recomputing base model statistics: cannot read %s: %s", path, error)
        logger.info("base model changed since %s was computed; recomputing it", path)

    means = compute_input_means(model, tokenizer, texts)
    temporary = path.with_name(f".{path.name}.tmp")
    save_file({f"{name}.input_mean": mean.contiguous() for name, mean in means.items()}, str(temporary), metadata={"fingerprint": fingerprint})
    temporary.replace(path)
    logger.info("computed the mean input of %d modules over %d reference texts", len(means), len(texts))
    return means
