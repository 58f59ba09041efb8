"""Measure the speed and memory of Quiver's Arrow routing against the base model and PEFT's Arrow.

Builds random rank-8 LoRA experts on every linear module of the embedded model's decoder layers
(q, k, v, o, gate, up and down projections, not the output layer), then measures:

1. prototype computation for one expert: Quiver's ``compute_prototype`` (thin QR and a small SVD),
   a dense SVD of B·A, and PEFT's 15-step power iteration;
2. a routed forward pass of a 256-token prompt and of one decode step of 16 sequences, with
   Quiver and PEFT's Arrow side by side, for each library size, relative to the base model alone;
3. the memory that Quiver's routed layers hold for the experts, against the adapter files.

It prints the tables and rewrites its section of ``docs/benchmarks.md``. Run it from the repository root::

    .venv/bin/python bench/routing_speed.py                  # 1, 8, 64 and 256 experts
    .venv/bin/python bench/routing_speed.py --quick          # smoke run: 1 and 8 experts
    .venv/bin/python bench/routing_speed.py --device cuda --dtype bfloat16

The adapter folders that PEFT loads are written to a temporary folder (about 10 MB per expert)
and deleted at the end.
"""

from __future__ import annotations

import argparse
import copy
import gc
import hashlib
import math
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import peft
import torch
import transformers
from peft import ArrowConfig, LoraConfig, create_arrow_model
from peft.tuners.lora.arrow import ArrowLoraLinearLayer
from safetensors.torch import load_file, save_file
from torch import nn

from report_file import available_cores, cpu_model, exact_command, write_section

from quiver.library import (
    DEFAULT_MODEL_NAME,
    ArrowRouter,
    ExpertInfo,
    LoadedExpert,
    LoraModule,
    RoutingSettings,
    compute_prototype,
    linear_module_shapes,
    load_base_model,
)

REPOSITORY = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = REPOSITORY / "docs" / "benchmarks.md"

RANK = 8
ALPHA = 16.0
TOP_K = 4
SEED = 0
POWER_ITERATIONS = 15
"""The step count of PEFT 0.21.2's ``top_right_singular_vec_from_BA`` (its default)."""

PROMPT_LENGTH = 256
DECODE_BATCH = 16
DECODE_CACHE_LENGTH = 32

WARMUP_CALLS = 2
"""Untimed calls per model before each measurement. PEFT builds its prototypes in the first one."""

PEFT_TIME_BUDGET_S = 40.0
"""Timed PEFT calls per library size and workload stop once their estimated total passes this,
but never below MIN_PEFT_REPEATS, so its slowest cases do not dominate the run time."""
MIN_PEFT_REPEATS = 3

PEFT_LOADED_ADAPTERS = 8
"""Adapters that PEFT's ``create_arrow_model`` loads itself. Larger libraries get the rest from
:func:`insert_peft_experts`, because PEFT's loading time grows faster than the adapter count."""

TARGET_PROTOTYPE_SPEEDUP = 100.0
TARGET_PROTOTYPE_COSINE = 0.9999
TARGET_OVERHEAD = {64: 1.35, 256: 1.5}
"""Largest accepted routed-forward time relative to the base model, by library size."""
TARGET_PEFT_SPEEDUP = {"prompt": {64: 8.0, 256: 40.0}, "decode": {64: 3.0, 256: 12.0}}
"""Smallest accepted PEFT Arrow time relative to Quiver, by workload and library size."""


# --------------------------------------------------------------------------------------------
# Machine and run description


def quiver_revision() -> str:
    """Return the checked-out commit and whether library/routing.py differs from it."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPOSITORY), "log", "-1", "--format=%h %s"], capture_output=True, text=True, check=True
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "-C", str(REPOSITORY), "status", "--porcelain", "--", "library/routing.py"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (git is not available)"
    return head + (" (library/routing.py has uncommitted changes)" if changed else "")


@dataclass
class Machine:
    cpu: str
    cores: int
    threads: int
    device: str
    dtype: str
    accelerator: str | None
    date: str
    command: str
    revision: str
    versions: dict[str, str]


def describe_machine(device: torch.device, dtype: torch.dtype, threads: int) -> Machine:
    accelerator = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return Machine(
        cpu=cpu_model(),
        cores=available_cores(),
        threads=threads,
        device=str(device),
        dtype=str(dtype).removeprefix("torch."),
        accelerator=accelerator,
        date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        command=exact_command(),
        revision=quiver_revision(),
        versions={
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
        },
    )


# --------------------------------------------------------------------------------------------
# Experts


def decoder_linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Return (D_in, D_out) of every linear module inside the decoder layers, leaving out the output layer."""
    return {name: shape for name, shape in linear_module_shapes(model).items() if ".layers." in name}


