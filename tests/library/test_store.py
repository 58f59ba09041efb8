"""The expert library folder: layout, metadata, validation on add, atomic writes."""

import json

import pytest
import torch

from quiver.library import (
    ExpertExistsError,
    ExpertLibrary,
    ExpertNotFoundError,
    InvalidExpertError,
    InvalidExpertNameError,
)
from quiver.library import store as store_module
from tests.factories import edit_config, edit_weights, library_snapshot, make_adapter, tiny_llama


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture
def adapter(model, tmp_path):
    return make_adapter(model, tmp_path / "adapter")


@pytest.fixture
def library(model, tmp_path):
    return ExpertLibrary(tmp_path / "library", model)


def test_add_writes_expert_folder(library, adapter):
    info = library.add("math", adapter, task="arithmetic", description="adds numbers")

    folder = library.root / "math"
    assert sorted(path.name for path in folder.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "arrow.safetensors",
        "expert.json",
    ]
    assert (folder / "adapter_model.safetensors").read_bytes() == (adapter / "adapter_model.safetensors").read_bytes()
    assert (folder / "adapter_config.json").read_bytes() == (adapter / "adapter_config.json").read_bytes()
    assert info.task == "arithmetic"
    assert info.rank == 4
    assert info.module_count == 6
    assert info.target_modules == ["down_proj", "q_proj", "v_proj"]
    assert info.base_model == "tiny-llama"


def test_expert_json_matches_info(library, adapter):
    info = library.add("math", adapter)

    stored = json.loads((library.root / "math" / "expert.json").read_text())

    assert stored == info.to_json()
    assert library.get("math") == info


def test_manifest_and_card(library, adapter):
    library.add("math", adapter, task="arithmetic")

    manifest = json.loads((library.root / "quiver.json").read_text())
    card = (library.root / "README.md").read_text()
    assert manifest["base_model"] == "tiny-llama"
    assert manifest["format_version"] == 1
    assert card.startswith("---\nlibrary_name: peft\n")
    assert "| math | arithmetic | 4 |" in card


def test_revision_grows_on_each_change(library, adapter):
    start = library.revision

    library.add("one", adapter)
    after_add = library.revision
    library.remove("one")

    assert after_add == start + 1
    assert library.revision == start + 2


def test_list_and_remove(library, adapter):
    library.add("b-expert", adapter)
    library.add("a-expert", adapter)

    assert library.names() == ["a-expert", "b-expert"]
    assert [info.name for info in library.list()] == ["a-expert", "b-expert"]
    assert len(library) == 2

    library.remove("a-expert")
    assert library.names() == ["b-expert"]
    assert not (library.root / "a-expert").exists()


def test_load_returns_factors_and_prototypes(library, adapter):
    library.add("math", adapter)

    loaded = library.load("math")

    assert set(loaded.modules) == set(loaded.prototypes)
    module = loaded.modules["model.layers.0.self_attn.q_proj"]
    assert module.lora_a.shape == (4, 32)
    assert module.lora_b.shape == (32, 4)
    assert module.scale == 2.0
    assert loaded.prototypes["model.layers.0.self_attn.q_proj"].shape == (32,)


def test_second_instance_sees_changes(library, adapter, model):
    library.add("math", adapter)

    other = ExpertLibrary(library.root, model)

    assert other.names() == ["math"]
    assert other.revision == library.revision


def test_unknown_expert_not_found(library, adapter):
    library.add("math", adapter)

    with pytest.raises(ExpertNotFoundError, match="'poetry' not found.*available: math"):
        library.get("poetry")
    with pytest.raises(ExpertNotFoundError):
        library.remove("poetry")


def test_duplicate_name_rejected(library, adapter, model, tmp_path):
    library.add("math", adapter)
    before = library_snapshot(library.root)
    other = make_adapter(model, tmp_path / "other", seed=1)

    with pytest.raises(ExpertExistsError, match="'math' already exists"):
        library.add("math", other)

    assert library_snapshot(library.root) == before


@pytest.mark.parametrize("name", ["", "-lead", "has space", "a" * 65, "../escape", ".hidden", "dot.name"])
def test_invalid_name_rejected(library, adapter, name):
    before = library_snapshot(library.root)

    with pytest.raises(InvalidExpertNameError, match="invalid"):
        library.add(name, adapter)

    assert library_snapshot(library.root) == before


