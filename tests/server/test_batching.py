"""Continuous batching on a tiny model: shared steps give each request what it gets alone,
requests join and leave mid-flight, cancellation, backpressure and timeouts."""

from __future__ import annotations

import threading
import time

import httpx
import pytest

from quiver.client.models import GenerateParameters
from quiver.server import Settings, create_app
from quiver.server.batching import Finished, QueueFullError, TokenEvent
from quiver.server.engine import Engine
from tests.factories import make_adapter, slow_down, tiny_llama, tiny_tokenizer
from tests.live_server import serve

PROMPTS = ["hello world", "abc def ghi jkl mno", "x", "the quick brown fox jumps over"]


def _settings(tmp_path, **overrides) -> Settings:
    values = {"cache_dir": tmp_path / "cache", "library_dir": tmp_path / "library", "max_new_tokens": 64, "max_input_tokens": 100}
    return Settings(**{**values, **overrides})


@pytest.fixture
def make_engine(tmp_path):
    engines = []

    def build(delay: float = 0.0, experts: int = 3, **overrides) -> Engine:
        model = tiny_llama()
        if delay:
            slow_down(model, delay)
        engine = Engine(_settings(tmp_path, **overrides), model=model, tokenizer=tiny_tokenizer())
        for index in range(1, experts + 1):
            if f"e{index}" not in engine.library.names():
                engine.library.add(f"e{index}", make_adapter(tiny_llama(), tmp_path / f"adapter{index}", seed=index))
        engines.append(engine)
        return engine

    yield build
    for engine in engines:
        engine.close()


