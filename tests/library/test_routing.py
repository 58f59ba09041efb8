"""Routed layers: agreement with PEFT, routing decisions and the weighted sum."""

import copy

import pytest
import torch
from peft import PeftModel

from quiver.library import (
    ArrowRouter,
    ExpertLibrary,
    ExpertNotFoundError,
    InvalidRoutingError,
    RoutingRecorder,
    RoutingSettings,
)
from tests.factories import TINY_VOCAB, make_adapter, tiny_llama

MODULE = "model.layers.0.self_attn.q_proj"


@pytest.fixture
def model():
    return tiny_llama()


def _routed(model, library, names=None):
    router = ArrowRouter(model)
    names = library.names() if names is None else names
    router.load_experts([library.load(name) for name in names], library.revision)
    return router


def _peft_logits(model, adapter, input_ids):
    reference = PeftModel.from_pretrained(copy.deepcopy(model), adapter).eval()
    with torch.no_grad():
        return reference(input_ids).logits


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"use_rslora": True},
        {"alpha_pattern": {"v_proj": 32}},
        {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], "rank": 2},
    ],
    ids=["plain", "rslora", "alpha-pattern", "all-linear-rank-2"],
)
def test_one_expert_matches_peft(model, tmp_path, config):
    adapter = make_adapter(model, tmp_path / "adapter", **config)
    # 2 × 40 tokens take the grouped path, whose matrix products round exactly as PEFT's do.
    input_ids = torch.randint(0, TINY_VOCAB, (2, 40), generator=torch.Generator().manual_seed(0))
    expected = _peft_logits(model, adapter, input_ids)
    with torch.no_grad():
        base_logits = model(input_ids).logits
    library = ExpertLibrary(tmp_path / "library", model)
    library.add("only", adapter)

    router = _routed(model, library)
    with torch.no_grad(), router.routing(RoutingSettings()):
        routed_logits = model(input_ids).logits

    assert (routed_logits - expected).abs().max().item() < 1e-5
    assert (routed_logits - base_logits).abs().max().item() > 1e-3


def test_empty_scope_is_base_model(model, tmp_path):
    input_ids = torch.randint(0, TINY_VOCAB, (1, 6))
    with torch.no_grad():
        base_logits = model(input_ids).logits
    library = ExpertLibrary(tmp_path / "library", model)
    library.add("only", make_adapter(model, tmp_path / "adapter"))

    router = _routed(model, library)
    with torch.no_grad(), router.routing(RoutingSettings(experts=())):
        routed_logits = model(input_ids).logits

    assert torch.equal(routed_logits, base_logits)


@pytest.fixture
def two_expert_layer(model, tmp_path):
    library = ExpertLibrary(tmp_path / "library", model)
    library.add("first", make_adapter(model, tmp_path / "first", seed=1))
    library.add("second", make_adapter(model, tmp_path / "second", seed=2))
    router = _routed(model, library)
    return router, router.layers[MODULE], library


@pytest.mark.parametrize("target", ["first", "second"])
def test_aligned_token_routed_to_expert(two_expert_layer, target):
    router, layer, library = two_expert_layer
    prototype = library.load(target).prototypes[MODULE]
    token = (10.0 * prototype).reshape(1, 1, -1)  # (B, T, D_in)
    recorder = RoutingRecorder()

    with torch.no_grad(), router.routing(RoutingSettings(top_k=1), recorder):
        layer(token)

    assert recorder.top1_shares()[target] == 1.0
    assert recorder.mean_weights()[target] == 1.0


def test_routed_output_is_weighted_sum(model, tmp_path):
    library = ExpertLibrary(tmp_path / "library", model)
    for seed, name in enumerate(["a", "b", "c"]):
        library.add(name, make_adapter(model, tmp_path / name, seed=seed, alpha=4 * (seed + 1)))
    router = _routed(model, library)
    layer = router.layers[MODULE]
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(3))  # (B, T, D_in)
    temperature = 0.5

    with torch.no_grad(), router.routing(RoutingSettings(top_k=2, temperature=temperature)):
        routed = layer(x)

    # The same computation, written out token by token.
    experts = [library.load(name) for name in ["a", "b", "c"]]
    expected = layer.base(x).clone()
    for b in range(2):
        for t in range(5):
            token = x[b, t]
            logits = torch.stack([(expert.prototypes[MODULE] @ token).abs() / temperature for expert in experts])
            top = torch.topk(logits, 2)
            weights = torch.softmax(top.values, dim=0)
            for weight, index in zip(weights, top.indices):
                module = experts[index].modules[MODULE]
                expected[b, t] += weight * module.scale * (module.lora_b @ (module.lora_a @ token))
    assert (routed - expected).abs().max().item() < 1e-5


