"""Server settings from the environment and from overrides."""

from pathlib import Path

import pytest

from quiver.library import InvalidRoutingError
from quiver.server import Settings
from quiver.server.engine import Engine


def test_defaults_without_environment():
    settings = Settings.from_env({})

    assert settings.base_model is None
    assert settings.device == "auto"
    assert settings.routing_method == "sequence"
    assert settings.routing_top_k == 1
    assert settings.resolved_library_dir == Path(settings.cache_dir) / "library"


def test_environment_variables_parsed():
    environ = {
        "QUIVER_LIBRARY_DIR": "/srv/library",
        "QUIVER_BASE_MODEL": "org/model",
        "QUIVER_MAX_NEW_TOKENS": "64",
        "QUIVER_ROUTING_TEMPERATURE": "0.25",
        "QUIVER_ROUTING_METHOD": "sequence",
        "QUIVER_PORT": "9000",
    }

    settings = Settings.from_env(environ)

    assert settings.resolved_library_dir == Path("/srv/library")
    assert settings.base_model == "org/model"
    assert settings.max_new_tokens == 64
    assert settings.routing_temperature == 0.25
    assert settings.routing_method == "sequence"
    assert settings.port == 9000


def test_overrides_win_over_environment():
    settings = Settings.from_env({"QUIVER_PORT": "9000", "QUIVER_DEVICE": "cpu"}, port=9100, device=None)

    assert settings.port == 9100
    assert settings.device == "cpu"


@pytest.mark.parametrize(("variable", "value", "expected"), [("QUIVER_PORT", "eighty", "an integer"), ("QUIVER_ROUTING_TEMPERATURE", "warm", "a number")])
def test_invalid_variable_named(variable, value, expected):
    with pytest.raises(ValueError, match=f"{variable}='{value}' is invalid: expected {expected}"):
        Settings.from_env({variable: value})


def test_invalid_default_routing_rejected_at_start(tmp_path):
    settings = Settings(cache_dir=tmp_path, routing_method="magic")

    with pytest.raises(InvalidRoutingError, match="method is 'magic'"):
        Engine(settings)
