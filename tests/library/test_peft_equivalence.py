"""Routed logits against PEFT's PeftModel for every adapter format the library accepts.

With a single expert in scope and top_k=1, the softmax over one selected expert gives it weight 1,
so the routed model must compute exactly what PeftModel computes with that adapter loaded.
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from transformers import GPT2Config, GPT2LMHeadModel

from quiver.library import ArrowRouter, ExpertInfo, ExpertLibrary, LoadedExpert, RoutingSettings
from tests.factories import TINY_VOCAB, edit_config, edit_weights, make_adapter, tiny_llama

TOLERANCE = 1e-5
"""Largest accepted absolute difference between routed and PEFT logits, in float32."""

MIN_ADAPTER_EFFECT = 1e-3
"""Smallest accepted absolute difference between adapted and base logits, so an expert that is
silently left out of the forward pass fails the test instead of passing within TOLERANCE."""

EXPERT = "expert"
OTHER_BASE_MODEL = "example-org/other-base-model"
FULL_NAME_TARGET = "model.layers.0.self_attn.q_proj"


def tiny_gpt2() -> GPT2LMHeadModel:
    """Build a two-layer GPT-2 with hidden size 32, whose attention and MLP layers are ``Conv1D``, in evaluation mode."""
    torch.manual_seed(0)
    # GPT-2's default token ids (50256) lie outside the tiny vocabulary.
    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=TINY_VOCAB, n_positions=64, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config).eval()
    model.config.name_or_path = "tiny-gpt2"
    return model


def save_pickled_adapter(model: torch.nn.Module, folder: Path, *, seed: int = 0, rank: int = 4) -> Path:
    """Save a PEFT LoRA adapter with random, non-zero A and B as ``adapter_model.bin`` instead of safetensors."""
    torch.manual_seed(seed)
    lora = LoraConfig(r=rank, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    get_peft_model(copy.deepcopy(model), lora).save_pretrained(folder, safe_serialization=False)
    return folder


def insert_adapter_name(tensors: dict[str, torch.Tensor]) -> None:
    """Rename ``<module>.lora_A.weight`` keys to ``<module>.lora_A.default.weight``, and the same for lora_B."""
    for key in list(tensors):
        for factor in ("lora_A", "lora_B"):
            suffix = f".{factor}.weight"
            if key.endswith(suffix):
                tensors[key.removesuffix(suffix) + f".{factor}.default.weight"] = tensors.pop(key)


@dataclass
class Case:
    """One adapter format: the base model, the folder added to the library, and the folder PEFT loads."""

    model: torch.nn.Module
    adapter: Path
    reference: Path


def target_list(tmp_path: Path) -> Case:
    model = tiny_llama()
    folder = make_adapter(model, tmp_path / "adapter", target_modules=["q_proj", "v_proj", "down_proj"])
    return Case(model, folder, folder)


def target_regex(tmp_path: Path) -> Case:
    model = tiny_llama()
    folder = make_adapter(model, tmp_path / "adapter", target_modules=r".*\.(q_proj|v_proj)")
    return Case(model, folder, folder)


def all_linear_as_saved(tmp_path: Path) -> Case:
    """PEFT 0.21.2 saves ``all-linear`` expanded to the list of full module names, without lm_head."""
    model = tiny_llama()
    folder = make_adapter(model, tmp_path / "adapter", target_modules="all-linear")
    return Case(model, folder, folder)


def all_linear_literal(tmp_path: Path) -> Case:
    """The config keeps the literal ``all-linear``, which PEFT expands again when it loads the adapter."""
    model = tiny_llama()
    folder = make_adapter(model, tmp_path / "adapter", target_modules="all-linear")
    edit_config(folder, lambda config: config.update(target_modules="all-linear"))
    return Case(model, folder, folder)


def layers_to_transform(tmp_path: Path) -> Case:
    model = tiny_llama()
    folder = make_adapter(model, tmp_path / "adapter", layers_to_transform=[1])
    return Case(model, folder, folder)


def full_name_outside_layers(tmp_path: Path) -> Case:
    """PEFT adapts a module named in full in the list even outside ``layers_to_transform``, which narrows suffix matches only."""
    model = tiny_llama()
    folder = make_adapter(model, tmp_path / "adapter", target_modules=[FULL_NAME_TARGET, "v_proj"], layers_to_transform=[1])
    return Case(model, folder, folder)


def layers_pattern(tmp_path: Path) -> Case:
    model = tiny_llama()
    folder = make_adapter(model, tmp_path / "adapter", layers_to_transform=[1], layers_pattern="layers")
    return Case(model, folder, folder)


def rank_and_alpha_patterns(tmp_path: Path) -> Case:
    model = tiny_llama()
    folder = make_adapter(
        model,
        tmp_path / "adapter",
        rank=4,
        alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"q_proj": 2, r"layers\.1\.mlp\.down_proj": 6},
        alpha_pattern={"v_proj": 32, "down_proj": 5},
    )
    return Case(model, folder, folder)


def rslora(tmp_path: Path) -> Case:
    model = tiny_llama()
    folder = make_adapter(model, tmp_path / "adapter", rank=8, alpha=8, use_rslora=True)
    return Case(model, folder, folder)


def gpt2_fan_in_fan_out(tmp_path: Path) -> Case:
    model = tiny_gpt2()
    folder = make_adapter(model, tmp_path / "adapter", target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    return Case(model, folder, folder)


def pickled_weights(tmp_path: Path) -> Case:
    model = tiny_llama()
    folder = save_pickled_adapter(model, tmp_path / "adapter")
    return Case(model, folder, folder)


def adapter_name_in_keys(tmp_path: Path) -> Case:
    model = tiny_llama()
    original = make_adapter(model, tmp_path / "original")
    renamed = tmp_path / "renamed"
    shutil.copytree(original, renamed)
    edit_weights(renamed, insert_adapter_name)
    return Case(model, renamed, original)


def other_base_model(tmp_path: Path) -> Case:
    model = tiny_llama()
    folder = make_adapter(model, tmp_path / "adapter")
    edit_config(folder, lambda config: config.update(base_model_name_or_path=OTHER_BASE_MODEL))
    return Case(model, folder, folder)


CASES: dict[str, Callable[[Path], Case]] = {
    "target-list": target_list,
    "target-regex": target_regex,
    "all-linear-as-saved": all_linear_as_saved,
    "all-linear-literal": all_linear_literal,
    "layers-to-transform": layers_to_transform,
    "layers-pattern": layers_pattern,
    "full-name-outside-layers": full_name_outside_layers,
    "rank-alpha-pattern": rank_and_alpha_patterns,
    "rslora": rslora,
    "gpt2-fan-in-fan-out": gpt2_fan_in_fan_out,
    "pickled-weights": pickled_weights,
    "adapter-name-in-keys": adapter_name_in_keys,
    "other-base-model": other_base_model,
}


@dataclass
class Comparison:
    """Logits of one input under the base model, PEFT and the routed model, and what each adapted."""

    base: torch.Tensor
    reference: torch.Tensor
    routed: torch.Tensor
    peft_scales: dict[str, float]
    """PEFT's scale of every module it adapted, by module name."""
    expert: LoadedExpert
    info: ExpertInfo


