"""The client commands of the ``quiver`` CLI through its real entry point against a live server:
``generate`` streaming, ``--json``, ``--token``, upload progress and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from quiver.client import Client
from quiver.server import Settings, create_app
from quiver.server.engine import Engine
from tests.factories import make_adapter, tiny_llama, tiny_tokenizer
from tests.live_server import serve

QUIVER = str(Path(sys.executable).parent / "quiver")
TOKEN = "cli-token-of-sixteen-chars"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    settings = Settings(cache_dir=root / "cache", library_dir=root / "library", max_new_tokens=64, max_input_tokens=100, api_token=TOKEN)
    engine = Engine(settings, model=tiny_llama(), tokenizer=tiny_tokenizer())
    engine.library.add("one", make_adapter(tiny_llama(), root / "one", seed=1))
    with serve(create_app(settings, engine=engine)) as url:
        yield url, root
    engine.close()


def _quiver(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {key: value for key, value in __import__("os").environ.items() if key != "QUIVER_API_TOKEN"}
    return subprocess.run([QUIVER, *args], capture_output=True, text=True, timeout=120, input=stdin, env=env)


def test_generate_streams_the_routed_text(server):
    url, _ = server
    with Client(base_url=url) as client:
        expected = client.generate("hello world", max_new_tokens=6).generated_text

    result = _quiver("generate", "hello world", "--max-new-tokens", "6", "--url", url)

    assert result.returncode == 0, result.stderr
    assert result.stdout == expected + "\n"
    assert "experts: one 1.00" in result.stderr


def test_generate_json_and_stdin(server):
    url, _ = server

    result = _quiver("generate", "-", "--max-new-tokens", "4", "--adapter", "one", "--url", url, "--json", stdin="hello")

    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert body["details"]["routing"] == {"one": 1.0}
    assert body["details"]["generated_tokens"] >= 1


def test_generate_error_is_one_line(server):
    url, _ = server

    result = _quiver("generate", "hello", "--adapter", "ghost", "--url", url)

    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("quiver: error: 404 expert_not_found: expert 'ghost' not found")


def test_add_needs_the_token_and_shows_progress(server, tmp_path):
    url, _ = server
    adapter = make_adapter(tiny_llama(), tmp_path / "two", seed=2)

    refused = _quiver("experts", "add", str(adapter), "--name", "two", "--url", url)
    added = _quiver("experts", "add", str(adapter), "--name", "two", "--url", url, "--token", TOKEN)
    listed = _quiver("experts", "list", "--url", url, "--json")
    removed = _quiver("experts", "rm", "two", "--url", url, "--token", TOKEN, "--json")

    assert refused.returncode == 1
    assert "401 unauthorized: missing bearer token" in refused.stderr
    assert added.returncode == 0, added.stderr
    assert added.stdout.startswith("added expert two")
    assert "uploading two" in added.stderr
    assert [expert["name"] for expert in json.loads(listed.stdout)] == ["one", "two"]
    assert json.loads(removed.stdout) == {"removed": "two"}


@pytest.mark.parametrize(
    "command",
    [["serve"], ["experts", "list"], ["experts", "import"], ["sync", "pull"], ["generate"], ["train"], ["demo"], ["eval"]],
    ids=lambda command: "-".join(command),
)
def test_every_command_has_help_with_json(command):
    result = _quiver(*command, "--help")

    assert result.returncode == 0
    assert "--json" in result.stdout
