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

    with serve(create_app(settings), timeout=300) as base_url, Client(base_url=base_url, timeout=300) as client:
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


def test_concurrent_requests_match_transformers_generate(adapters, tmp_path):
    """Requests of different lengths and settings, generated together, each match their solo output."""
    import threading

    import openai

    attention, _ = adapters
    settings = Settings.from_env(library_dir=tmp_path / "library", device="cpu", max_batch_size=8)
    prompts = ["What is the capital of France?", "List three colors:", "2+2=", "Write a haiku about the sea and the moon."]

    with serve(create_app(settings), timeout=300) as base_url, Client(base_url=base_url, timeout=300) as client:
        engine_model, tokenizer = load_base_model(device="cpu")
        expected = []
        for prompt in prompts:
            encoded = tokenizer(prompt, return_tensors="pt")
            output = engine_model.generate(**encoded, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            expected.append(tokenizer.decode(output[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True))
        client.upload_expert(attention, name="attention")
        alone = client.generate(prompts[0], max_new_tokens=16, adapter_id="attention").generated_text

        answers: dict[int, str] = {}

        def ask(index: int) -> None:
            if index == len(prompts):
                answers[index] = client.generate(prompts[0], max_new_tokens=16, adapter_id="attention").generated_text
            else:
                answers[index] = client.generate(prompts[index], max_new_tokens=16, routing={"experts": []}).generated_text

        threads = [threading.Thread(target=ask, args=(index,)) for index in range(len(prompts) + 1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)

        messages = [{"role": "user", "content": "Say hello."}]
        rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        chat = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0).chat.completions.create(
            model="quiver", messages=messages, max_tokens=8, temperature=0
        )

    assert [answers[index] for index in range(len(prompts))] == expected
    assert answers[len(prompts)] == alone
    assert chat.choices[0].message.content.strip()
    assert chat.usage.prompt_tokens == len(tokenizer(rendered, add_special_tokens=False)["input_ids"])