@dataclass
class ExpertSet:
    """Random experts, both in memory for Quiver and as PEFT adapter folders."""

    experts: list[LoadedExpert]
    folders: list[Path]
    file_bytes: list[int]
    """Size of each expert's adapter_model.safetensors."""
    prototype_bytes: int
    """Size of one expert's prototypes as Quiver stores them: float32, D_in values per module."""


def random_factors(shapes: dict[str, tuple[int, int]], generator: torch.Generator) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Draw A (R, D_in) and B (D_out, R) for every module, so that ‖B·A·x‖ ≈ 0.01·sqrt(D_out / D_in)·‖x‖ for a random x."""
    factors = {}
    for name, (d_in, d_out) in shapes.items():
        lora_a = torch.randn(RANK, d_in, generator=generator) / math.sqrt(d_in)
        lora_b = torch.randn(d_out, RANK, generator=generator) * (0.01 / math.sqrt(RANK))
        factors[name] = (lora_a, lora_b)
    return factors


def write_adapter(folder: Path, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], config: LoraConfig) -> Path:
    """Save ``factors`` as a PEFT LoRA adapter folder and return the weights file."""
    config.save_pretrained(str(folder))
    tensors = {}
    for name, (lora_a, lora_b) in factors.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = lora_a.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = lora_b.contiguous()
    weights = folder / "adapter_model.safetensors"
    save_file(tensors, str(weights))
    return weights


def build_experts(model: nn.Module, count: int, root: Path) -> ExpertSet:
    """Create ``count`` random experts on every decoder linear module, with adapter folders under ``root``."""
    shapes = decoder_linear_shapes(model)
    kinds = sorted({name.rpartition(".")[2] for name in shapes})
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=kinds, task_type="CAUSAL_LM", base_model_name_or_path=DEFAULT_MODEL_NAME)
    scale = ALPHA / RANK
    created = datetime.now(timezone.utc).isoformat()

    experts, folders, file_bytes = [], [], []
    for index in range(count):
        generator = torch.Generator().manual_seed(SEED + index)
        factors = random_factors(shapes, generator)
        name = f"expert-{index:03d}"
        folder = root / name
        weights = write_adapter(folder, factors, config)
        info = ExpertInfo(
            name=name,
            base_model=DEFAULT_MODEL_NAME,
            rank=RANK,
            alpha=ALPHA,
            target_modules=kinds,
            module_count=len(shapes),
            weights_sha256=hashlib.sha256(weights.read_bytes()).hexdigest(),
            created=created,
        )
        modules = {module: LoraModule(module, lora_a, lora_b, scale) for module, (lora_a, lora_b) in factors.items()}
        prototypes = {module: compute_prototype(lora_a, lora_b)[0] for module, (lora_a, lora_b) in factors.items()}
        experts.append(LoadedExpert(info=info, modules=modules, prototypes=prototypes))
        folders.append(folder)
        file_bytes.append(weights.stat().st_size)

    prototype_bytes = sum(d_in for d_in, _ in shapes.values()) * 4
    return ExpertSet(experts, folders, file_bytes, prototype_bytes)


# --------------------------------------------------------------------------------------------
# 1. Prototype computation


@dataclass
class PrototypeResult:
    modules: int
    repeats: dict[str, int]
    seconds: dict[str, float]
    """Median total time over all modules, by method."""
    min_cosine: dict[str, float]
    """Smallest |cos| between a method's prototype and the dense SVD's, over all modules."""


def dense_svd_prototype(lora_a: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
    """Return the top right-singular vector of the dense product B·A (D_out, D_in)."""
    _, _, vh = torch.linalg.svd(lora_b @ lora_a, full_matrices=False)
    return vh[0]


def peft_power_iteration() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Return PEFT's own ``top_right_singular_vec_from_BA``, bound to a standalone Arrow layer with a fixed seed."""
    config = ArrowConfig(top_k=1, rng_seed=SEED)
    config.task_adapter_names = []  # create_arrow_model fills it in, and the layer's constructor only copies it.
    layer = ArrowLoraLinearLayer(in_features=1, arrow_config=config)
    return lambda lora_a, lora_b: layer.top_right_singular_vec_from_BA(lora_a, lora_b, iters=POWER_ITERATIONS)


def time_prototypes(expert: LoadedExpert, quick: bool) -> PrototypeResult:
    """Time the three prototype methods over every module of ``expert``, on the CPU in float32."""
    factors = [(module.lora_a.float(), module.lora_b.float()) for module in expert.modules.values()]
    methods: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
        "quiver": lambda a, b: compute_prototype(a, b)[0],
        "dense_svd": dense_svd_prototype,
        "peft_power_iteration": peft_power_iteration(),
    }
    repeats = {"quiver": 3 if quick else 7, "dense_svd": 1 if quick else 3, "peft_power_iteration": 3 if quick else 7}

    seconds, vectors = {}, {}
    with torch.inference_mode():
        for method, compute in methods.items():
            compute(*factors[0])  # warm-up
            totals = []
            for _ in range(repeats[method]):
                start = time.perf_counter()
                results = [compute(a, b) for a, b in factors]
                totals.append(time.perf_counter() - start)
            seconds[method] = statistics.median(totals)
            vectors[method] = results

    min_cosine = {}
    for method in ("quiver", "peft_power_iteration"):
        cosines = [
            abs(float(torch.dot(v, reference) / (v.norm() * reference.norm())))
            for v, reference in zip(vectors[method], vectors["dense_svd"])
        ]
        min_cosine[method] = min(cosines)
    return PrototypeResult(len(factors), repeats, seconds, min_cosine)


