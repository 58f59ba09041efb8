"""End to end with the embedded SmolLM2-135M-Instruct: a live server, the real client, real adapters."""

import pytest

from quiver.client import Client, NotFoundError
from quiver.library import DEFAULT_MODEL_NAME, load_base_model
from quiver.server import Settings, create_app
from tests.factories import make_adapter
from tests.live_server import serve

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Two rank-4 LoRA adapters for the embedded model, with random non-zero factors."""
    model, _ = load_base_model(device="cpu")
    folder = tmp_path_factory.mktemp("adapters")
    attention = make_adapter(model, folder / "attention", seed=1, target_modules=["q_proj", "v_proj"], alpha=1)
    mlp = make_adapter(model, folder / "mlp", seed=2, target_modules=["q_proj", "down_proj"], alpha=1)
    del model
    return attention, mlp


def test_upload_generate_delete(adapters, tmp_path):
    attention, mlp = adapters
    settings = Settings.from_env(library_dir=tmp_path / "library", device="cpu")

    with serve(create_app(settings), timeout=300) as base_url, Client(base_url, timeout=300) as client:
        health = client.health()
        assert health.base_model == DEFAULT_MODEL_NAME
        assert health.experts == 0

        client.upload_expert(attention, name="attention", task="random attention update")
        client.upload_expert(mlp, name="mlp", task="random mlp update")
        assert [expert.name for expert in client.list_experts()] == ["attention", "mlp"]

        routed = client.generate("The capital of France is", max_new_tokens=8)
        assert routed.details.generated_tokens >= 1
        assert set(routed.details.routing) == {"attention", "mlp"}
        assert sum(routed.details.routing.values()) == pytest.approx(1.0, abs=1e-3)

        base = client.generate("The capital of France is", max_new_tokens=8, routing={"experts": []})
        assert base.details.routing == {}
        assert base.generated_text.strip()

        client.delete_expert("attention")
        with pytest.raises(NotFoundError):
            client.generate("The capital of France is", max_new_tokens=2, routing={"experts": ["attention"]})
        only_mlp = client.generate("The capital of France is", max_new_tokens=2)
        assert only_mlp.details.routing == {"mlp": 1.0}

        client.delete_expert("mlp")
        assert client.list_experts() == []
