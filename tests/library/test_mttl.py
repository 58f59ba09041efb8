"""MTTL expert checkpoints: converted to PEFT's layout exactly, and refused when they hold code."""

import copy
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from quiver.library import ArrowRouter, ExpertLibrary, InvalidExpertError, RoutingSettings
from quiver.library.mttl import convert_mttl_checkpoint, read_mttl_checkpoint
from tests.factories import library_snapshot, make_adapter, tiny_llama

PREFIX = "base_model.model."


def _mttl_checkpoint(adapter: Path, path: Path, *, alpha: float = 8, extra: dict | None = None) -> Path:
    """Write the PEFT adapter's factors as an MTTL checkpoint: lora_a (D_in, R), lora_b (R, D_out)."""
    weights = {}
    for key, tensor in load_file(adapter / "adapter_model.safetensors").items():
        module, factor = key.removeprefix(PREFIX).rsplit(".lora_", 1)
        if factor.startswith("A"):
            weights[f"{module}.lora_a"] = tensor.T.contiguous()
        else:
            weights[f"{module}.lora_b"] = tensor.T.contiguous()
    rank = json.loads((adapter / "adapter_config.json").read_text())["r"]
    checkpoint = {
        "expert_info": {
            "expert_name": "adder",
            "expert_task_name": "add two numbers",
            "expert_config": {"lora_rank": rank, "lora_alpha": alpha, "lora_dropout": 0.0, "modify_modules": ".*"},
            "training_config": {"learning_rate": 1e-4},
        },
        "expert_weights": weights,
        "expert_optimizer_state": None,
        **(extra or {}),
    }
    torch.save(checkpoint, path)
    return path


@pytest.fixture
def model():
    return tiny_llama()


@pytest.fixture
def adapter(model, tmp_path):
    return make_adapter(model, tmp_path / "adapter", seed=4, rank=4, alpha=8)


def test_conversion_matches_peft_layout(adapter, tmp_path):
    checkpoint = _mttl_checkpoint(adapter, tmp_path / "expert.ckpt")

    expert = convert_mttl_checkpoint(checkpoint, tmp_path / "converted")

    original = load_file(adapter / "adapter_model.safetensors")
    converted = load_file(tmp_path / "converted" / "adapter_model.safetensors")
    assert converted.keys() == original.keys()
    assert all(torch.equal(converted[key], original[key]) for key in original)
    assert expert.config["r"] == 4
    assert expert.config["lora_alpha"] == 8
    assert expert.task == "add two numbers"
    assert expert.expert_name == "adder"


def test_imported_expert_gives_peft_logits(model, adapter, tmp_path):
    reference = PeftModel.from_pretrained(copy.deepcopy(model), adapter).eval()
    library = ExpertLibrary(tmp_path / "library", model)

    info = library.import_mttl("adder", _mttl_checkpoint(adapter, tmp_path / "expert.ckpt"))
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(input_ids=ids).logits
    router = ArrowRouter(model)
    router.load_experts([library.load("adder")], library.revision)
    with torch.no_grad():
        with router.routing(RoutingSettings(experts=("adder",), top_k=1)):
            routed = model(input_ids=ids).logits
        expected = reference(input_ids=ids).logits

    assert info.task == "add two numbers"
    assert (routed - expected).abs().max() <= 1e-5
    assert (routed - base).abs().max() > 1e-3


def test_converted_folder_loads_in_peft(model, adapter, tmp_path):
    convert_mttl_checkpoint(_mttl_checkpoint(adapter, tmp_path / "expert.ckpt"), tmp_path / "converted")
    reference = PeftModel.from_pretrained(copy.deepcopy(model), adapter).eval()
    converted = PeftModel.from_pretrained(copy.deepcopy(model), tmp_path / "converted").eval()
    ids = torch.arange(12).reshape(1, 12)

    with torch.no_grad():
        assert torch.allclose(converted(input_ids=ids).logits, reference(input_ids=ids).logits, atol=1e-5)


class _WritesFile:
    """Pickles as a call to Path.write_text: a plain unpickler would run it while loading."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.write_text, (self.path, "ran"))


def test_checkpoint_with_code_is_refused_not_run(model, adapter, tmp_path):
    marker = tmp_path / "unpickled"
    checkpoint = _mttl_checkpoint(adapter, tmp_path / "evil.ckpt", extra={"callback": _WritesFile(marker)})
    library = ExpertLibrary(tmp_path / "library", model)
    before = library_snapshot(library.root)

    with pytest.raises(InvalidExpertError) as raised:
        library.import_mttl("evil", checkpoint)

    assert not marker.exists()
    assert "only tensors and plain containers are accepted" in str(raised.value)
    assert "getattr" in str(raised.value)  # the global the payload needed, named in the message
    assert library_snapshot(library.root) == before


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda data: data.pop("expert_weights"), "expert_weights is missing or empty"),
        (lambda data: data["expert_info"]["expert_config"].pop("lora_alpha"), "lora_alpha is None"),
        (lambda data: data["expert_weights"].pop(next(iter(data["expert_weights"]))), "is missing; each module needs lora_a"),
        (lambda data: data["expert_weights"].update({"model.norm.scale": torch.ones(3)}), "is not a LoRA factor"),
        (lambda data: data["expert_info"]["expert_config"].update(lora_rank=16), "lora_rank is 16 but the weights have rank 4"),
    ],
    ids=["no-weights", "no-alpha", "half-pair", "stray-tensor", "rank-disagrees"],
)
def test_malformed_checkpoint_names_its_problem(adapter, tmp_path, change, problem):
    path = _mttl_checkpoint(adapter, tmp_path / "expert.ckpt")
    data = torch.load(path, weights_only=True)
    change(data)
    torch.save(data, path)

    with pytest.raises(InvalidExpertError) as raised:
        read_mttl_checkpoint(path)

    assert any(problem in line for line in raised.value.problems), raised.value.problems


def test_not_a_checkpoint_is_refused(tmp_path):
    path = tmp_path / "expert.ckpt"
    path.write_bytes(b"definitely not a torch file")

    with pytest.raises(InvalidExpertError, match="not a torch.save file"):
        read_mttl_checkpoint(path)