# --------------------------------------------------------------------------------------------
# 2. Routed forward passes


@dataclass
class Workload:
    name: str
    description: str
    make_inputs: Callable[[], dict]
    """Return fresh keyword arguments for one forward call, outside the timed region."""


def make_workloads(base_model: nn.Module, vocab_size: int, device: torch.device) -> list[Workload]:
    """Build the prompt and decode-step inputs, with the decode step's KV cache prefilled by the base model."""
    generator = torch.Generator().manual_seed(SEED)
    prompt = torch.randint(0, vocab_size, (1, PROMPT_LENGTH), generator=generator).to(device)
    prefill = torch.randint(0, vocab_size, (DECODE_BATCH, DECODE_CACHE_LENGTH), generator=generator).to(device)
    step = torch.randint(0, vocab_size, (DECODE_BATCH, 1), generator=generator).to(device)
    with torch.inference_mode():
        cache = base_model(input_ids=prefill, use_cache=True).cache

    return [
        Workload(
            "prompt",
            f"1 sequence of {PROMPT_LENGTH} tokens, no KV cache",
            lambda: {"input_ids": prompt, "use_cache": False},
        ),
        Workload(
            "decode",
            f"{DECODE_BATCH} sequences, 1 new token each, on a {DECODE_CACHE_LENGTH}-token KV cache",
            # The cache grows in every call, so each call gets its own copy of the prefilled one.
            lambda: {"input_ids": step, "cache": copy.deepcopy(cache), "use_cache": True},
        ),
    ]


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_call(contender_model: nn.Module, inputs: dict, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    contender_model(**inputs)
    synchronize(device)
    return time.perf_counter() - start


@dataclass
class ForwardResult:
    experts: int
    workload: str
    top_k_quiver: int
    top_k_peft: int
    seconds: dict[str, float]
    """Median time of one forward call, by model: base, quiver, peft."""
    repeats: dict[str, int]
    peft_first_call: float
    """PEFT's first call on this workload. On the first workload of a library, it also builds PEFT's prototypes."""

    @property
    def quiver_over_base(self) -> float:
        return self.seconds["quiver"] / self.seconds["base"]

    @property
    def peft_over_base(self) -> float:
        return self.seconds["peft"] / self.seconds["base"]

    @property
    def peft_over_quiver(self) -> float:
        return self.seconds["peft"] / self.seconds["quiver"]


def repeats_for(experts: int, quick: bool) -> int:
    """Return the timed calls per model for a library size: fewer for large libraries and smoke runs."""
    if quick:
        return 3
    return 5 if experts >= 256 else 9


def measure_workload(
    workload: Workload,
    models: dict[str, nn.Module],
    experts: int,
    top_k: tuple[int, int],
    device: torch.device,
    quick: bool,
) -> ForwardResult:
    """Time one workload on the base, Quiver and PEFT models, interleaving the calls round by round."""
    warm_calls: dict[str, list[float]] = {name: [] for name in models}
    for name, model in models.items():
        for _ in range(WARMUP_CALLS):
            warm_calls[name].append(timed_call(model, workload.make_inputs(), device))

    repeats = repeats_for(experts, quick)
    target_repeats = {name: repeats for name in models}
    target_repeats["peft"] = max(MIN_PEFT_REPEATS, min(repeats, int(PEFT_TIME_BUDGET_S / warm_calls["peft"][-1])))
    samples: dict[str, list[float]] = {name: [] for name in models}
    while any(len(samples[name]) < target_repeats[name] for name in models):
        for name, model in models.items():
            if len(samples[name]) < target_repeats[name]:
                samples[name].append(timed_call(model, workload.make_inputs(), device))

    return ForwardResult(
        experts=experts,
        workload=workload.name,
        top_k_quiver=top_k[0],
        top_k_peft=top_k[1],
        seconds={name: statistics.median(values) for name, values in samples.items()},
        repeats={name: len(values) for name, values in samples.items()},
        peft_first_call=warm_calls["peft"][0],
    )


class RoutedModel(nn.Module):
    """A wrapper that calls Quiver's routed model inside ``router.routing(settings)``, so it is timed like the others."""

    def __init__(self, model: nn.Module, router: ArrowRouter, settings: RoutingSettings) -> None:
        super().__init__()
        self.model = model
        self.router = router
        self.settings = settings

    def forward(self, **inputs):
        with self.router.routing(self.settings):
            return self.model(**inputs)


def load_peft_arrow(folders: list[Path], top_k: int, device: torch.device, dtype: torch.dtype, loaded: int) -> nn.Module:
    """Load a fresh base model and wrap it with PEFT's Arrow over ``folders``.

    ``create_arrow_model`` loads the first ``loaded`` folders and :func:`insert_peft_experts`
    places the rest in its layers.
    """
    model, _ = load_base_model(device=device, dtype=dtype)
    config = ArrowConfig(top_k=top_k, router_temperature=1.0, rng_seed=SEED)
    # Keep the adapters in the base model's dtype, as Quiver does, rather than upcasting them to float32.
    arrow_model = create_arrow_model(model, [str(folder) for folder in folders[:loaded]], config, autocast_adapter_dtype=False)
    insert_peft_experts(arrow_model, folders[loaded:], first_index=loaded)
    arrow_model.eval()
    return arrow_model


def insert_peft_experts(arrow_model: nn.Module, folders: list[Path], first_index: int) -> None:
    """Add the adapters in ``folders`` to a PEFT Arrow model by placing their factors in its LoRA layers.

    PEFT's ``load_adapter`` walks every module of the model, whose module dicts grow with each
    adapter, so each load is slower than the one before. With peft 0.21.2 on a 2-core AMD EPYC,
    8 adapters of this model took 5 s and 32 took 37 s. A quadratic fit of those two points
    estimates about 25 minutes for 256. This function places the same ``nn.Linear`` factors, rank, alpha
    and scale under the names ``create_arrow_model`` gives (``task_<i>``) and then calls the Arrow
    layers' own ``on_adapter_change``, as PEFT does after adding an adapter. Only what the Arrow
    forward pass reads is set; :func:`check_peft_insertion` compares the logits with a model that
    PEFT loaded itself.
    """
    if not folders:
        return
    layers = {name: module for name, module in arrow_model.named_modules() if hasattr(module, "lora_arrow")}
    for offset, folder in enumerate(folders):
        adapter = f"task_{first_index + offset}"
        tensors = load_file(str(folder / "adapter_model.safetensors"))
        for name, layer in layers.items():
            reference = next(key for key in layer.lora_A if key.startswith("task_"))
            options = {"device": layer.lora_A[reference].weight.device, "dtype": layer.lora_A[reference].weight.dtype}
            for factor, (d_in, d_out) in (("lora_A", (layer.in_features, layer.r[reference])), ("lora_B", (layer.r[reference], layer.out_features))):
                linear = nn.Linear(d_in, d_out, bias=False, device="meta")
                linear.weight = nn.Parameter(tensors[f"{name}.{factor}.weight"].to(**options), requires_grad=False)
                getattr(layer, factor)[adapter] = linear
            layer.r[adapter] = layer.r[reference]
            layer.lora_alpha[adapter] = layer.lora_alpha[reference]
            layer.scaling[adapter] = layer.scaling[reference]
            layer.lora_dropout[adapter] = nn.Identity()
    for layer in layers.values():
        for arrow_layer in layer.lora_arrow.values():
            arrow_layer.on_adapter_change(layer.lora_A, layer.lora_B)


def check_peft_insertion(folders: list[Path], device: torch.device, dtype: torch.dtype, vocab_size: int) -> float:
    """Return the largest absolute logit difference between PEFT loading all ``folders`` and loading one plus inserting the rest."""
    top_k = min(TOP_K, len(folders))
    prompt = torch.randint(0, vocab_size, (1, 16), generator=torch.Generator().manual_seed(SEED + 1)).to(device)
    with torch.inference_mode():
        loaded = load_peft_arrow(folders, top_k, device, dtype, loaded=len(folders))
        expected = loaded(input_ids=prompt).logits.float()
        del loaded
        inserted = load_peft_arrow(folders, top_k, device, dtype, loaded=1)
        actual = inserted(input_ids=prompt).logits.float()
        del inserted
    gc.collect()
    return float((actual - expected).abs().max())


# --------------------------------------------------------------------------------------------
# 3. Memory


def iter_tensors(value: object) -> Iterator[torch.Tensor]:
    """Yield the tensors in ``value``, looking inside lists, tuples and dicts but not modules."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from iter_tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from iter_tensors(item)


def routed_state_bytes(router: ArrowRouter) -> int:
    """Return the bytes of every tensor the routed layers hold, except their base layers' own tensors.

    Parameters, buffers and plain tensor attributes count alike, whatever their names, and a
    storage shared by several tensors (views) counts once.
    """
    seen: set[int] = set()
    total = 0
    for layer in router.layers.values():
        base = layer.base
        base_storages = {tensor.untyped_storage().data_ptr() for tensor in [*base.parameters(), *base.buffers()]}
        candidates = [
            *(tensor for _, tensor in layer.named_parameters()),
            *(tensor for _, tensor in layer.named_buffers()),
            *(tensor for key, value in vars(layer).items() if not key.startswith("_modules") for tensor in iter_tensors(value)),
        ]
        for tensor in candidates:
            storage = tensor.untyped_storage()
            pointer = storage.data_ptr()
            if pointer in base_storages or pointer in seen or storage.nbytes() == 0:
                continue
            seen.add(pointer)
            total += storage.nbytes()
    return total


@dataclass
class MemoryResult:
    experts: int
    routed_state: int
    """Bytes of all non-base tensors in the routed layers."""
    fixed_state: int = 0
    """Bytes the routed layers keep with no experts loaded, such as the per-module input means."""
    file_bytes: int = 0
    prototype_bytes: int = 0

    @property
    def expert_state(self) -> int:
        return self.routed_state - self.fixed_state

    @property
    def allowed(self) -> int:
        return self.file_bytes + self.prototype_bytes


# --------------------------------------------------------------------------------------------
# Profile


def profile_call(model: nn.Module, inputs: dict, device: torch.device, rows: int = 12) -> tuple[float, list[tuple[str, float, int]]]:
    """Profile one call with torch.profiler. Return its wall time and the top operators by self time (name, ms, calls)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as profiler:
        elapsed = timed_call(model, inputs, device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = sorted(profiler.key_averages(), key=lambda event: getattr(event, key), reverse=True)
    return elapsed, [(event.key, getattr(event, key) / 1000, event.count) for event in events[:rows]]


# --------------------------------------------------------------------------------------------
# Targets and report


@dataclass
class Check:
    target: str
    measured: str
    met: bool | None
    """None when the case was not measured in this run."""

    @property
    def verdict(self) -> str:
        return {True: "met", False: "not met", None: "not measured"}[self.met]


def check_targets(prototypes: PrototypeResult, forwards: list[ForwardResult], memory: list[MemoryResult]) -> list[Check]:
    checks = []
    speedup = prototypes.seconds["dense_svd"] / prototypes.seconds["quiver"]
    cosine = prototypes.min_cosine["quiver"]
    checks.append(
        Check(
            f"prototypes ≥ {TARGET_PROTOTYPE_SPEEDUP:g}× faster than dense SVD, min |cos| ≥ {TARGET_PROTOTYPE_COSINE}",
            f"{speedup:.0f}×, min |cos| {cosine:.6f}",
            speedup >= TARGET_PROTOTYPE_SPEEDUP and cosine >= TARGET_PROTOTYPE_COSINE,
        )
    )

    by_case = {(result.workload, result.experts): result for result in forwards}
    for workload in ("prompt", "decode"):
        for experts, limit in TARGET_OVERHEAD.items():
            result = by_case.get((workload, experts))
            checks.append(
                Check(
                    f"{workload}, {experts} experts: Quiver ≤ {limit:g}× base",
                    f"{result.quiver_over_base:.2f}×" if result else "–",
                    result.quiver_over_base <= limit if result else None,
                )
            )
    for workload, limits in TARGET_PEFT_SPEEDUP.items():
        for experts, limit in limits.items():
            result = by_case.get((workload, experts))
            checks.append(
                Check(
                    f"{workload}, {experts} experts: Quiver ≥ {limit:g}× faster than PEFT Arrow",
                    f"{result.peft_over_quiver:.1f}×" if result else "–",
                    result.peft_over_quiver >= limit if result else None,
                )
            )
    for entry in memory:
        checks.append(
            Check(
                f"{count_experts(entry.experts)}: stacked experts ≤ adapter files + prototypes",
                f"{megabytes(entry.expert_state)} vs {megabytes(entry.allowed)}",
                entry.expert_state <= entry.allowed,
            )
        )
    return checks


def count_experts(count: int) -> str:
    return f"{count} expert" if count == 1 else f"{count} experts"


def megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def milliseconds(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def markdown_table(header: list[str], rows: list[list[str]], align: str) -> list[str]:
    """Return a Markdown table with ``align`` giving one letter per column, l or r."""
    separator = ["---:" if letter == "r" else "---" for letter in align]
    escaped = [[cell.replace("|", "\\|") for cell in line] for line in [header, *rows]]
    return ["| " + " | ".join(line) + " |" for line in [escaped[0], separator, *escaped[1:]]]


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    lines = [header, ["-" * width for width in widths], *rows]
    return "\n".join("  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in lines)


@dataclass
class Report:
    machine: Machine
    module_count: int
    prototypes: PrototypeResult
    forwards: list[ForwardResult]
    memory: list[MemoryResult]
    peft_insertion_difference: float | None
    """Largest logit difference between PEFT loading its adapters and :func:`insert_peft_experts`, or None if unused."""
    workloads: list[Workload]
    checks: list[Check]
    profiles: list[tuple[str, float, list[tuple[str, float, int]]]]
    runtime_seconds: float = 0.0


def prototype_rows(report: Report) -> tuple[list[str], list[list[str]]]:
    result = report.prototypes
    labels = {
        "quiver": "Quiver compute_prototype (thin QR + small SVD)",
        "dense_svd": "torch.linalg.svd of the dense B·A",
        "peft_power_iteration": f"PEFT power iteration ({POWER_ITERATIONS} steps)",
    }
    header = ["method", "total ms", "per module ms", "vs Quiver", "min |cos| vs dense SVD", "runs"]
    rows = []
    for method, label in labels.items():
        seconds = result.seconds[method]
        cosine = "1 (reference)" if method == "dense_svd" else f"{result.min_cosine[method]:.6f}"
        rows.append(
            [
                label,
                milliseconds(seconds),
                f"{seconds * 1000 / result.modules:.3f}",
                f"{seconds / result.seconds['quiver']:.1f}×",
                cosine,
                str(result.repeats[method]),
            ]
        )
    return header, rows


def forward_rows(report: Report) -> tuple[list[str], list[list[str]]]:
    header = ["workload", "experts", "k Quiver/PEFT", "base ms", "Quiver ms", "PEFT ms", "Quiver/base", "PEFT/base", "PEFT/Quiver", "runs b/Q/P"]
    rows = []
    for result in report.forwards:
        rows.append(
            [
                result.workload,
                str(result.experts),
                f"{result.top_k_quiver}/{result.top_k_peft}",
                milliseconds(result.seconds["base"]),
                milliseconds(result.seconds["quiver"]),
                milliseconds(result.seconds["peft"]),
                f"{result.quiver_over_base:.2f}×",
                f"{result.peft_over_base:.2f}×",
                f"{result.peft_over_quiver:.1f}×",
                "/".join(str(result.repeats[name]) for name in ("base", "quiver", "peft")),
            ]
        )
    return header, rows


def memory_rows(report: Report) -> tuple[list[str], list[list[str]]]:
    header = ["experts", "Quiver stacked experts", "adapter files", "prototypes (float32)", "files + prototypes", "stacked / (files + prototypes)"]
    rows = []
    for entry in report.memory:
        rows.append(
            [
                str(entry.experts),
                megabytes(entry.expert_state),
                megabytes(entry.file_bytes),
                megabytes(entry.prototype_bytes),
                megabytes(entry.allowed),
                f"{entry.expert_state / entry.allowed:.3f}",
            ]
        )
    return header, rows


def check_rows(report: Report) -> tuple[list[str], list[list[str]]]:
    return ["target", "measured", "verdict"], [[check.target, check.measured, check.verdict] for check in report.checks]


def print_report(report: Report) -> None:
    sections = [
        (f"Prototype computation, one expert, {report.prototypes.modules} modules (CPU, float32)", prototype_rows(report)),
        ("Routed forward, median time per call", forward_rows(report)),
        ("Memory of the experts", memory_rows(report)),
        ("Targets", check_rows(report)),
    ]
    for title, (header, rows) in sections:
        print(f"\n{title}\n{text_table(header, rows)}")
    for title, elapsed, operators in report.profiles:
        print(f"\nProfile: {title}, {milliseconds(elapsed)} ms under the profiler")
        print(text_table(["operator", "self ms", "calls"], [[name, f"{ms:.1f}", str(calls)] for name, ms, calls in operators]))
    print(f"\nTotal run time: {report.runtime_seconds:.0f} s")


def peft_loading_note(report: Report) -> list[str]:
    """Return the paragraph describing how the PEFT models were built and the check of that shortcut."""
    text = (
        f"PEFT's models come from `create_arrow_model` over adapter folders (adapter_config.json and "
        "adapter_model.safetensors). PEFT's own loading slows down with every adapter already loaded: with peft "
        "0.21.2 on a 2-core AMD EPYC, 8 adapters took 5 s and 32 took 37 s. So for libraries above "
        f"{PEFT_LOADED_ADAPTERS} experts, `create_arrow_model` loads the first {PEFT_LOADED_ADAPTERS} folders. "
        "The script places the other experts' factors in the LoRA layers under PEFT's adapter names and then "
        "calls PEFT's `on_adapter_change`. "
        "The forward pass is PEFT's code either way."
    )
    difference = report.peft_insertion_difference
    if difference is not None:
        outcome = "the same logits, bit for bit, as" if difference == 0 else f"logits within {difference:.2g} of those of"
        text += f" With {PEFT_LOADED_ADAPTERS} experts, inserting all but the first gave {outcome} PEFT loading all {PEFT_LOADED_ADAPTERS} itself."
    return [text, ""]


def write_markdown(report: Report, path: Path) -> None:
    machine = report.machine
    versions = ", ".join(f"{name} {version}" for name, version in machine.versions.items())
    device = machine.device + (f" ({machine.accelerator})" if machine.accelerator else "")
    fixed = report.memory[0].fixed_state if report.memory else 0
    lines = [
        "# Routing speed",
        "",
        "Quiver's Arrow routing against the base model alone and against PEFT's Arrow "
        "(`create_arrow_model`), on the same random experts. Written by `bench/routing_speed.py`; "
        "rerun it to refresh this page.",
        "",
        "## Run",
        "",
        f"- Command: `{machine.command}`",
        f"- Date: {machine.date}; total run time {report.runtime_seconds:.0f} s",
        f"- Machine: {machine.cpu}, {machine.cores} cores, torch using {machine.threads} threads",
        f"- Device and dtype: {device}, {machine.dtype}",
        f"- Versions: {versions}",
        f"- Quiver: {machine.revision}",
        f"- Model: the embedded {DEFAULT_MODEL_NAME}. Every expert has random rank-{RANK} factors "
        f"(lora_alpha {ALPHA:g}, scale {ALPHA / RANK:g}) on all {report.module_count} linear modules of the "
        "decoder layers (q, k, v, o, gate, up and down projections; the output layer is not adapted).",
        "",
        "## 1. Prototype computation",
        "",
        f"Prototypes of one expert on all {report.prototypes.modules} modules, on the CPU in float32 whatever "
        "the device option, since Quiver computes them when an expert is added. The total is the median "
        "over the runs shown. PEFT's power iteration is PEFT's own `ArrowLoraLinearLayer.top_right_singular_vec_from_BA` "
        f"(peft {machine.versions['peft']}), called on a standalone layer with `rng_seed={SEED}`. "
        "The cosines compare each prototype with the dense SVD's top right-singular vector, whose sign is arbitrary.",
        "",
        *markdown_table(*prototype_rows(report), align="lrrrrr"),
        "",
        "Random factors have top singular values close together, so 15 power-iteration steps often stop far "
        "from the top singular vector; trained adapters usually have a faster-decaying spectrum.",
        "",
        "## 2. Routed forward",
        "",
        "Median time of one forward call (logits for every position) under `torch.inference_mode`. "
        "The base model, Quiver's routed model and PEFT's Arrow model are separate copies of the model, "
        f"loaded in the same process; after {WARMUP_CALLS} warm-up calls each, their timed calls alternate "
        "round by round. The runs column gives the timed calls of each. Workloads:",
        "",
        *[f"- {workload.name}: {workload.description}." for workload in report.workloads],
        "",
        "The decode step's cache is prefilled once by the base model and copied before every call, outside "
        "the timed region; the cache contents do not change the amount of work. Both sides use Arrow scoring "
        f"(|prototype · x|, temperature 1) with k = {TOP_K} clamped to the library size: PEFT raises an "
        "index error when top_k exceeds the number of experts, so it gets `top_k=min(4, experts)`. PEFT keeps "
        "the adapters in the model's dtype (`autocast_adapter_dtype=False`).",
        "",
        *markdown_table(*forward_rows(report), align="lrrrrrrrrr"),
        "",
        "PEFT's first call with each library (a prompt call), which also builds its prototypes, took "
        + ", ".join(
            f"{milliseconds(result.peft_first_call)} ms with {count_experts(result.experts)}"
            for result in report.forwards
            if result.workload == report.workloads[0].name
        )
        + ".",
        "",
        *peft_loading_note(report),
        "## 3. Memory",
        "",
        "Quiver's stacked experts: the bytes of every tensor that the routed layers hold other than their "
        f"base layers' weights, less the {megabytes(fixed)} that they hold with no experts loaded, such as "
        "the per-module input means. Adapter files: the sum of the experts' `adapter_model.safetensors`. "
        "Prototypes: one float32 vector of D_in values per module and expert, as Quiver stores them.",
        "",
        *markdown_table(*memory_rows(report), align="rrrrrr"),
        "",
        "## Targets",
        "",
        *markdown_table(*check_rows(report), align="llr"),
        "",
    ]
    for title, elapsed, operators in report.profiles:
        lines += [
            f"## Profile: {title}",
            "",
            f"One call under `torch.profiler` ({milliseconds(elapsed)} ms with the profiler on), the operators "
            "with the most self time:",
            "",
            *markdown_table(["operator", "self ms", "calls"], [[f"`{name}`", f"{ms:.1f}", str(calls)] for name, ms, calls in operators], align="lrr"),
            "",
        ]
    # The page contains other benchmarks too, so this report is one section, its headings one level down.
    write_section(path, "routing_speed", [f"#{line}" if line.startswith("#") else line for line in lines])


# --------------------------------------------------------------------------------------------


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experts", type=int, nargs="+", default=[1, 8, 64, 256], help="library sizes to measure (default: 1 8 64 256)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 and 8 experts unless --experts is given, 3 timed calls each")
    # NOTE: only the CPU in float32 has been run. The cuda device and the bfloat16 dtype have not.
    parser.add_argument("--device", default="cpu", help="torch device for the forward passes: cpu or cuda (default: cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="model and expert dtype (default: float32)")
    parser.add_argument("--threads", type=int, default=available_cores(), help="torch CPU threads (default: the available cores)")
    parser.add_argument("--no-profile", action="store_true", help="skip the torch.profiler run of the slowest Quiver case")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="Markdown page whose routing section is rewritten (default: docs/benchmarks.md)")
    arguments = parser.parse_args()
    if arguments.quick and "--experts" not in sys.argv[1:]:
        arguments.experts = [1, 8]
    arguments.experts = sorted(set(arguments.experts))
    if arguments.experts[0] < 1:
        parser.error(f"--experts must be at least 1, got {arguments.experts[0]}")
    if arguments.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {arguments.device} requested, but CUDA is not available")
    return arguments


def main() -> int:
    arguments = parse_arguments()
    started = time.perf_counter()
    transformers.utils.logging.disable_progress_bar()
    # transformers and PEFT warn about their own deprecated internals on every model load.
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(arguments.threads)
    device = torch.device(arguments.device)
    dtype = getattr(torch, arguments.dtype)
    machine = describe_machine(device, dtype, torch.get_num_threads())
    print(f"{machine.cpu}, {machine.cores} cores, {machine.threads} threads; {machine.device}, {machine.dtype}", flush=True)

    def progress(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {message}", flush=True)

    base_model, _ = load_base_model(device=device, dtype=dtype)
    quiver_model, _ = load_base_model(device=device, dtype=dtype)
    module_count = len(decoder_linear_shapes(base_model))
    vocab_size = base_model.config.vocab_size

    with tempfile.TemporaryDirectory(prefix="quiver-routing-speed-") as folder:
        progress(f"building {arguments.experts[-1]} random experts on {module_count} modules")
        expert_set = build_experts(base_model, arguments.experts[-1], Path(folder))

        progress("timing prototype computation")
        prototypes = time_prototypes(expert_set.experts[0], arguments.quick)

        insertion_difference = None
        if arguments.experts[-1] > PEFT_LOADED_ADAPTERS:
            progress(f"checking PEFT models with inserted experts against {PEFT_LOADED_ADAPTERS} loaded by PEFT")
            insertion_difference = check_peft_insertion(expert_set.folders[:PEFT_LOADED_ADAPTERS], device, dtype, vocab_size)

        workloads = make_workloads(base_model, vocab_size, device)
        router = ArrowRouter(quiver_model)
        forwards: list[ForwardResult] = []
        memory: list[MemoryResult] = []
        routed_models: dict[int, RoutedModel] = {}
        for experts in arguments.experts:
            router.load_experts(expert_set.experts[:experts], revision=experts)
            memory.append(
                MemoryResult(
                    experts,
                    routed_state_bytes(router),
                    file_bytes=sum(expert_set.file_bytes[:experts]),
                    prototype_bytes=experts * expert_set.prototype_bytes,
                )
            )
            top_k = (min(TOP_K, experts), min(TOP_K, experts))
            routed = RoutedModel(quiver_model, router, RoutingSettings(top_k=top_k[0], method="arrow"))
            routed_models[experts] = routed
            progress(f"loading PEFT's Arrow with {experts} experts")
            peft_model = load_peft_arrow(expert_set.folders[:experts], top_k[1], device, dtype, loaded=PEFT_LOADED_ADAPTERS)
            models = {"base": base_model, "quiver": routed, "peft": peft_model}
            with torch.inference_mode():
                for workload in workloads:
                    progress(f"timing {workload.name} with {experts} experts")
                    forwards.append(measure_workload(workload, models, experts, top_k, device, arguments.quick))
            del models, peft_model
            gc.collect()

        # What the routed layers keep without experts, to separate it from the experts' own bytes.
        router.load_experts([], revision=0)
        fixed = routed_state_bytes(router)
        for entry in memory:
            entry.fixed_state = fixed

        profiles = []
        if not arguments.no_profile:
            slowest = max(forwards, key=lambda result: result.quiver_over_base)
            progress(f"profiling Quiver on {slowest.workload} with {slowest.experts} experts")
            router.load_experts(expert_set.experts[: slowest.experts], revision=slowest.experts)
            workload = next(item for item in workloads if item.name == slowest.workload)
            routed = routed_models[slowest.experts]
            with torch.inference_mode():
                timed_call(routed, workload.make_inputs(), device)
                elapsed, operators = profile_call(routed, workload.make_inputs(), device)
            title = f"Quiver, {slowest.workload}, {count_experts(slowest.experts)} (the largest Quiver/base ratio)"
            profiles.append((title, elapsed, operators))

    checks = check_targets(prototypes, forwards, memory)
    report = Report(machine, module_count, prototypes, forwards, memory, insertion_difference, workloads, checks, profiles)
    report.runtime_seconds = time.perf_counter() - started
    print_report(report)
    write_markdown(report, arguments.output)
    print(f"wrote {arguments.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
