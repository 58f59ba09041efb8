"""Bearer-token access, and the Python clients (blocking and asyncio) against a live server."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from quiver.client import AsyncClient, Client, NotFoundError, UnauthorizedError
from quiver.server import Settings, create_app
from quiver.server.engine import Engine
from tests.factories import make_adapter, tiny_llama, tiny_tokenizer
from tests.live_server import serve

TOKEN = "a-token-of-sixteen-chars"


@pytest.fixture
def start(tmp_path):
    engines = []

    def run(**overrides):
        settings = Settings(cache_dir=tmp_path / "cache", library_dir=tmp_path / "library", max_new_tokens=64, max_input_tokens=100, **overrides)
        engine = Engine(settings, model=tiny_llama(), tokenizer=tiny_tokenizer())
        engines.append(engine)
        return serve(create_app(settings, engine=engine))

    yield run
    for engine in engines:
        engine.close()


@pytest.fixture
def adapter(tmp_path):
    return make_adapter(tiny_llama(), tmp_path / "adapter", seed=1)


def test_writes_need_the_token(start, adapter, monkeypatch):
    monkeypatch.delenv("QUIVER_API_TOKEN", raising=False)
    with start(api_token=TOKEN) as url:
        with Client(base_url=url) as anonymous, Client(base_url=url, token=TOKEN) as owner, Client(base_url=url, token="wrong-token-of-16+") as guesser:
            with pytest.raises(UnauthorizedError, match="missing bearer token") as raised:
                anonymous.upload_expert(adapter, name="one")
            with pytest.raises(UnauthorizedError, match="invalid bearer token"):
                guesser.upload_expert(adapter, name="one")
            created = owner.upload_expert(adapter, name="one")
            listed = anonymous.list_experts()
            answer = anonymous.generate("hello", max_new_tokens=2)
            with pytest.raises(UnauthorizedError):
                anonymous.delete_expert("one")
            with pytest.raises(UnauthorizedError):
                anonymous.sync()
            owner.delete_expert("one")

    assert raised.value.status_code == 401
    assert created.name == "one"
    assert [expert.name for expert in listed] == ["one"]
    assert answer.details.generated_tokens >= 1


def test_protected_reads_leave_health_open(start, monkeypatch):
    monkeypatch.delenv("QUIVER_API_TOKEN", raising=False)
    with start(api_token=TOKEN, api_token_reads=True) as url:
        health = httpx.get(f"{url}/health", timeout=30)
        listing = httpx.get(f"{url}/experts", timeout=30)
        metrics = httpx.get(f"{url}/metrics", timeout=30)
        with pytest.raises(openai.AuthenticationError, match="invalid bearer token"):
            openai.OpenAI(base_url=f"{url}/v1", api_key="not-the-token", max_retries=0).models.list()
        models = openai.OpenAI(base_url=f"{url}/v1", api_key=TOKEN, max_retries=0).models.list()

    assert health.status_code == 200
    assert listing.status_code == 401
    assert listing.headers["WWW-Authenticate"].startswith("Bearer")
    assert listing.json()["code"] == "unauthorized"
    assert metrics.status_code == 401
    assert [model.id for model in models] == ["quiver"]


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        ({"QUIVER_API_TOKEN": "short"}, "QUIVER_API_TOKEN is 5 characters long; use at least 16"),
        ({"QUIVER_API_TOKEN_READS": "1"}, "QUIVER_API_TOKEN_READS=1 needs QUIVER_API_TOKEN"),
        ({"QUIVER_API_TOKEN_READS": "maybe"}, "QUIVER_API_TOKEN_READS='maybe' is invalid: expected 1 or 0"),
    ],
    ids=["short-token", "reads-without-token", "not-a-boolean"],
)
def test_bad_token_settings_are_rejected(variables, message):
    with pytest.raises(ValueError, match=message):
        Settings.from_env(variables)


def test_client_streams_and_reports_progress(start, adapter):
    progress: list[tuple[int, int]] = []
    with start() as url, Client(base_url=url) as client:
        client.upload_expert(adapter, name="one", progress=lambda sent, total: progress.append((sent, total)))
        whole = client.generate("hello world", max_new_tokens=8, adapter_id="one")
        events = list(client.generate_stream("hello world", max_new_tokens=8, adapter_id="one"))
        info = client.info()

    size = (adapter / "adapter_model.safetensors").stat().st_size
    assert progress[-1] == (size, size)
    assert "".join(event.token.text for event in events if not event.token.special) == whole.generated_text
    assert events[-1].generated_text == whole.generated_text
    assert events[-1].details.routing == {"one": 1.0}
    assert info["experts"] == ["one"]


def test_async_client_covers_the_routes(start, adapter, tmp_path):
    async def scenario(url: str):
        async with AsyncClient(base_url=url) as client:
            health = await client.health()
            created = await client.upload_expert(adapter, name="one", task="testing")
            listed = await client.list_experts()
            fetched = await client.get_expert("one")
            answer = await client.generate("hello", max_new_tokens=4, routing={"experts": ["one"]})
            streamed = [event async for event in client.generate_stream("hello", max_new_tokens=4, routing={"experts": ["one"]})]
            exported = await client.export_expert("one", tmp_path / "exported")
            converted = await client.import_mttl(checkpoint, name="adder")
            status = await client.library_status()
            await client.delete_expert("one")
            with pytest.raises(NotFoundError):
                await client.get_expert("one")
            return health, created, listed, fetched, answer, streamed, exported, status, converted

    from tests.library.test_mttl import _mttl_checkpoint

    checkpoint = _mttl_checkpoint(adapter, tmp_path / "expert.ckpt")
    with start() as url:
        health, created, listed, fetched, answer, streamed, exported, status, converted = asyncio.run(scenario(url))

    assert health.status == "ok"
    assert created == fetched
    assert [expert.name for expert in listed] == ["one"]
    assert streamed[-1].generated_text == answer.generated_text
    assert (exported / "adapter_model.safetensors").is_file()
    assert status["revision"] >= 1
    assert converted.task == "add two numbers"
