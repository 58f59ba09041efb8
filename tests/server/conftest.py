import pytest

from quiver.server import Settings, create_app
from quiver.server.engine import Engine
from tests.factories import tiny_llama, tiny_tokenizer
from tests.live_server import serve


@pytest.fixture
def settings(tmp_path):
    return Settings(cache_dir=tmp_path / "cache", library_dir=tmp_path / "library", max_new_tokens=64, max_input_tokens=100, max_upload_mb=1)


@pytest.fixture
def engine(settings):
    engine = Engine(settings, model=tiny_llama(), tokenizer=tiny_tokenizer())
    yield engine
    engine.close()


@pytest.fixture
def base_url(settings, engine):
    with serve(create_app(settings, engine=engine)) as url:
        yield url
