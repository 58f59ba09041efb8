"""Quiver's library: LoRA experts stored in PEFT's format, Arrow prototypes and routed layers.

Typical use::

    from quiver.library import ArrowRouter, ExpertLibrary, RoutingSettings, load_base_model

    model, tokenizer = load_base_model()                 # embedded SmolLM2-135M-Instruct
    library = ExpertLibrary("my-library", model)
    library.add("reverse", "path/to/peft-adapter", task="reverse the words")
    router = ArrowRouter(model)
    router.load_experts([library.load(name) for name in library.names()], library.revision)
    with router.routing(RoutingSettings(top_k=2)):
        output = model.generate(**tokenizer("Reverse the words: a b c\\nAnswer:", return_tensors="pt"))
"""

from .adapter import LoraAdapter, LoraModule, linear_module_shapes, read_adapter
from .arrow import compute_prototype, compute_prototypes
from .base_model import DEFAULT_MODEL_NAME, default_cache_dir, load_base_model
from .errors import (
    BaseModelError,
    ExpertExistsError,
    ExpertNotFoundError,
    InvalidExpertError,
    InvalidExpertNameError,
    LibraryFormatError,
    QuiverError,
)
from .routing import ArrowRouter, InvalidRoutingError, RoutedLinear, RoutingRecorder, RoutingSettings, RowRecorder
from .store import ExpertInfo, ExpertLibrary, LoadedExpert, check_expert_name

__all__ = [
    "ArrowRouter",
    "BaseModelError",
    "DEFAULT_MODEL_NAME",
    "ExpertExistsError",
    "ExpertInfo",
    "ExpertLibrary",
    "ExpertNotFoundError",
    "InvalidExpertError",
    "InvalidExpertNameError",
    "InvalidRoutingError",
    "LibraryFormatError",
    "LoadedExpert",
    "LoraAdapter",
    "LoraModule",
    "QuiverError",
    "RoutedLinear",
    "RoutingRecorder",
    "RoutingSettings",
    "RowRecorder",
    "check_expert_name",
    "compute_prototype",
    "compute_prototypes",
    "default_cache_dir",
    "linear_module_shapes",
    "load_base_model",
    "read_adapter",
]