def compare_with_peft(tmp_path: Path, case: Case) -> Comparison:
    """Run one input through the base model, PeftModel and the routed model with only the case's expert in scope."""
    model = case.model.eval()
    input_ids = torch.randint(0, TINY_VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))

    # PeftModel and the router both change the model they wrap, so PEFT gets a copy taken before routing.
    reference_model = PeftModel.from_pretrained(copy.deepcopy(model), case.reference).eval()
    peft_scales = {
        name: module.scaling["default"]
        for name, module in reference_model.base_model.model.named_modules()
        if isinstance(module, LoraLayer)
    }
    with torch.no_grad():
        base_logits = model(input_ids=input_ids).logits
        reference_logits = reference_model(input_ids=input_ids).logits

    library = ExpertLibrary(tmp_path / "library", model)
    info = library.add(EXPERT, case.adapter)
    expert = library.load(EXPERT)
    router = ArrowRouter(model)
    router.load_experts([expert], library.revision)
    with torch.no_grad(), router.routing(RoutingSettings(experts=(EXPERT,), top_k=1, method="arrow")):
        routed_logits = model(input_ids=input_ids).logits

    return Comparison(base_logits, reference_logits, routed_logits, peft_scales, expert, info)


@pytest.mark.parametrize("case_name", list(CASES))
def test_routed_logits_match_peft(tmp_path, case_name):
    comparison = compare_with_peft(tmp_path, CASES[case_name](tmp_path))

    routed_scales = {name: module.scale for name, module in comparison.expert.modules.items()}
    assert sorted(routed_scales) == sorted(comparison.peft_scales), "the routed modules differ from the modules PEFT adapted"
    for name, scale in routed_scales.items():
        assert scale == pytest.approx(comparison.peft_scales[name]), f"scale of {name} differs from PEFT's"

    assert comparison.routed.dtype == torch.float32
    effect = (comparison.reference - comparison.base).abs().max().item()
    assert effect > MIN_ADAPTER_EFFECT, f"the adapter changes PEFT's logits by only {effect:.2e}, too little to tell it from the base model"
    routed_effect = (comparison.routed - comparison.base).abs().max().item()
    assert routed_effect > MIN_ADAPTER_EFFECT, f"routing changes the logits by only {routed_effect:.2e}; the expert was not applied"
    difference = (comparison.routed - comparison.reference).abs().max().item()
    assert difference <= TOLERANCE, f"routed logits differ from PEFT's by up to {difference:.2e}"