def _drop_module(tensors):
    for key in list(tensors):
        if "layers.1.mlp.down_proj" in key:
            del tensors[key]


def _rename_module(tensors):
    for key in list(tensors):
        if "layers.0.self_attn.q_proj" in key:
            tensors[key.replace("layers.0", "layers.7")] = tensors.pop(key)


def _widen_lora_a(tensors):
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    tensors[key] = torch.randn(4, 48)


def _zero_lora_b(tensors):
    for key in tensors:
        if "lora_B" in key:
            tensors[key] = torch.zeros_like(tensors[key])


def _nan_lora_a(tensors):
    key = "base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"
    tensors[key][0, 0] = float("nan")


def _drop_lora_b(tensors):
    del tensors["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"]


# (case, how the weights are broken, text the error must contain)
WEIGHT_CASES = [
    ("module missing in base", _rename_module, "[model.layers.7.self_attn.q_proj] module not found"),
    ("shape mismatch", _widen_lora_a, "lora_A shape (4, 48) does not match the module's input size 32"),
    ("all-zero update", _zero_lora_b, "the update B·A is zero in every module"),
    ("non-finite values", _nan_lora_a, "NaN or infinite"),
    ("factor missing", _drop_lora_b, "[model.layers.0.self_attn.v_proj] lora_A has no matching lora_B weight"),
]


@pytest.mark.parametrize(("case", "edit", "message"), WEIGHT_CASES, ids=[case[0] for case in WEIGHT_CASES])
def test_broken_weights_rejected(library, adapter, case, edit, message):
    edit_weights(adapter, edit)
    before = library_snapshot(library.root)

    with pytest.raises(InvalidExpertError) as raised:
        library.add("broken", adapter)

    assert message in str(raised.value)
    assert "'broken'" in str(raised.value)
    assert library_snapshot(library.root) == before


def test_all_problems_reported_at_once(library, adapter):
    def break_three_modules(tensors):
        _rename_module(tensors)
        _nan_lora_a(tensors)
        tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"] = torch.randn(4, 48)

    edit_weights(adapter, break_three_modules)

    with pytest.raises(InvalidExpertError) as raised:
        library.add("broken", adapter)

    problems = raised.value.problems
    assert len(problems) == 3
    assert any("[model.layers.7.self_attn.q_proj] module not found" in problem for problem in problems)
    assert any("[model.layers.0.self_attn.v_proj] lora_A contains NaN" in problem for problem in problems)
    assert any("[model.layers.1.self_attn.q_proj] lora_A shape (4, 48)" in problem for problem in problems)


def test_zero_modules_are_not_routed(library, adapter):
    def zero_v_proj(tensors):
        for key in tensors:
            if "v_proj.lora_B" in key:
                tensors[key] = torch.zeros_like(tensors[key])

    edit_weights(adapter, zero_v_proj)

    info = library.add("partial", adapter)
    loaded = library.load("partial")

    assert info.module_count == 4
    assert sorted(loaded.modules) == sorted(loaded.prototypes)
    assert not any("v_proj" in module for module in loaded.modules)


# (case, file content or config edit, text the error must contain)
CONFIG_CASES = [
    ("config not object", "[1, 2]", "must contain a JSON object, found list"),
    ("config not json", "{not json", "not valid JSON"),
    ("rank missing", lambda config: config.pop("r"), "has no 'r' (the LoRA rank)"),
    ("other peft type", lambda config: config.update(peft_type="IA3"), "peft_type is 'IA3'"),
    ("dora", lambda config: config.update(use_dora=True), "use_dora"),
    ("bias", lambda config: config.update(bias="all"), "bias is 'all'"),
    ("target absent", lambda config: config.update(target_modules=["q_proj", "w_gate"]), "target module 'w_gate' not found"),
    ("alpha nan", '{"r": 4, "lora_alpha": NaN, "target_modules": ["q_proj"]}', "lora_alpha is nan"),
    ("alpha null", lambda config: config.update(lora_alpha=None), "lora_alpha is None"),
    ("alpha pattern text", lambda config: config.update(alpha_pattern={"q_proj": "big"}), "alpha_pattern['q_proj'] is 'big'"),
    ("rank disagrees", lambda config: config.update(r=8), "the weights have rank 4 but the config gives rank 8"),
    ("rank pattern disagrees", lambda config: config.update(rank_pattern={"v_proj": 2}), "[2 modules: model.layers.0.self_attn.v_proj, model.layers.1.self_attn.v_proj] the weights have rank 4 but the config gives rank 2"),
]


