"""Quiver's routed model against PEFT's own Arrow implementation on the same experts.

PEFT computes prototypes with 15 steps of power iteration from a random start, which converge
only when an expert's top singular value stands clear of the second. Trained experts have such a
decaying spectrum; random factors do not. The experts here are built as U·diag(s)·Qᵀ with
s = (4, 1, 0.5, 0.25), so after 15 steps PEFT's prototypes agree with Quiver's exact ones to
about (1/4)^30, and both route every token to the same experts. What remains is float32 rounding
of two different computation orders, hence a tolerance of 1e-4 on the logits.
"""

import copy
from pathlib import Path

import pytest
import torch
from peft import ArrowConfig, create_arrow_model

from quiver.library import ArrowRouter, ExpertLibrary, RoutingSettings
from tests.factories import TINY_VOCAB, edit_weights, make_adapter, tiny_llama

SPECTRUM = torch.tensor([4.0, 1.0, 0.5, 0.25])
TARGETS = ("q_proj", "v_proj", "down_proj")


def _decaying(tensors: dict, seed: int) -> None:
    """Replace every module's factors with ones whose update has singular values SPECTRUM."""
    generator = torch.Generator().manual_seed(seed)
    for key in [key for key in tensors if key.endswith("lora_A.weight")]:
        lora_a = tensors[key]
        lora_b_key = key.replace("lora_A", "lora_B")
        rank, d_in = lora_a.shape
        d_out = tensors[lora_b_key].shape[0]
        q, _ = torch.linalg.qr(torch.randn(d_in, rank, generator=generator))  # (D_in, R) orthonormal
        u, _ = torch.linalg.qr(torch.randn(d_out, rank, generator=generator))  # (D_out, R) orthonormal
        tensors[key] = (SPECTRUM[:rank, None] * q.T).contiguous()
        tensors[lora_b_key] = u.contiguous()


def _experts(model, folder: Path, count: int) -> list[Path]:
    paths = []
    for index in range(count):
        path = make_adapter(model, folder / f"expert-{index}", seed=index, rank=4, alpha=4, target_modules=TARGETS)
        edit_weights(path, lambda tensors, seed=index: _decaying(tensors, seed))
        paths.append(path)
    return paths


def _compare(model, paths, tmp_path, input_ids, top_k, temperature):
    peft_model = create_arrow_model(
        copy.deepcopy(model), [str(path) for path in paths], ArrowConfig(top_k=top_k, router_temperature=temperature, rng_seed=0)
    ).eval()
    library = ExpertLibrary(tmp_path / "library", model)
    for index, path in enumerate(paths):
        library.add(f"expert-{index}", path)
    with torch.no_grad():
        base = model(input_ids=input_ids).logits
        expected = peft_model(input_ids=input_ids).logits
    router = ArrowRouter(model)
    router.load_experts([library.load(name) for name in library.names()], library.revision)
    with torch.no_grad(), router.routing(RoutingSettings(method="arrow", top_k=top_k, temperature=temperature)):
        routed = model(input_ids=input_ids).logits
    return base, expected, routed


@pytest.mark.parametrize(("top_k", "temperature"), [(1, 1.0), (2, 1.0), (3, 0.5)], ids=["top-1", "top-2", "top-3-cold"])
def test_tiny_model_matches_peft_arrow(tmp_path, top_k, temperature):
    model = tiny_llama()
    paths = _experts(model, tmp_path, count=4)
    input_ids = torch.randint(0, TINY_VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))

    base, expected, routed = _compare(model, paths, tmp_path, input_ids, top_k, temperature)

    assert (routed - expected).abs().max().item() <= 1e-4
    assert (routed - base).abs().max().item() > 1e-2


@pytest.mark.real_model
def test_embedded_model_matches_peft_arrow(tmp_path):
    from quiver.library import load_base_model

    model, tokenizer = load_base_model()
    paths = _experts(model, tmp_path, count=3)
    input_ids = tokenizer("Reverse the words: the cat sat on the mat\nAnswer:", return_tensors="pt")["input_ids"]

    base, expected, routed = _compare(model, paths, tmp_path, input_ids, top_k=2, temperature=1.0)

    assert (routed - expected).abs().max().item() <= 1e-3  # 30 layers of float32 rounding in two orders
    assert (routed - base).abs().max().item() > 1e-2