def _run_together(engine: Engine, prompts: list[str], parameters: list[GenerateParameters]):
    """Submit every request at once from its own thread and return the responses in order."""
    results: list = [None] * len(prompts)
    barrier = threading.Barrier(len(prompts))

    def run(index: int) -> None:
        barrier.wait()
        results[index] = engine.generate(prompts[index], parameters[index]).response

    threads = [threading.Thread(target=run, args=(index,)) for index in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return results


def _steps_with_more_than_one(engine: Engine) -> float:
    registry = engine.metrics.registry
    return registry.get_sample_value("quiver_batch_size_count") - registry.get_sample_value("quiver_batch_size_bucket", {"le": "1.0"})


MIXED = [
    GenerateParameters(max_new_tokens=12, ignore_eos_token=True),
    GenerateParameters(max_new_tokens=7, ignore_eos_token=True, routing={"experts": ["e1", "e2"], "method": "arrow", "top_k": 2}),
    GenerateParameters(max_new_tokens=20, ignore_eos_token=True, adapter_id="e3"),
    GenerateParameters(max_new_tokens=9, ignore_eos_token=True, routing={"method": "hybrid"}, details=True),
]


def test_batched_equals_solo_answers(make_engine):
    engine = make_engine(delay=0.005)
    alone = [engine.generate(prompt, parameters).response for prompt, parameters in zip(PROMPTS, MIXED)]
    steps_alone = _steps_with_more_than_one(engine)

    together = _run_together(engine, PROMPTS, MIXED)

    assert _steps_with_more_than_one(engine) > steps_alone, "the requests never shared a forward pass"
    for solo, batched in zip(alone, together):
        assert batched.generated_text == solo.generated_text
        assert batched.details.generated_tokens == solo.details.generated_tokens
        assert batched.details.routing == pytest.approx(solo.details.routing, abs=1e-5)
    assert [token.logprob for token in together[3].details.tokens] == pytest.approx(
        [token.logprob for token in alone[3].details.tokens], abs=1e-4
    )


def test_solo_matches_transformers_generate(make_engine):
    engine = make_engine(experts=0)
    encoded = engine.tokenizer("the quick brown fox", return_tensors="pt")
    reference = engine.model.generate(**encoded, max_new_tokens=15, do_sample=False, pad_token_id=engine.tokenizer.pad_token_id)

    answer = engine.generate("the quick brown fox", GenerateParameters(max_new_tokens=15, details=True)).response

    assert [token.id for token in answer.details.tokens] == reference[0, encoded["input_ids"].shape[1] :].tolist()


def test_seeded_sample_ignores_batch_neighbours(make_engine):
    engine = make_engine(delay=0.005)
    sampled = GenerateParameters(max_new_tokens=15, do_sample=True, temperature=0.9, top_k=20, top_p=0.95, seed=7, ignore_eos_token=True)
    greedy = GenerateParameters(max_new_tokens=10, ignore_eos_token=True)
    alone = engine.generate("abc", sampled).response

    together = _run_together(engine, ["abc", "hello", "world"], [sampled, greedy, greedy])

    assert together[0].generated_text == alone.generated_text
    assert together[0].details.seed == 7


def test_request_joins_and_leaves_midflight(make_engine):
    engine = make_engine(delay=0.01)
    long = GenerateParameters(max_new_tokens=40, ignore_eos_token=True)
    short = GenerateParameters(max_new_tokens=4, ignore_eos_token=True, adapter_id="e1")
    long_alone = engine.generate("hello world", long).response.generated_text
    short_alone = engine.generate("abc", short).response.generated_text

    long_job = engine.submit(engine.encode("hello world"), long, request_id="long")
    events = long_job.iter_events()
    for _ in range(3):
        assert isinstance(next(events), TokenEvent)
    short_job = engine.submit(engine.encode("abc"), short, request_id="short")
    short_events = list(short_job.iter_events())

    assert long_job.finish_reason is None, "the short request waited for the long one"
    assert isinstance(short_events[-1], Finished)
    assert short_events[-1].generated_text == short_alone
    long_events = list(events)
    assert isinstance(long_events[-1], Finished)
    assert long_events[-1].generated_text == long_alone


def _wait_until(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("the condition did not become true in time")
        time.sleep(0.02)


def test_cancelled_request_stops_generating(make_engine):
    engine = make_engine(delay=0.01)
    job = engine.submit(engine.encode("hello"), GenerateParameters(max_new_tokens=60, ignore_eos_token=True), request_id="gone")
    events = job.iter_events()
    for _ in range(3):
        next(events)

    job.cancel()

    _wait_until(lambda: engine.batcher.running == 0)
    assert len(job.output_ids) < 60
    assert engine.metrics.registry.get_sample_value("quiver_generations_total", {"outcome": "cancelled"}) == 1


def test_limits_are_checked_before_queueing(make_engine):
    engine = make_engine(experts=0, max_new_tokens=8)

    with pytest.raises(ValueError, match="max_new_tokens is 9; this server allows at most 8"):
        engine.submit([1, 2, 3], GenerateParameters(max_new_tokens=9), request_id="big")
    with pytest.raises(ValueError, match="the prompt has 101 tokens; this server accepts at most 100"):
        engine.encode("a" * 101)
    assert engine.encode("a" * 101, truncate=5) == engine.encode("aaaaa")
    assert engine.batcher.queue_depth == 0


@pytest.mark.parametrize("name", ["max_batch_size", "max_new_tokens", "max_batch_prefill_tokens"])
def test_settings_reject_zero_limits(tmp_path, name):
    with pytest.raises(ValueError, match=f"QUIVER_{name.upper()}=0 is invalid: expected at least 1"):
        Settings.from_env({f"QUIVER_{name.upper()}": "0"})


# -- over HTTP -------------------------------------------------------------------------------


@pytest.fixture
def slow_server(make_engine):
    """A server whose tiny model takes 20 ms per forward pass, with a batch of 1 and a queue of 1."""

    def start(**overrides):
        engine = make_engine(delay=0.02, experts=1, **{"max_batch_size": 1, "max_queue": 1, **overrides})
        return engine, serve(create_app(engine.settings, engine=engine))

    return start


def _stream_in_thread(url: str, body: dict, seen: list) -> threading.Thread:
    def run() -> None:
        with httpx.stream("POST", f"{url}/generate_stream", json=body, timeout=60) as response:
            seen.append(response.status_code)
            for line in response.iter_lines():
                if line.startswith("data:"):
                    seen.append(line)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_full_queue_503_then_recovers(slow_server):
    engine, server = slow_server()
    long = {"inputs": "hello", "parameters": {"max_new_tokens": 40, "ignore_eos_token": True}}
    with server as url:
        first: list = []
        running = _stream_in_thread(url, long, first)
        _wait_until(lambda: engine.batcher.running == 1)
        second: list = []
        waiting = _stream_in_thread(url, long, second)
        _wait_until(lambda: engine.batcher.queue_depth == 1)

        rejected = httpx.post(f"{url}/generate", json={"inputs": "hi"}, timeout=60)
        still_running = engine.batcher.running == 1

        running.join(timeout=60)
        waiting.join(timeout=60)
        recovered = httpx.post(f"{url}/generate", json={"inputs": "hi", "parameters": {"max_new_tokens": 2}}, timeout=60)

    assert still_running, "the 503 came only after the running request finished"
    assert rejected.status_code == 503
    assert int(rejected.headers["Retry-After"]) >= 1
    body = rejected.json()
    assert body["code"] == "overloaded"
    assert body["error_type"] == "overloaded"
    assert "1 requests are already waiting" in body["detail"]
    assert first[0] == second[0] == 200
    assert '"finish_reason": "length"' in first[-1]
    assert '"finish_reason": "length"' in second[-1]
    assert recovered.status_code == 200


def test_request_past_the_timeout_is_503(slow_server):
    _, server = slow_server(request_timeout=0.3)
    with server as url:
        response = httpx.post(f"{url}/generate", json={"inputs": "hello", "parameters": {"max_new_tokens": 60, "ignore_eos_token": True}}, timeout=60)

    assert response.status_code == 503
    assert response.json()["code"] == "request_timeout"
    assert "did not finish within the server's timeout of 0.3 s" in response.json()["detail"]


def test_stream_disconnect_cancels_generation(slow_server):
    engine, server = slow_server()
    with server as url:
        with httpx.stream("POST", f"{url}/generate_stream", json={"inputs": "hello", "parameters": {"max_new_tokens": 60, "ignore_eos_token": True}}, timeout=60) as response:
            lines = response.iter_lines()
            assert next(line for line in lines if line.startswith("data:"))
        _wait_until(lambda: engine.batcher.running == 0)
        cancelled = engine.metrics.registry.get_sample_value("quiver_generations_total", {"outcome": "cancelled"})
        generated = engine.metrics.registry.get_sample_value("quiver_generated_tokens_total")

    assert cancelled == 1
    assert generated < 60


def test_generate_disconnect_cancels_generation(slow_server):
    engine, server = slow_server()
    with server as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/generate", json={"inputs": "hello", "parameters": {"max_new_tokens": 60, "ignore_eos_token": True}}, timeout=0.3)
        _wait_until(lambda: engine.batcher.running == 0)

    assert engine.metrics.registry.get_sample_value("quiver_generations_total", {"outcome": "cancelled"}) == 1


def test_zero_queue_fills_batch(make_engine):
    engine = make_engine(experts=0, max_queue=0, max_batch_size=2)

    answers = _run_together(engine, ["abc", "def"], [GenerateParameters(max_new_tokens=3)] * 2)

    assert all(answer.details.generated_tokens >= 1 for answer in answers)


def test_full_batch_zero_queue_rejected(make_engine):
    engine = make_engine(delay=0.01, experts=0, max_queue=0, max_batch_size=1)
    running = engine.submit(engine.encode("abc"), GenerateParameters(max_new_tokens=30, ignore_eos_token=True), request_id="first")
    next(running.iter_events())

    with pytest.raises(QueueFullError, match="0 requests are already waiting"):
        engine.submit(engine.encode("def"), GenerateParameters(max_new_tokens=3), request_id="second")