@pytest.mark.parametrize(("case", "change", "message"), CONFIG_CASES, ids=[case[0] for case in CONFIG_CASES])
def test_broken_config_rejected(library, adapter, case, change, message):
    if isinstance(change, str):
        (adapter / "adapter_config.json").write_text(change)
    else:
        edit_config(adapter, change)
    before = library_snapshot(library.root)

    with pytest.raises(InvalidExpertError) as raised:
        library.add("broken", adapter)

    assert message in str(raised.value)
    assert library_snapshot(library.root) == before


@pytest.mark.parametrize("content", [b"", b"\x08\x00\x00\x00\x00\x00\x00\x00{}", b"version https://git-lfs.github.com/spec/v1\n"])
def test_unreadable_weights_rejected(library, adapter, content):
    (adapter / "adapter_model.safetensors").write_bytes(content)
    before = library_snapshot(library.root)

    with pytest.raises(InvalidExpertError, match="is empty|not a readable safetensors file|contains no lora_A|Git LFS pointer"):
        library.add("broken", adapter)

    assert library_snapshot(library.root) == before


def test_missing_files_rejected(library, tmp_path):
    (tmp_path / "empty").mkdir()

    with pytest.raises(InvalidExpertError) as raised:
        library.add("empty", tmp_path / "empty")

    assert "adapter_config.json is missing" in str(raised.value)


def test_failed_write_leaves_library_unchanged(library, adapter, monkeypatch):
    library.add("kept", adapter)
    before = library_snapshot(library.root)

    def fail(path, prototypes):
        raise OSError("disk full")

    monkeypatch.setattr(store_module, "save_prototypes", fail)
    with pytest.raises(OSError, match="disk full"):
        library.add("lost", adapter)

    assert library_snapshot(library.root) == before
    assert library.names() == ["kept"]


def test_stored_files_readable_by_others(library, adapter):
    library.add("math", adapter)

    folder = library.root / "math"
    assert folder.stat().st_mode & 0o777 == 0o755
    assert all(path.stat().st_mode & 0o777 == 0o644 for path in folder.iterdir())


def test_card_escapes_task_text(library, adapter):
    library.add("math", adapter, task="adds | subtracts\nand more")

    card = (library.root / "README.md").read_text()

    assert "| math | adds \\| subtracts and more | 4 |" in card


def test_different_base_model_name_recorded(library, adapter):
    edit_config(adapter, lambda config: config.update(base_model_name_or_path="someone/other-model"))

    info = library.add("foreign", adapter)

    assert info.adapter_base_model == "someone/other-model"


def test_library_without_model_reads_only(library, adapter, tmp_path):
    library.add("math", adapter)
    reader = ExpertLibrary(library.root)

    assert reader.names() == ["math"]
    assert reader.load("math").modules
    with pytest.raises(InvalidExpertError, match="without a base model"):
        reader.add("other", adapter)


def test_target_without_weights_reads_without_model(library, adapter):
    """PEFT leaves a targeted module without weights unchanged, so such an adapter is valid."""

    def drop_down_proj(tensors):
        for key in [key for key in tensors if "down_proj" in key]:
            del tensors[key]

    edit_weights(adapter, drop_down_proj)
    library.add("partial", adapter)
    reader = ExpertLibrary(library.root)

    loaded = reader.load("partial")

    assert not any("down_proj" in module for module in loaded.modules)
    assert len(loaded.modules) == 4


def test_list_skips_expert_removed_while_listing(library, adapter, monkeypatch):
    library.add("kept", adapter)
    library.add("gone", adapter)
    scanned = library.names()
    library.remove("gone")
    # The folder scan saw both experts; the removal lands before their metadata is read.
    monkeypatch.setattr(type(library), "names", lambda self: scanned)

    assert [info.name for info in library.list()] == ["kept"]
