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


def _quiver_on_terminal(*args: str) -> tuple[int, str, str]:
    """Run the CLI with stderr on a 100-column pseudo-terminal, as in a shell, and return (status, stdout, stderr)."""
    import fcntl
    import os
    import pty
    import struct
    import tempfile
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    env = {key: value for key, value in os.environ.items() if key != "QUIVER_API_TOKEN"}
    with tempfile.TemporaryFile(mode="w+") as stdout:
        process = subprocess.Popen([QUIVER, *args], stdout=stdout, stderr=follower, env=env)
        os.close(follower)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the process closed its end of the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        os.close(leader)
        process.wait(timeout=120)
        stdout.seek(0)
        return process.returncode, stdout.read(), b"".join(chunks).decode(errors="replace")


def test_add_needs_token_shows_progress(server, tmp_path):
    url, _ = server
    adapter = make_adapter(tiny_llama(), tmp_path / "two", seed=2)

    rejected = _quiver("experts", "add", str(adapter), "--name", "two", "--url", url)
    status, stdout, stderr = _quiver_on_terminal("experts", "add", str(adapter), "--name", "two", "--url", url, "--token", TOKEN)
    listed = _quiver("experts", "list", "--url", url, "--json")
    removed = _quiver("experts", "rm", "two", "--url", url, "--token", TOKEN, "--json")

    assert rejected.returncode == 1
    assert "401 unauthorized: missing bearer token" in rejected.stderr
    assert rejected.stderr.count("\n") == 1, "a progress bar was drawn on a stderr that is not a terminal"
    assert status == 0, stderr
    assert stdout.startswith("added expert two")
    assert "uploading two" in stderr
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


def test_serve_busy_port_fails_early():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _quiver("serve", "--port", str(port))

    assert result.returncode == 1
    assert result.stderr == f"quiver: error: cannot listen on 127.0.0.1:{port} (Address already in use); choose another --port (QUIVER_PORT) or stop the process using it\n"


def test_unknown_route_names_the_path(server):
    import httpx

    url, _ = server
    response = httpx.post(f"{url}/v1/generate", json={}, timeout=30)

    assert response.status_code == 404
    assert "no route POST /v1/generate" in response.json()["error"]["message"]


def test_invalid_expert_error_one_line(server, tmp_path):
    import torch

    from tests.factories import edit_weights

    url, _ = server
    adapter = make_adapter(tiny_llama(), tmp_path / "broken", seed=3)
    edit_weights(adapter, lambda tensors: tensors.update({key: torch.full_like(value, float("nan")) for key, value in tensors.items()}))

    result = _quiver("experts", "add", str(adapter), "--name", "broken", "--url", url, "--token", TOKEN)

    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert result.stderr.startswith("quiver: error: 422 invalid_expert:")
    assert "; " in result.stderr
