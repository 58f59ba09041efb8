"""Arrow prototypes: the direction in input space along which an expert's update acts most.

For one adapted module with factors A (R, D_in) and B (D_out, R), the prototype is the unit top
right-singular vector of B·A. It is computed exactly without forming the (D_out, D_in) product:

1. thin QR of Aᵀ = Q·R', so B·A = B·R'ᵀ·Qᵀ with Q (D_in, R) orthonormal;
2. SVD of the small matrix M = B·R'ᵀ (D_out, R) = U·S·Vᵀ;
3. B·A = U·S·(Q·V)ᵀ, so the prototype is Q times M's top right-singular vector.

Cost O((D_in + D_out)·R²) per module, in float32. The sign of a singular vector is arbitrary,
so routing uses ``|v·x|``. The stored sign is still fixed (largest entry positive), so that the
same adapter always gives the same file. Prototypes are stored per expert in ``arrow.safetensors``::

    <module>.prototype        float32 (D_in,)  unit vector
    <module>.singular_value   float32 (1,)     top singular value of B·A (without the LoRA scale)
    metadata: arrow_config (JSON), arrow_config_sha256
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .adapter import LoraModule
from .errors import LibraryFormatError

ARROW_FILE = "arrow.safetensors"

ARROW_CONFIG = {"method": "thin-qr-svd", "dtype": "float32", "format_version": 1}
"""Settings that change the stored prototypes; a stored file with another config is recomputed."""

ARROW_CONFIG_SHA256 = hashlib.sha256(json.dumps(ARROW_CONFIG, sort_keys=True).encode()).hexdigest()


def compute_prototype(lora_a: torch.Tensor, lora_b: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Return the unit top right-singular vector of ``lora_b @ lora_a`` and its singular value.

    Args:
        lora_a: (R, D_in) factor.
        lora_b: (D_out, R) factor.

    Returns:
        The prototype, float32 (D_in,), and the top singular value (0.0 for a zero update).
    """
    lora_a = lora_a.detach().to(torch.float32)
    lora_b = lora_b.detach().to(torch.float32)

    # 1. Thin QR of Aᵀ: q has orthonormal columns spanning A's row space.
    q, r = torch.linalg.qr(lora_a.T)  # (D_in, R'), (R', R) with R' = min(D_in, R)

    # 2. SVD of the small matrix, whose singular values are those of B·A.
    small = lora_b @ r.T  # (D_out, R')
    _, singular_values, vh = torch.linalg.svd(small, full_matrices=False)  # vh: (min(D_out, R'), R')

    # 3. Map the top right-singular vector back to input space.
    prototype = q @ vh[0]  # (D_in,)
    prototype = prototype / prototype.norm()
    if prototype[prototype.abs().argmax()] < 0:
        prototype = -prototype
    return prototype.contiguous(), float(singular_values[0])


def compute_prototypes(modules: Mapping[str, LoraModule]) -> dict[str, tuple[torch.Tensor, float]]:
    """Return the prototype and top singular value of every module, keyed by module name."""
    return {name: compute_prototype(module.lora_a, module.lora_b) for name, module in modules.items()}


def save_prototypes(path: Path, prototypes: Mapping[str, tuple[torch.Tensor, float]]) -> None:
    tensors = {}
    for name, (prototype, singular_value) in prototypes.items():
        tensors[f"{name}.prototype"] = prototype.to(torch.float32).contiguous()
        tensors[f"{name}.singular_value"] = torch.tensor([singular_value], dtype=torch.float32)
    metadata = {"arrow_config": json.dumps(ARROW_CONFIG, sort_keys=True), "arrow_config_sha256": ARROW_CONFIG_SHA256}
    save_file(tensors, str(path), metadata=metadata)


def load_prototypes(path: Path) -> dict[str, tuple[torch.Tensor, float]]:
    """Read prototypes stored by :func:`save_prototypes`.

    Raises:
        LibraryFormatError: the file is unreadable or was computed with another Arrow config.
    """
    try:
        with safe_open(str(path), framework="pt") as stored:
            config_hash = (stored.metadata() or {}).get("arrow_config_sha256")
            tensors = {key: stored.get_tensor(key) for key in stored.keys()}
    except Exception as error:  # safetensors raises several unrelated types for damaged files.
        raise LibraryFormatError(f"cannot read Arrow prototypes from {path}: {error}") from error
    if config_hash != ARROW_CONFIG_SHA256:
        raise LibraryFormatError(f"{path} was computed with another Arrow config ({config_hash}); recompute it")

    prototypes = {}
    for key, tensor in tensors.items():
        if key.endswith(".prototype"):
            name = key.removesuffix(".prototype")
            prototypes[name] = (tensor, float(tensors[f"{name}.singular_value"][0]))
    return prototypes
