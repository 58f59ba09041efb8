"""Tests of LoRA expert training on a tiny random Llama, which run in seconds on a CPU."""

from __future__ import annotations

import json
import stat

import pytest
import torch
from datasets import Dataset
from peft import PeftModel
from safetensors.torch import load_file

from quiver.library.errors import SkillNotFoundError
from quiver.library.skills import get_skill, make_examples
from quiver.library.training import (
    ADAPTER_FILES,
    ALL_LINEAR_MODULES,
    DEFAULT_TRAINING,
    _collate,
    _tokenize,
    evaluate_skill,
    generate_greedy,
    train_expert,
)

# A few steps at a high learning rate are enough to move a 32-wide model.
FAST = {"steps": 4, "batch_size": 4, "learning_rate": 1e-2, "warmup_steps": 1}


def _logits(model, tokenizer) -> torch.Tensor:
    inputs = tokenizer(["Reverse the words: red apple tree\nAnswer:"], return_tensors="pt")
    with torch.no_grad():
        return model(**inputs).logits


def _state(model) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def test_train_writes_two_peft_files(tiny_llama, tiny_tokenizer, tmp_path):
    output = train_expert(tiny_llama, tiny_tokenizer, "reverse", tmp_path / "reverse", **FAST)

    assert output == tmp_path / "reverse"
    assert sorted(path.name for path in output.iterdir()) == sorted(ADAPTER_FILES)
    config = json.loads((output / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert config["r"] == DEFAULT_TRAINING.rank
    assert config["lora_alpha"] == DEFAULT_TRAINING.alpha
    assert sorted(config["target_modules"]) == sorted(ALL_LINEAR_MODULES)


def test_train_leaves_no_temporary_folder(tiny_llama, tiny_tokenizer, tmp_path):
    train_expert(tiny_llama, tiny_tokenizer, "reverse", tmp_path / "reverse", **FAST)

    assert [path.name for path in tmp_path.iterdir()] == ["reverse"]


def test_output_folder_mode_follows_umask(tiny_llama, tiny_tokenizer, tmp_path):
    reference = tmp_path / "reference"
    reference.mkdir()

    output = train_expert(tiny_llama, tiny_tokenizer, "reverse", tmp_path / "reverse", **FAST)

    assert stat.S_IMODE(output.stat().st_mode) == stat.S_IMODE(reference.stat().st_mode)


def test_saved_adapter_keys_and_weights(tiny_llama, tiny_tokenizer, tmp_path):
    output = train_expert(tiny_llama, tiny_tokenizer, "add", tmp_path / "add", **FAST)

    tensors = load_file(output / "adapter_model.safetensors")
    # Two layers, seven module kinds, an A and a B matrix each.
    assert len(tensors) == 2 * len(ALL_LINEAR_MODULES) * 2
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in tensors
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in tensors
    b_matrices = {name: tensor for name, tensor in tensors.items() if ".lora_B." in name}
    assert len(b_matrices) == 2 * len(ALL_LINEAR_MODULES)
    for name, tensor in b_matrices.items():
        # PEFT starts B at zero, so a non-zero B shows that training updated it.
        assert tensor.abs().max() > 0, name
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (8, 32)


# peft 0.21.2 reads a property that transformers 5.25 deprecates, on every adapter it loads.
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
def test_saved_adapter_loads_with_peft(tiny_llama, tiny_tokenizer, tmp_path):
    output = train_expert(tiny_llama, tiny_tokenizer, "uppercase", tmp_path / "uppercase", **FAST)
    before = _logits(tiny_llama, tiny_tokenizer)

    adapted = PeftModel.from_pretrained(tiny_llama, str(output))
    with torch.no_grad():
        after = _logits(adapted, tiny_tokenizer)

    assert not torch.allclose(before, after)


def test_train_leaves_base_model_unchanged(tiny_llama, tiny_tokenizer, tmp_path):
    logits_before = _logits(tiny_llama, tiny_tokenizer)
    state_before = _state(tiny_llama)
    requires_grad_before = {name: parameter.requires_grad for name, parameter in tiny_llama.named_parameters()}
    modules_before = [(name, type(module)) for name, module in tiny_llama.named_modules()]
    attributes_before = set(vars(tiny_llama))
    config_before = tiny_llama.config.to_dict()

    train_expert(tiny_llama, tiny_tokenizer, "capital", tmp_path / "capital", **FAST)

    assert torch.equal(_logits(tiny_llama, tiny_tokenizer), logits_before)
    state_after = _state(tiny_llama)
    assert state_after.keys() == state_before.keys()
    for name, tensor in state_before.items():
        assert torch.equal(state_after[name], tensor), name
    assert {name: p.requires_grad for name, p in tiny_llama.named_parameters()} == requires_grad_before
    assert [(name, type(module)) for name, module in tiny_llama.named_modules()] == modules_before
    assert set(vars(tiny_llama)) == attributes_before
    assert tiny_llama.config.to_dict() == config_before
    assert not tiny_llama.training


def test_train_restores_training_mode(tiny_llama, tiny_tokenizer, tmp_path):
    tiny_llama.train()
    train_expert(tiny_llama, tiny_tokenizer, "reverse", tmp_path / "reverse", **FAST)
    assert tiny_llama.training


def test_training_loss_decreases(tiny_llama, tiny_tokenizer, tmp_path):
    losses: list[float] = []
    train_expert(
        tiny_llama, tiny_tokenizer, "uppercase", tmp_path / "uppercase",
        steps=30, batch_size=8, learning_rate=1e-2, warmup_steps=2,
        progress=lambda step, total, loss: losses.append(loss),
    )

    assert len(losses) == 30
    last = sum(losses[-5:]) / 5
    assert last < 0.85 * losses[0]


def test_progress_reports_every_step(tiny_llama, tiny_tokenizer, tmp_path):
    calls = []
    train_expert(tiny_llama, tiny_tokenizer, "add", tmp_path / "add", **FAST, progress=lambda *args: calls.append(args))

    assert [step for step, _, _ in calls] == [1, 2, 3, 4]
    assert all(total == 4 for _, total, _ in calls)
    assert all(isinstance(loss, float) and loss > 0 for _, _, loss in calls)


def test_training_is_deterministic(make_tiny_llama, tiny_tokenizer, tmp_path):
    first = train_expert(make_tiny_llama(), tiny_tokenizer, "reverse", tmp_path / "first", **FAST, seed=5)
    second = train_expert(make_tiny_llama(), tiny_tokenizer, "reverse", tmp_path / "second", **FAST, seed=5)
    other = train_expert(make_tiny_llama(), tiny_tokenizer, "reverse", tmp_path / "other", **FAST, seed=6)

    first_tensors = load_file(first / "adapter_model.safetensors")
    second_tensors = load_file(second / "adapter_model.safetensors")
    other_tensors = load_file(other / "adapter_model.safetensors")
    assert first_tensors.keys() == second_tensors.keys()
    for name, tensor in first_tensors.items():
        assert torch.equal(tensor, second_tensors[name]), name
    assert any(not torch.equal(tensor, other_tensors[name]) for name, tensor in first_tensors.items())


def test_training_keeps_global_random_state(tiny_llama, tiny_tokenizer, tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train_expert(tiny_llama, tiny_tokenizer, "reverse", tmp_path / "reverse", **FAST)
    assert torch.equal(torch.rand(3), expected)


def test_fewer_target_modules(tiny_llama, tiny_tokenizer, tmp_path):
    output = train_expert(
        tiny_llama, tiny_tokenizer, "reverse", tmp_path / "reverse", **FAST, target_modules=("q_proj", "v_proj"), rank=4
    )

    tensors = load_file(output / "adapter_model.safetensors")
    assert len(tensors) == 2 * 2 * 2
    assert all(".q_proj." in name or ".v_proj." in name for name in tensors)
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 32)


def test_existing_output_folder_rejected(tiny_llama, tiny_tokenizer, tmp_path):
    output = tmp_path / "reverse"
    output.mkdir()
    (output / "keep.txt").write_text("user data")

    with pytest.raises(FileExistsError, match="already exists"):
        train_expert(tiny_llama, tiny_tokenizer, "reverse", output, **FAST)

    assert [path.name for path in output.iterdir()] == ["keep.txt"]


def test_failed_training_cleans_up(tiny_llama, tiny_tokenizer, tmp_path):
    logits_before = _logits(tiny_llama, tiny_tokenizer)

    def fail_at_second_step(step, total, loss):
        if step == 2:
            raise RuntimeError("stopped by the test")

    with pytest.raises(RuntimeError, match="stopped by the test"):
        train_expert(tiny_llama, tiny_tokenizer, "reverse", tmp_path / "reverse", **FAST, progress=fail_at_second_step)

    assert list(tmp_path.iterdir()) == []
    assert torch.equal(_logits(tiny_llama, tiny_tokenizer), logits_before)
    assert not any("lora" in name for name, _ in tiny_llama.named_modules())


def test_unknown_skill_rejected(tiny_llama, tiny_tokenizer, tmp_path):
    with pytest.raises(SkillNotFoundError):
        train_expert(tiny_llama, tiny_tokenizer, "translate", tmp_path / "translate", **FAST)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("argument", "value", "message"),
    [
        ("steps", 0, "steps must be 1 or more"),
        ("rank", 0, "rank must be 1 or more"),
        ("batch_size", 0, "batch_size must be 1 or more"),
        ("learning_rate", 0.0, "learning_rate must be positive"),
        ("warmup_steps", -1, "warmup_steps must be 0 or more"),
    ],
)
def test_invalid_hyperparameters_rejected(tiny_llama, tiny_tokenizer, tmp_path, argument, value, message):
    with pytest.raises(ValueError, match=message):
        train_expert(tiny_llama, tiny_tokenizer, "reverse", tmp_path / "reverse", **{**FAST, argument: value})


def test_loss_mask_covers_answer_and_eos(tiny_tokenizer):
    examples = make_examples("capital", "train", 3) + make_examples("reverse", "train", 3)
    dataset = _tokenize(Dataset.from_list([example._asdict() for example in examples]), tiny_tokenizer)
    rows = [dataset[index] for index in range(len(dataset))]
    batch = _collate(rows, tiny_tokenizer.pad_token_id)

    span = batch["answer_span"]
    targets = batch["input_ids"][:, -span:]
    for index, example in enumerate(examples):
        masked = targets[index][batch["loss_mask"][index]].tolist()
        assert masked[-1] == tiny_tokenizer.eos_token_id
        assert tiny_tokenizer.decode(masked[:-1]) == example.answer
        # Each row is left-padded, so its prompt and answer end at the last position.
        real = batch["input_ids"][index][batch["attention_mask"][index].bool()].tolist()
        assert tiny_tokenizer.decode(real) == example.prompt + example.answer + tiny_tokenizer.eos_token
        first_real = int(batch["attention_mask"][index].argmax())
        assert batch["position_ids"][index, first_real] == 0
        assert batch["position_ids"][index, -1] == len(real) - 1


def test_generate_greedy_matches_unbatched(tiny_llama, tiny_tokenizer):
    prompts = [example.prompt for example in make_examples("reverse", "test", 3)]
    prompts.append("Add the numbers: 56 + 27\nAnswer:")

    batched = generate_greedy(tiny_llama, tiny_tokenizer, prompts, max_new_tokens=5)
    one_by_one = [generate_greedy(tiny_llama, tiny_tokenizer, [prompt], max_new_tokens=5)[0] for prompt in prompts]

    assert batched == one_by_one
    assert len(batched) == len(prompts)


def test_evaluate_skill_leaves_model_unchanged(tiny_llama, tiny_tokenizer, tmp_path):
    output = train_expert(tiny_llama, tiny_tokenizer, "add", tmp_path / "add", **FAST)
    logits_before = _logits(tiny_llama, tiny_tokenizer)
    requires_grad_before = {name: parameter.requires_grad for name, parameter in tiny_llama.named_parameters()}

    without_adapter = evaluate_skill(tiny_llama, tiny_tokenizer, "add", count=4, max_new_tokens=4)
    with_adapter = evaluate_skill(tiny_llama, tiny_tokenizer, get_skill("add"), count=4, adapter_dir=output, max_new_tokens=4)

    assert 0.0 <= without_adapter <= 1.0
    assert 0.0 <= with_adapter <= 1.0
    assert torch.equal(_logits(tiny_llama, tiny_tokenizer), logits_before)
    assert not any("lora" in name for name, _ in tiny_llama.named_modules())
    assert {name: p.requires_grad for name, p in tiny_llama.named_parameters()} == requires_grad_before
    assert not tiny_llama.training