def test_top_k_clamped_to_experts(two_expert_layer):
    router, layer, _ = two_expert_layer
    x = torch.randn(1, 4, 32)

    with torch.no_grad(), router.routing(RoutingSettings(top_k=2)):
        expected = layer(x)
    with torch.no_grad(), router.routing(RoutingSettings(top_k=8)):
        clamped = layer(x)

    assert torch.equal(clamped, expected)


def test_high_temperature_mixes_evenly(two_expert_layer):
    router, layer, _ = two_expert_layer
    recorder = RoutingRecorder()

    with torch.no_grad(), router.routing(RoutingSettings(top_k=2, temperature=1e6), recorder):
        layer(torch.randn(1, 4, 32))

    weights = recorder.mean_weights()
    assert weights["first"] == pytest.approx(0.5, abs=1e-4)
    assert weights["second"] == pytest.approx(0.5, abs=1e-4)


def test_scope_limits_experts(two_expert_layer):
    router, layer, _ = two_expert_layer
    recorder = RoutingRecorder()

    with torch.no_grad(), router.routing(RoutingSettings(experts=("second",)), recorder):
        layer(torch.randn(1, 4, 32))

    assert recorder.mean_weights() == {"second": 1.0}


def test_recorder_sees_last_position_per_sequence(two_expert_layer):
    router, layer, _ = two_expert_layer
    recorder = RoutingRecorder()

    with torch.no_grad(), router.routing(RoutingSettings(), recorder):
        layer(torch.randn(3, 7, 32))

    assert recorder.decisions == 3


def test_unknown_expert_in_scope(two_expert_layer):
    router, _, _ = two_expert_layer

    with pytest.raises(ExpertNotFoundError, match="'third' not found"):
        with router.routing(RoutingSettings(experts=("third",))):
            pass


@pytest.mark.parametrize(("top_k", "temperature"), [(0, 1.0), (-1, 1.0), (2, 0.0), (2, -1.0), (2, float("nan"))])
def test_invalid_settings_rejected(top_k, temperature):
    with pytest.raises(InvalidRoutingError):
        RoutingSettings(top_k=top_k, temperature=temperature)


def test_reload_replaces_experts(model, tmp_path):
    library = ExpertLibrary(tmp_path / "library", model)
    library.add("first", make_adapter(model, tmp_path / "first", seed=1))
    library.add("second", make_adapter(model, tmp_path / "second", seed=2))
    router = _routed(model, library)

    library.remove("first")
    router.load_experts([library.load(name) for name in library.names()], library.revision)

    assert router.expert_names == ["second"]
    assert router.layers[MODULE].expert_names == ["second"]
    assert router.revision == library.revision


def test_experts_with_different_modules(model, tmp_path):
    library = ExpertLibrary(tmp_path / "library", model)
    library.add("attention", make_adapter(model, tmp_path / "attention", target_modules=["q_proj"]))
    library.add("mlp", make_adapter(model, tmp_path / "mlp", target_modules=["down_proj"]))
    router = _routed(model, library)

    assert router.layers[MODULE].expert_names == ["attention"]
    assert router.layers["model.layers.0.mlp.down_proj"].expert_names == ["mlp"]
    with torch.no_grad(), router.routing(RoutingSettings()):
        model(torch.randint(0, TINY_VOCAB, (1, 5)))


def test_module_shapes_unchanged_by_routing(model, tmp_path):
    from quiver.library import linear_module_shapes

    before = linear_module_shapes(model)
    library = ExpertLibrary(tmp_path / "library", model)
    library.add("only", make_adapter(model, tmp_path / "adapter"))
    _routed(model, library)

    assert linear_module_shapes(model) == before
