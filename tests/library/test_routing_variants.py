"""Routing variants against hand computations, and the base-model statistics they use."""

import pytest
import torch

from quiver.library import ArrowRouter, ExpertLibrary, InvalidRoutingError, RoutingSettings
from quiver.library import statistics
from quiver.library.statistics import STATS_FILE, compute_input_means, load_or_compute_input_means
from tests.factories import TINY_VOCAB, make_adapter, tiny_llama, tiny_tokenizer

MODULE = "model.layers.1.self_attn.q_proj"
NAMES = ["a", "b", "c"]


@pytest.fixture
def routed(tmp_path):
    model = tiny_llama()
    library = ExpertLibrary(tmp_path / "library", model)
    for seed, name in enumerate(NAMES):
        library.add(name, make_adapter(model, tmp_path / name, seed=seed, alpha=4 * (seed + 1)))
    router = ArrowRouter(model)
    router.load_experts([library.load(name) for name in NAMES], library.revision)
    with torch.no_grad(), router.routing(RoutingSettings(experts=())):
        router.set_input_means(load_or_compute_input_means(library.root, model, tiny_tokenizer()))
    return model, router, library


def _hand_output(layer, library, x, logits_of, top_k, temperature):
    """The routed layer's output for tokens x (B, T, D_in), written out token by token."""
    experts = [library.load(name) for name in NAMES]
    expected = layer.base(x).clone()
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            token = x[b, t]
            logits = logits_of(b, token, [expert.prototypes[MODULE] for expert in experts]) / temperature
            top = torch.topk(logits, top_k)
            for weight, index in zip(torch.softmax(top.values, dim=0), top.indices):
                module = experts[index].modules[MODULE]
                expected[b, t] += weight * module.scale * (module.lora_b @ (module.lora_a @ token))
    return expected


def _centered(layer):
    def logits_of(b, token, prototypes):
        centered = token - layer.input_mean
        return torch.stack([(prototype @ centered).abs() for prototype in prototypes])

    return logits_of


def _normalized(layer):
    def logits_of(b, token, prototypes):
        centered = token - layer.input_mean
        return torch.stack([(prototype @ centered).abs() / centered.norm() for prototype in prototypes])

    return logits_of


@pytest.mark.parametrize(("method", "logits_factory"), [("centered", _centered), ("normalized", _normalized)])
def test_token_methods_match_hand(routed, method, logits_factory):
    _, router, library = routed
    layer = router.layers[MODULE]
    x = torch.randn(2, 4, 32, generator=torch.Generator().manual_seed(1))

    with torch.no_grad(), router.routing(RoutingSettings(method=method, top_k=2, temperature=0.3)):
        routed_output = layer(x)

    expected = _hand_output(layer, library, x, logits_factory(layer), top_k=2, temperature=0.3)
    assert (routed_output - expected).abs().max().item() < 1e-5


def test_input_mean_is_nonzero(routed):
    _, router, _ = routed

    assert router.layers[MODULE].input_mean.norm().item() > 0


def _prompt_inputs(model, input_ids, mask):
    """Inputs (B, T, D_in) that MODULE receives from the base model for the given prompts."""
    captured = {}
    layer = model.get_submodule(MODULE)
    handle = layer.base.register_forward_pre_hook(lambda module, inputs: captured.setdefault("x", inputs[0].detach()))
    try:
        model(input_ids=input_ids, attention_mask=mask)
    finally:
        handle.remove()
    return captured["x"]


@pytest.fixture
def prompts():
    generator = torch.Generator().manual_seed(2)
    input_ids = torch.randint(3, TINY_VOCAB, (2, 6), generator=generator)
    mask = torch.ones_like(input_ids)
    mask[1, :2] = 0  # the second prompt is left-padded by two tokens
    return input_ids, mask


def _pooled_scores(layer, x, mask):
    prototypes = layer.prototypes  # (E, D_in)
    pooled = []
    for b in range(x.shape[0]):
        tokens = x[b][mask[b].bool()]  # (T_b, D_in)
        centered = tokens - layer.input_mean
        scores = (centered @ prototypes.T).abs() / centered.norm(dim=-1, keepdim=True)
        pooled.append(scores.mean(dim=0))
    return torch.stack(pooled)  # (B, E)


def test_sequence_module_pooling_matches_hand(routed, prompts):
    model, router, library = routed
    input_ids, mask = prompts
    layer = router.layers[MODULE]
    with torch.no_grad(), router.routing(RoutingSettings(experts=())):
        x_prompt = _prompt_inputs(model, input_ids, mask)
    pooled = _pooled_scores(layer, x_prompt, mask)
    x = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(3))

    with torch.no_grad(), router.routing(RoutingSettings(method="sequence", top_k=2, temperature=0.1)):
        router.score_prompt(input_ids, mask)
        sequence_logits = layer.sequence_logits.clone()
        routed_output = layer(x)

    assert torch.allclose(sequence_logits, pooled, atol=1e-5)
    expected = _hand_output(layer, library, x, lambda b, token, prototypes: pooled[b], top_k=2, temperature=0.1)
    assert (routed_output - expected).abs().max().item() < 1e-5


