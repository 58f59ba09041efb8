"""The stacked, sparse routed layers against the plain reference, PEFT, and per-row settings."""

import copy

import pytest
import torch
from peft import PeftModel

from quiver.library import ArrowRouter, ExpertLibrary, RoutingRecorder, RoutingSettings
from quiver.library import routing as routing_module
from tests.factories import TINY_VOCAB, make_adapter, tiny_llama

NAMES = ("low", "mid", "high")
RANKS = (2, 4, 8)
MODULE = "model.layers.0.self_attn.q_proj"


@pytest.fixture
def setup(tmp_path):
    """A tiny model routed across three experts of ranks 2, 4 and 8 (mixed ranks are zero-padded)."""
    model = tiny_llama()
    base = copy.deepcopy(model)
    library = ExpertLibrary(tmp_path / "library", model)
    adapters = {}
    for seed, (name, rank) in enumerate(zip(NAMES, RANKS), start=1):
        adapters[name] = make_adapter(model, tmp_path / name, seed=seed, rank=rank, alpha=2 * rank)
        library.add(name, adapters[name])
    router = ArrowRouter(model)
    router.load_experts([library.load(name) for name in NAMES], library.revision)
    return model, base, router, adapters


@pytest.mark.parametrize("tokens", [5, 200], ids=["gathered", "grouped"])
@pytest.mark.parametrize(
    "settings",
    [RoutingSettings(top_k=1), RoutingSettings(top_k=2, temperature=0.3), RoutingSettings(top_k=3), RoutingSettings(top_k=2, experts=("low", "high"))],
    ids=["top-1", "top-2-cold", "top-3", "scoped"],
)
def test_sparse_layer_matches_reference(setup, tokens, settings):
    _, _, router, _ = setup
    layer = router.layers[MODULE]
    x = torch.randn(1, tokens, layer.in_features, generator=torch.Generator().manual_seed(tokens))

    with torch.no_grad(), router.routing(settings):
        router.reference = True
        expected = layer(x)
        router.reference = False
        sparse = layer(x)

    assert (sparse - expected).abs().max().item() <= 1e-5
    assert (sparse - layer.base(x)).abs().max().item() > 1e-3


def test_stacks_padded_to_largest_rank(setup):
    _, _, router, _ = setup
    layer = router.layers[MODULE]

    assert tuple(layer.lora_a.shape) == (3, 8, layer.in_features)
    assert tuple(layer.lora_b.shape) == (3, layer.out_features, 8)
    assert layer.lora_a[0, 2:].abs().sum().item() == 0.0  # rank 2, padded with zeros


def test_fixed_expert_matches_peft(setup):
    model, base, router, adapters = setup
    reference = PeftModel.from_pretrained(copy.deepcopy(base), adapters["mid"]).eval()
    input_ids = torch.randint(0, TINY_VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))

    with torch.no_grad(), router.routing(RoutingSettings(weights=(("mid", 1.0),))):
        fixed = model(input_ids).logits
    with torch.no_grad():
        expected = reference(input_ids).logits

    assert (fixed - expected).abs().max().item() <= 1e-5


def test_merge_matches_weighted_peft_outputs(setup):
    """A fixed merge gives each layer the weighted sum of the experts' PEFT outputs."""
    _, base, router, adapters = setup
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), adapters["low"], adapter_name="low").eval()
    peft_model.load_adapter(adapters["high"], adapter_name="high")
    peft_layer = peft_model.get_submodule(f"base_model.model.{MODULE}")
    layer = router.layers[MODULE]
    x = torch.randn(1, 30, layer.in_features, generator=torch.Generator().manual_seed(2))
    weights = {"low": 0.7, "high": -0.2}

    with torch.no_grad():
        plain = peft_layer.base_layer(x)
        expected = plain.clone()
        for name, weight in weights.items():
            peft_model.set_adapter(name)
            expected += weight * (peft_layer(x) - plain)
        with router.routing(RoutingSettings(weights=tuple(weights.items()))):
            merged = layer(x)

    assert (merged - expected).abs().max().item() <= 1e-5


def test_rows_with_different_settings_share_a_batch(setup):
    model, _, router, _ = setup
    input_ids = torch.randint(0, TINY_VOCAB, (3, 50), generator=torch.Generator().manual_seed(3))
    rows = [
        RoutingSettings(top_k=2),
        RoutingSettings(weights=(("high", 1.0),)),
        RoutingSettings(weights=(("low", 0.5), ("mid", 0.5))),
    ]

    with torch.no_grad():
        with router.routing(rows):
            together = model(input_ids).logits
        alone = []
        for row, settings in enumerate(rows):
            with router.routing(settings):
                alone.append(model(input_ids[row : row + 1]).logits)

    for row in range(3):
        assert (together[row] - alone[row][0]).abs().max().item() <= 1e-5


def test_sequence_method_per_row(setup):
    model, _, router, _ = setup
    router.set_input_means({name: torch.zeros(layer.in_features) for name, layer in router.layers.items()})
    input_ids = torch.randint(0, TINY_VOCAB, (2, 12), generator=torch.Generator().manual_seed(4))
    rows = [RoutingSettings(method="sequence", pooling="vote", top_k=1), RoutingSettings(top_k=1, experts=("mid",))]

    with torch.no_grad():
        with router.routing(rows):
            router.score_prompt(input_ids)
            together = model(input_ids).logits
        with router.routing(rows[0]):
            router.score_prompt(input_ids[:1])
            first = model(input_ids[:1]).logits

    assert (together[0] - first[0]).abs().max().item() <= 1e-5


def test_recorder_sums_to_one_with_row_groups(setup):
    model, _, router, _ = setup
    recorder = RoutingRecorder()
    rows = [RoutingSettings(top_k=2), RoutingSettings(top_k=1, experts=("low",))]

    with torch.no_grad(), router.routing(rows, recorder):
        model(torch.randint(0, TINY_VOCAB, (2, 6)))

    assert sum(recorder.mean_weights().values()) == pytest.approx(1.0, abs=1e-5)


def test_gather_threshold_is_respected(setup, monkeypatch):
    """Both sparse paths agree, whichever the batch size selects."""
    _, _, router, _ = setup
    layer = router.layers[MODULE]
    x = torch.randn(40, layer.in_features, generator=torch.Generator().manual_seed(5))
    index = torch.randint(0, 3, (40, 2), generator=torch.Generator().manual_seed(6))
    weights = torch.rand(40, 2, generator=torch.Generator().manual_seed(7))

    monkeypatch.setattr(routing_module, "GATHER_MAX_PAIRS", 10**6)
    gathered = layer._sparse_update(x, index, weights)
    monkeypatch.setattr(routing_module, "GATHER_MAX_PAIRS", 0)
    grouped = layer._sparse_update(x, index, weights)

    assert (gathered - grouped).abs().max().item() <= 1e-5


def test_fixed_weights_validated():
    from quiver.library import InvalidRoutingError

    with pytest.raises(InvalidRoutingError, match="twice"):
        RoutingSettings(weights=(("a", 0.5), ("a", 0.5)))
    with pytest.raises(InvalidRoutingError, match="finite"):
        RoutingSettings(weights=(("a", float("nan")),))


def test_unknown_fixed_expert_is_not_found(setup):
    from quiver.library import ExpertNotFoundError

    _, _, router, _ = setup
    with pytest.raises(ExpertNotFoundError, match="'ghost'"), router.routing(RoutingSettings(weights=(("ghost", 1.0),))):
        pass

