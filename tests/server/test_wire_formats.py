"""Third-party clients from PyPI, unchanged, against a live server on a tiny model:
huggingface_hub's InferenceClient and lorax-client (TGI / LoRAX format), and the openai package."""

from __future__ import annotations

import json
import logging

import httpx
import lorax
import openai
import pytest
from huggingface_hub import InferenceClient
from prometheus_client.parser import text_string_to_metric_families

from quiver.server import create_app
from tests.factories import make_adapter, tiny_llama
from tests.live_server import serve


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server with two experts for the whole module: these tests only read."""
    from quiver.server import Settings
    from quiver.server.engine import Engine
    from tests.factories import tiny_tokenizer

    root = tmp_path_factory.mktemp("wire")
    settings = Settings(cache_dir=root / "cache", library_dir=root / "library", max_new_tokens=64, max_input_tokens=100)
    engine = Engine(settings, model=tiny_llama(), tokenizer=tiny_tokenizer())
    for seed, name in ((1, "one"), (2, "two")):
        engine.library.add(name, make_adapter(tiny_llama(), root / name, seed=seed))
    with serve(create_app(settings, engine=engine)) as url:
        yield url, engine
    engine.close()


@pytest.fixture
def url(server):
    return server[0]


def _generate(url: str, **parameters) -> dict:
    response = httpx.post(f"{url}/generate", json={"inputs": "hello world", "parameters": parameters}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


# -- huggingface_hub.InferenceClient -------------------------------------------------------------


def test_inference_client_text_generation(url):
    client = InferenceClient(base_url=url)

    text = client.text_generation("hello world", max_new_tokens=6)

    assert text == _generate(url, max_new_tokens=6)["generated_text"]


def test_inference_client_details(url):
    client = InferenceClient(base_url=url)

    output = client.text_generation("hello world", max_new_tokens=6, details=True, decoder_input_details=True)

    assert output.generated_text == _generate(url, max_new_tokens=6)["generated_text"]
    assert output.details.finish_reason in ("length", "eos_token")
    assert output.details.generated_tokens == len(output.details.tokens)
    assert "".join(token.text for token in output.details.tokens if not token.special) == output.generated_text
    assert all(token.logprob <= 0 for token in output.details.tokens)
    assert [token.text for token in output.details.prefill] == list("hello world")
    assert output.details.prefill[0].logprob is None


def test_inference_client_stream(url):
    client = InferenceClient(base_url=url)
    expected = _generate(url, max_new_tokens=8)["generated_text"]

    pieces = list(client.text_generation("hello world", max_new_tokens=8, stream=True))
    events = list(client.text_generation("hello world", max_new_tokens=8, stream=True, details=True))

    assert "".join(pieces) == expected
    assert events[-1].generated_text == expected
    assert events[-1].details.generated_tokens == len(events)
    assert events[-1].details.input_length == len("hello world")
    assert all(event.details is None for event in events[:-1])


def test_inference_client_same_seed_same_text(url):
    client = InferenceClient(base_url=url)
    options = {"max_new_tokens": 10, "do_sample": True, "temperature": 0.8, "top_p": 0.9, "seed": 3}

    assert client.text_generation("abc", **options) == client.text_generation("abc", **options)


def test_inference_client_stop_sequence(url):
    client = InferenceClient(base_url=url)
    full = _generate(url, max_new_tokens=20, ignore_eos_token=True)["generated_text"]
    stop = full[3:5]

    output = client.text_generation("hello world", max_new_tokens=20, stop=[stop], details=True)

    assert output.details.finish_reason == "stop_sequence"
    assert output.generated_text.endswith(stop)
    assert full.startswith(output.generated_text)


def test_inference_client_endpoint_info(url):
    # Endpoint info is read from the URL's /info for the provider that TGI endpoints run under.
    client = InferenceClient(model=url, provider="hf-inference")

    info = client.get_endpoint_info()

    assert info["model_id"] == "tiny-llama"
    assert info["max_input_tokens"] == 100
    assert info["experts"] == ["one", "two"]
    assert client.health_check()


def test_inference_client_error_names_the_problem(url):
    client = InferenceClient(base_url=url)

    with pytest.raises(Exception, match="max_new_tokens is 65; this server allows at most 64"):
        client.text_generation("hello", max_new_tokens=65)


# -- lorax-client ----------------------------------------------------------------------------


def test_lorax_generate_with_adapter(url):
    client = lorax.Client(url)

    response = client.generate("hello world", adapter_id="one", max_new_tokens=6)

    expected = _generate(url, max_new_tokens=6, adapter_id="one")
    assert response.generated_text == expected["generated_text"]
    assert response.details.generated_tokens == len(response.details.tokens)
    assert response.details.prompt_tokens == len("hello world")


def test_lorax_generate_stream_with_adapter(url):
    client = lorax.Client(url)
    expected = _generate(url, max_new_tokens=6, adapter_id="two")["generated_text"]

    responses = list(client.generate_stream("hello world", adapter_id="two", max_new_tokens=6))

    assert "".join(response.token.text for response in responses if not response.token.special) == expected
    assert responses[-1].generated_text == expected
    assert responses[-1].details.finish_reason in ("length", "eos_token")


def test_lorax_merged_adapters(url):
    client = lorax.Client(url)
    merged = lorax.types.MergedAdapters(ids=["one", "two"], weights=[0.5, 0.5], merge_strategy="linear", density=1.0)

    response = client.generate("hello world", merged_adapters=merged, max_new_tokens=6)

    expected = _generate(url, max_new_tokens=6, merged_adapters={"ids": ["one", "two"], "weights": [0.5, 0.5]})
    assert response.generated_text == expected["generated_text"]


def test_lorax_other_merge_strategy_is_rejected(url):
    client = lorax.Client(url)
    merged = lorax.types.MergedAdapters(ids=["one", "two"], weights=[0.5, 0.5], merge_strategy="ties", density=0.5)

    with pytest.raises(lorax.errors.ValidationError, match="merge_strategy 'ties' is not supported; use 'linear'"):
        client.generate("hello world", merged_adapters=merged, max_new_tokens=6)


def test_lorax_unknown_adapter_is_not_found(url):
    with pytest.raises(lorax.errors.NotFoundError, match="ghost"):
        lorax.Client(url).generate("hello", adapter_id="ghost")


# -- the openai package ----------------------------------------------------------------------


@pytest.fixture
def oai(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def test_openai_models_lists_library_experts(oai):
    assert [model.id for model in oai.models.list()] == ["quiver", "one", "two"]


def test_openai_completion_routed_and_one_expert(oai, url):
    routed = oai.completions.create(model="quiver", prompt="hello world", max_tokens=6, temperature=0)
    single = oai.completions.create(model="one", prompt="hello world", max_tokens=6, temperature=0)

    assert routed.choices[0].text == _generate(url, max_new_tokens=6)["generated_text"]
    assert single.choices[0].text == _generate(url, max_new_tokens=6, adapter_id="one")["generated_text"]
    assert routed.usage.prompt_tokens == len("hello world")
    assert routed.usage.completion_tokens <= 6


def test_openai_completion_stream(oai):
    whole = oai.completions.create(model="quiver", prompt="hello world", max_tokens=8, temperature=0).choices[0].text

    chunks = list(oai.completions.create(model="quiver", prompt="hello world", max_tokens=8, temperature=0, stream=True))

    assert "".join(chunk.choices[0].text for chunk in chunks) == whole
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_openai_stop_sequence_is_left_out(oai, url):
    full = _generate(url, max_new_tokens=20, ignore_eos_token=True)["generated_text"]
    stop = full[4:6]

    plain = oai.completions.create(model="quiver", prompt="hello world", max_tokens=20, temperature=0, stop=stop)
    streamed = list(oai.completions.create(model="quiver", prompt="hello world", max_tokens=20, temperature=0, stop=[stop], stream=True))

    assert plain.choices[0].text == full[: full.index(stop)]
    assert plain.choices[0].finish_reason == "stop"
    assert "".join(chunk.choices[0].text for chunk in streamed) == full[: full.index(stop)]


def test_openai_chat_uses_the_chat_template(oai, url, server):
    engine = server[1]
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    rendered = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    answer = oai.chat.completions.create(model="quiver", messages=messages, max_tokens=6, temperature=0)

    expected = httpx.post(f"{url}/generate", json={"inputs": rendered, "parameters": {"max_new_tokens": 6}}, timeout=60).json()
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content == expected["generated_text"]
    assert answer.usage.prompt_tokens == len(rendered)


def test_openai_chat_stream(oai):
    messages = [{"role": "user", "content": "hi there"}]
    whole = oai.chat.completions.create(model="two", messages=messages, max_tokens=8, temperature=0)

    chunks = list(
        oai.chat.completions.create(model="two", messages=messages, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True})
    )

    content = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert content == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_openai_unknown_model_is_404(oai):
    with pytest.raises(openai.NotFoundError, match="ghost") as caught:
        oai.completions.create(model="ghost", prompt="hi", max_tokens=2)

    assert "quiver" in caught.value.message


def test_openai_unsupported_option_is_422(oai):
    with pytest.raises(openai.UnprocessableEntityError, match="n is not supported"):
        oai.completions.create(model="quiver", prompt="hi", max_tokens=2, n=2)


def test_openai_routing_extension(oai, url):
    answer = oai.completions.create(model="quiver", prompt="hello world", max_tokens=5, temperature=0, extra_body={"routing": {"experts": ["two"]}})

    assert answer.choices[0].text == _generate(url, max_new_tokens=5, routing={"experts": ["two"]})["generated_text"]
    assert answer.model_extra["routing"] == {"two": 1.0}


# -- raw wire details --------------------------------------------------------------------------


def test_generate_stream_events_are_tgi_shaped(url):
    with httpx.stream("POST", f"{url}/generate_stream", json={"inputs": "hello", "parameters": {"max_new_tokens": 4, "ignore_eos_token": True}}, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[5:]) for line in response.iter_lines() if line.startswith("data:")]

    assert [event["index"] for event in events] == [0, 1, 2, 3]
    assert all(set(event["token"]) == {"id", "text", "logprob", "special"} for event in events)
    assert events[-1]["details"]["finish_reason"] == "length"
    assert events[-1]["generated_text"] == "".join(event["token"]["text"] for event in events)


def test_root_route_answers_a_list(url):
    response = httpx.post(url + "/", json={"inputs": "hello world", "parameters": {"max_new_tokens": 3}}, timeout=60)

    assert response.status_code == 200
    assert response.json()[0]["generated_text"] == _generate(url, max_new_tokens=3)["generated_text"]


def test_return_full_text_prepends_the_prompt(url):
    answer = _generate(url, max_new_tokens=3, return_full_text=True)

    assert answer["generated_text"] == "hello world" + _generate(url, max_new_tokens=3)["generated_text"]


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        ({"best_of": 2}, "best_of is not supported"),
        ({"watermark": True}, "watermark is not supported"),
        ({"grammar": {"type": "json", "value": {}}}, "grammar is not supported"),
        ({"stop": [""]}, "stop contains an empty string"),
        ({"adapter_id": "one", "merged_adapters": {"ids": ["two"]}}, "set adapter_id or merged_adapters, not both"),
    ],
    ids=["best-of", "watermark", "grammar", "empty-stop", "two-modes"],
)
def test_unsupported_tgi_parameters_are_422(url, parameters, message):
    response = httpx.post(f"{url}/generate", json={"inputs": "hi", "parameters": parameters}, timeout=60)

    assert response.status_code == 422
    assert message in response.json()["detail"]
    assert response.json()["error_type"] == "validation"


def test_metrics_count_requests_tokens_and_experts(url):
    _generate(url, max_new_tokens=3, adapter_id="one", ignore_eos_token=True)
    httpx.post(f"{url}/generate", json={"inputs": "hi", "parameters": {"adapter_id": "ghost"}}, timeout=60)

    text = httpx.get(f"{url}/metrics", timeout=60).text
    samples = {(sample.name, tuple(sorted(sample.labels.items()))): sample.value for family in text_string_to_metric_families(text) for sample in family.samples}

    assert samples[("quiver_requests_total", (("route", "/generate"), ("status", "200")))] >= 1
    assert samples[("quiver_requests_total", (("route", "/generate"), ("status", "404")))] >= 1
    assert samples[("quiver_expert_tokens_total", (("expert", "one"),))] >= 3
    assert samples[("quiver_generated_tokens_total", ())] >= 3
    assert samples[("quiver_time_to_first_token_seconds_count", ())] >= 1
    assert samples[("quiver_request_duration_seconds_count", (("route", "/generate"),))] >= 2
    assert ("quiver_queue_depth", ()) in samples
    assert ("quiver_batch_size_count", ()) in samples


def test_one_log_line_per_request(url, caplog):
    with caplog.at_level(logging.INFO, logger="quiver.server.routes.generate"):
        response = httpx.post(f"{url}/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 2, "adapter_id": "two"}}, headers={"X-Request-ID": "trace-42"}, timeout=60)

    assert response.headers["X-Request-ID"] == "trace-42"
    lines = [record.getMessage() for record in caplog.records if "request_id=trace-42" in record.getMessage()]
    assert len(lines) == 1
    assert "generated_tokens=" in lines[0]
    assert "top_experts=two:1.00" in lines[0]


def test_openai_no_model_routes_library(url):
    response = httpx.post(f"{url}/v1/completions", json={"prompt": "hello world", "max_tokens": 5, "temperature": 0}, timeout=60)

    assert response.status_code == 200
    assert response.json()["model"] == "quiver"
    assert response.json()["choices"][0]["text"] == _generate(url, max_new_tokens=5)["generated_text"]


def test_chat_without_template_is_422(url, server):
    tokenizer = server[1].tokenizer
    template, tokenizer.chat_template = tokenizer.chat_template, None
    try:
        response = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}, timeout=60)
    finally:
        tokenizer.chat_template = template

    assert response.status_code == 422
    assert response.json()["error"]["code"] == "no_chat_template"
    assert "send a plain prompt to /v1/completions" in response.json()["error"]["message"]
