"""The HTTP API over a tiny model: experts, generation and errors, through real HTTP."""

import httpx
import pytest

from quiver.client import Client, ConflictError, InvalidExpertError, InvalidRequestError, NotFoundError
from tests.factories import edit_weights, library_snapshot, make_adapter, tiny_llama


@pytest.fixture
def client(base_url):
    with Client(base_url=base_url, timeout=60) as client:
        yield client


@pytest.fixture
def adapter(engine, tmp_path):
    return make_adapter(tiny_llama(), tmp_path / "adapter", seed=1)


def _upload_raw(base_url, adapter, **form):
    files = {
        "adapter_config": ("adapter_config.json", (adapter / "adapter_config.json").read_bytes()),
        "adapter_model": ("adapter_model.safetensors", (adapter / "adapter_model.safetensors").read_bytes()),
    }
    return httpx.post(f"{base_url}/experts", data=form, files=files, timeout=60)


def test_health(client):
    health = client.health()

    assert health.status == "ok"
    assert health.base_model == "tiny-llama"
    assert health.device == "cpu"
    assert health.experts == 0
    assert health.routing == {"method": "sequence", "pooling": "vote", "top_k": 1, "temperature": 1.0}


def test_upload_list_get_delete(client, adapter):
    created = client.upload_expert(adapter, name="math", task="arithmetic", description="adds")

    assert created.name == "math"
    assert created.task == "arithmetic"
    assert created.rank == 4
    assert [expert.name for expert in client.list_experts()] == ["math"]
    assert client.get_expert("math") == created

    client.delete_expert("math")
    assert client.list_experts() == []


def test_upload_answers_201(base_url, adapter):
    response = _upload_raw(base_url, adapter, name="math")

    assert response.status_code == 201
    assert response.json()["name"] == "math"
    assert response.headers["X-Request-ID"]


def test_generate_routes_across_experts(client, tmp_path):
    client.upload_expert(make_adapter(tiny_llama(), tmp_path / "one", seed=1), name="one")
    client.upload_expert(make_adapter(tiny_llama(), tmp_path / "two", seed=2), name="two")

    answer = client.generate("hello world", max_new_tokens=5)

    assert answer.details.generated_tokens >= 1
    assert answer.details.finish_reason in ("length", "eos_token")
    assert set(answer.details.routing) == {"one", "two"}
    assert sum(answer.details.routing.values()) == pytest.approx(1.0, abs=1e-4)


def test_generate_with_one_expert_in_scope(client, tmp_path):
    client.upload_expert(make_adapter(tiny_llama(), tmp_path / "one", seed=1), name="one")
    client.upload_expert(make_adapter(tiny_llama(), tmp_path / "two", seed=2), name="two")

    answer = client.generate("hello", max_new_tokens=3, routing={"experts": ["two"]})

    assert answer.details.routing == {"two": 1.0}


def test_generate_base_model_alone(client, adapter):
    client.upload_expert(adapter, name="math")

    answer = client.generate("hello", max_new_tokens=3, routing={"experts": []})

    assert answer.details.routing == {}


def test_generate_sees_new_expert(client, tmp_path):
    client.upload_expert(make_adapter(tiny_llama(), tmp_path / "one", seed=1), name="one")
    client.generate("hello", max_new_tokens=2)

    client.upload_expert(make_adapter(tiny_llama(), tmp_path / "two", seed=2), name="two")
    answer = client.generate("hello", max_new_tokens=2, routing={"experts": ["two"]})

    assert answer.details.routing == {"two": 1.0}


def test_greedy_generation_is_deterministic(client, adapter):
    client.upload_expert(adapter, name="math")

    first = client.generate("abc", max_new_tokens=6)
    second = client.generate("abc", max_new_tokens=6)

    assert first == second


def test_sampling_with_seed_repeats(client, adapter):
    client.upload_expert(adapter, name="math")
    parameters = {"max_new_tokens": 8, "do_sample": True, "temperature": 1.5, "top_p": 0.95, "seed": 7}

    first = client.generate("abc", **parameters)
    second = client.generate("abc", **parameters)

    assert first.generated_text == second.generated_text


def test_unknown_expert_is_404(client, base_url):
    with pytest.raises(NotFoundError, match="'ghost' not found") as raised:
        client.get_expert("ghost")
    assert raised.value.code == "expert_not_found"

    with pytest.raises(NotFoundError):
        client.delete_expert("ghost")
    with pytest.raises(NotFoundError):
        client.generate("hello", routing={"experts": ["ghost"]})


def test_duplicate_name_is_409(client, adapter, settings):
    client.upload_expert(adapter, name="math")
    before = library_snapshot(settings.library_dir)

    with pytest.raises(ConflictError, match="already exists") as raised:
        client.upload_expert(adapter, name="math")

    assert raised.value.status_code == 409
    assert library_snapshot(settings.library_dir) == before


def _rename_module(tensors):
    for key in list(tensors):
        if "layers.0.self_attn.q_proj" in key:
            tensors[key.replace("layers.0", "layers.9")] = tensors.pop(key)


def _widen(tensors):
    import torch

    tensors["base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight"] = torch.randn(4, 40)