def test_sequence_vote_matches_hand(routed, prompts):
    model, router, _ = routed
    input_ids, mask = prompts
    with torch.no_grad(), router.routing(RoutingSettings(experts=())):
        captured = {}
        handles = [
            layer.base.register_forward_pre_hook(lambda module, inputs, name=name: captured.setdefault(name, inputs[0].detach()))
            for name, layer in router.layers.items()
        ]
        model(input_ids=input_ids, attention_mask=mask)
        for handle in handles:
            handle.remove()
    votes = torch.zeros(2, len(NAMES))
    for name, layer in router.layers.items():
        winners = _pooled_scores(layer, captured[name], mask).argmax(dim=-1)
        for b in range(2):
            votes[b, NAMES.index(layer.expert_names[winners[b]])] += 1
    shares = votes / votes.sum(dim=-1, keepdim=True)

    with torch.no_grad(), router.routing(RoutingSettings(method="sequence", pooling="vote")):
        router.score_prompt(input_ids, mask)
        for layer in router.layers.values():
            assert torch.allclose(layer.sequence_logits, shares, atol=1e-6)


def test_hybrid_matches_hand(routed, prompts):
    model, router, library = routed
    input_ids, mask = prompts
    layer = router.layers[MODULE]
    with torch.no_grad(), router.routing(RoutingSettings(experts=())):
        pooled = _pooled_scores(layer, _prompt_inputs(model, input_ids, mask), mask)
    x = torch.randn(2, 3, 32, generator=torch.Generator().manual_seed(4))
    token_logits = _normalized(layer)

    def hybrid(b, token, prototypes):
        return 0.25 * token_logits(b, token, prototypes) + 0.75 * pooled[b]

    with torch.no_grad(), router.routing(RoutingSettings(method="hybrid", sequence_weight=0.75, top_k=2, temperature=0.2)):
        router.score_prompt(input_ids, mask)
        routed_output = layer(x)

    expected = _hand_output(layer, library, x, hybrid, top_k=2, temperature=0.2)
    assert (routed_output - expected).abs().max().item() < 1e-5


def test_sequence_generation_runs(routed, prompts):
    model, router, _ = routed
    input_ids, mask = prompts

    with torch.no_grad(), router.routing(RoutingSettings(method="sequence", top_k=1)):
        router.score_prompt(input_ids, mask)
        output = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=1)

    assert output.shape == (2, 9)


def test_sequence_without_scores_rejected(routed):
    _, router, _ = routed

    with pytest.raises(Exception, match="score the prompt first"):
        with torch.no_grad(), router.routing(RoutingSettings(method="sequence")):
            router.layers[MODULE](torch.randn(1, 2, 32))


def test_centered_without_statistics_rejected(tmp_path):
    model = tiny_llama()
    router = ArrowRouter(model)

    with pytest.raises(InvalidRoutingError, match="needs the base model's input statistics"):
        with router.routing(RoutingSettings(method="centered")):
            pass


@pytest.mark.parametrize(
    "settings",
    [{"method": "magic"}, {"pooling": "mean"}, {"sequence_weight": 1.5}, {"sequence_weight": -0.1}],
)
def test_invalid_variant_settings_rejected(settings):
    with pytest.raises(InvalidRoutingError):
        RoutingSettings(**settings)


def test_statistics_reused_for_same_model(tmp_path, monkeypatch):
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    first = load_or_compute_input_means(tmp_path, model, tokenizer)

    def fail(*args, **kwargs):
        raise AssertionError("statistics were recomputed")

    monkeypatch.setattr(statistics, "compute_input_means", fail)
    second = load_or_compute_input_means(tmp_path, model, tokenizer)

    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_statistics_recomputed_for_new_model(tmp_path):
    tokenizer = tiny_tokenizer()
    first = load_or_compute_input_means(tmp_path, tiny_llama(seed=0), tokenizer)
    stored = (tmp_path / STATS_FILE).read_bytes()

    second = load_or_compute_input_means(tmp_path, tiny_llama(seed=1), tokenizer)

    assert (tmp_path / STATS_FILE).read_bytes() != stored
    assert not torch.allclose(first[MODULE], second[MODULE])


def test_statistics_ignore_padding():
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    texts = ["a short one", "a much longer text with many more tokens in it"]

    batched = compute_input_means(model, tokenizer, texts, batch_size=2)
    single = compute_input_means(model, tokenizer, texts, batch_size=1)

    assert all(torch.allclose(batched[name], single[name], atol=1e-5) for name in batched)