def test_all_linear_leaves_out_lm_head(tmp_path):
    comparison = compare_with_peft(tmp_path, all_linear_literal(tmp_path))

    assert "lm_head" not in comparison.expert.modules
    assert len(comparison.expert.modules) == 2 * 7  # q, k, v, o, gate, up and down projections in each of 2 layers


@pytest.mark.parametrize("case_name", ["layers-to-transform", "layers-pattern"])
def test_layers_to_transform_keeps_layer_one(tmp_path, case_name):
    comparison = compare_with_peft(tmp_path, CASES[case_name](tmp_path))

    assert comparison.expert.modules, "no module was adapted"
    for name in comparison.expert.modules:
        assert name.startswith("model.layers.1."), f"{name} is outside layer 1"


def test_full_name_target_ignores_layers(tmp_path):
    comparison = compare_with_peft(tmp_path, full_name_outside_layers(tmp_path))

    assert FULL_NAME_TARGET in comparison.expert.modules
    assert "model.layers.0.self_attn.v_proj" not in comparison.expert.modules
    assert "model.layers.1.self_attn.v_proj" in comparison.expert.modules


def test_rank_pattern_sets_module_ranks(tmp_path):
    comparison = compare_with_peft(tmp_path, rank_and_alpha_patterns(tmp_path))
    modules = comparison.expert.modules

    assert modules["model.layers.0.self_attn.q_proj"].rank == 2
    assert modules["model.layers.0.mlp.down_proj"].rank == 4
    assert modules["model.layers.1.mlp.down_proj"].rank == 6
    assert modules["model.layers.0.self_attn.v_proj"].scale == pytest.approx(32 / 4)
    assert modules["model.layers.1.mlp.down_proj"].scale == pytest.approx(5 / 6)


def test_rslora_scales_by_square_root(tmp_path):
    comparison = compare_with_peft(tmp_path, rslora(tmp_path))

    for name, module in comparison.expert.modules.items():
        assert module.scale == pytest.approx(8 / 8**0.5), f"scale of {name} is not alpha / sqrt(rank)"


def test_adapter_name_keys_are_renamed(tmp_path):
    case = adapter_name_in_keys(tmp_path)
    keys = list(load_file(case.adapter / "adapter_model.safetensors"))

    assert keys
    assert all(".lora_A.default.weight" in key or ".lora_B.default.weight" in key for key in keys)


def test_pickled_adapter_has_no_safetensors(tmp_path):
    case = pickled_weights(tmp_path)

    assert (case.adapter / "adapter_model.bin").is_file()
    assert not (case.adapter / "adapter_model.safetensors").exists()


def test_other_base_model_is_recorded(tmp_path):
    comparison = compare_with_peft(tmp_path, other_base_model(tmp_path))

    assert comparison.info.adapter_base_model == OTHER_BASE_MODEL


def test_same_base_model_is_not_recorded(tmp_path):
    case = target_list(tmp_path)
    edit_config(case.adapter, lambda config: config.update(base_model_name_or_path=case.model.config.name_or_path))
    comparison = compare_with_peft(tmp_path, case)

    assert comparison.info.base_model == case.model.config.name_or_path
    assert comparison.info.adapter_base_model is None