def _zero(tensors):
    import torch

    for key in tensors:
        if "lora_B" in key:
            tensors[key] = torch.zeros_like(tensors[key])


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_rename_module, "[model.layers.9.self_attn.q_proj] module not found"),
        (_widen, "[model.layers.0.self_attn.v_proj] lora_A shape (4, 40)"),
        (_zero, "zero in every module"),
    ],
    ids=["missing-module", "shape-mismatch", "zero-update"],
)
def test_invalid_adapter_is_422(client, adapter, settings, edit, message):
    client.upload_expert(adapter, name="kept")
    broken = adapter.parent / "broken"
    broken.mkdir()
    for file in adapter.iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    edit_weights(broken, edit)
    before = library_snapshot(settings.library_dir)

    with pytest.raises(InvalidExpertError) as raised:
        client.upload_expert(broken, name="broken")

    assert raised.value.status_code == 422
    assert raised.value.code == "invalid_expert"
    assert any(message in problem for problem in raised.value.problems)
    assert library_snapshot(settings.library_dir) == before


def test_invalid_name_is_422(base_url, adapter, settings):
    before = library_snapshot(settings.library_dir)

    response = _upload_raw(base_url, adapter, name="no spaces allowed")

    assert response.status_code == 422
    assert "'no spaces allowed' is invalid" in response.json()["detail"]
    assert library_snapshot(settings.library_dir) == before


def test_upload_without_weights_is_422(base_url, adapter):
    files = {"adapter_config": ("adapter_config.json", (adapter / "adapter_config.json").read_bytes())}

    response = httpx.post(f"{base_url}/experts", data={"name": "math"}, files=files)

    assert response.status_code == 422
    assert response.json()["code"] == "invalid_expert"
    assert "no adapter_model file" in response.json()["detail"]


def test_upload_too_large_is_413(base_url, settings, tmp_path):
    files = {
        "adapter_config": ("adapter_config.json", b"{}"),
        "adapter_model": ("adapter_model.safetensors", b"\x00" * (settings.max_upload_mb * 2**20 + 1)),
    }

    response = httpx.post(f"{base_url}/experts", data={"name": "big"}, files=files)

    assert response.status_code == 413
    assert response.json()["code"] == "upload_too_large"


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"{not json", "not valid JSON"),
        (b"[]", "body"),
        (b'{"parameters": {}}', "body.inputs"),
        (b'{"inputs": "hi", "parameters": {"max_new_tokens": 0}}', "body.parameters.max_new_tokens"),
        (b'{"inputs": "hi", "parameters": {"routing": {"top_k": 0}}}', "body.parameters.routing.top_k"),
        (b'{"inputs": "hi", "parameters": {"routing": {"temperature": -1}}}', "body.parameters.routing.temperature"),
        (b'{"inputs": "hi", "parameters": {"max_tokens": 5}}', "body.parameters.max_tokens"),
        (b'{"inputs": "hi", "parameters": {"seed": 9223372036854775808}}', "body.parameters.seed"),
        (b'{"inputs": "hi", "parameters": {"do_sample": true, "temperature": 1e-45}}', "body.parameters.temperature"),
        (b'{"inputs": "hi", "parameters": {"routing": {"temperature": 1e-300}}}', "body.parameters.routing.temperature"),
    ],
    ids=[
        "malformed", "not-object", "no-inputs", "zero-tokens", "zero-top-k", "negative-temperature", "unknown-field",
        "seed-overflow", "tiny-sampling-temperature", "tiny-routing-temperature",
    ],
)
def test_bad_generate_body_is_422(base_url, body, problem):
    response = httpx.post(f"{base_url}/generate", content=body, headers={"Content-Type": "application/json"})

    assert response.status_code == 422
    payload = response.json()
    assert payload["code"] == "invalid_request"
    assert payload["request_id"] == response.headers["X-Request-ID"]
    assert problem in payload["detail"]


def test_request_too_large_is_422(client, settings):
    with pytest.raises(InvalidRequestError, match="at most 64"):
        client.generate("hello", max_new_tokens=65)
    with pytest.raises(InvalidRequestError, match="at most 100"):
        client.generate("a" * 101)


def test_request_id_echoed_when_valid(base_url):
    kept = httpx.get(f"{base_url}/health", headers={"X-Request-ID": "trace-42"})
    replaced = httpx.get(f"{base_url}/health", headers={"X-Request-ID": "x" * 500})

    assert kept.headers["X-Request-ID"] == "trace-42"
    assert len(replaced.headers["X-Request-ID"]) == 32


def test_huge_prompt_rejected_quickly(client):
    with pytest.raises(InvalidRequestError, match="characters"):
        client.generate("a" * 100_000)


def test_unknown_route_uses_error_body(base_url):
    response = httpx.get(f"{base_url}/nowhere")

    assert response.status_code == 404
    assert response.json()["code"] == "not_found"


@pytest.mark.parametrize("method", ["centered", "normalized", "sequence", "hybrid"])
def test_generate_with_each_method(client, tmp_path, method):
    client.upload_expert(make_adapter(tiny_llama(), tmp_path / "one", seed=1), name="one")
    client.upload_expert(make_adapter(tiny_llama(), tmp_path / "two", seed=2), name="two")

    answer = client.generate("hello", max_new_tokens=3, routing={"method": method, "top_k": 1})

    assert answer.details.generated_tokens >= 1
    assert sum(answer.details.routing.values()) == pytest.approx(1.0, abs=1e-4)


def test_unknown_method_is_422(base_url):
    response = httpx.post(f"{base_url}/generate", json={"inputs": "hi", "parameters": {"routing": {"method": "magic"}}})

    assert response.status_code == 422
    assert "body.parameters.routing.method" in response.json()["detail"]
