"""The client package: its public names, torch-free import and error mapping."""

import subprocess
import sys

import httpx
import pytest

import quiver.client
from quiver.client import (
    APIError,
    Client,
    ConflictError,
    InvalidExpertError,
    InvalidRequestError,
    NotFoundError,
    ServerError,
    TransportError,
)


def test_all_lists_public_names():
    public = {name for name in dir(quiver.client) if not name.startswith("_")}
    modules = {"errors", "models"}

    assert set(quiver.client.__all__) == public - modules


def test_imports_without_torch():
    # A meta path finder that fails every torch import simulates a machine without torch.
    script = (
        "import sys\n"
        "class BlockTorch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ImportError('torch is blocked in this test')\n"
        "sys.meta_path.insert(0, BlockTorch())\n"
        "import quiver.client\n"
        "from quiver.client import Client, GenerateRequest\n"
        "assert 'torch' not in sys.modules\n"
        "assert 'transformers' not in sys.modules\n"
        "print('ok')\n"
    )

    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def _client_answering(status, body):
    def handler(request):
        return httpx.Response(status, json=body)

    return Client("http://quiver.test", transport=httpx.MockTransport(handler))


@pytest.mark.parametrize(
    ("status", "code", "error_type"),
    [
        (404, "expert_not_found", NotFoundError),
        (409, "expert_exists", ConflictError),
        (422, "invalid_expert", InvalidExpertError),
        (422, "invalid_request", InvalidRequestError),
        (500, "internal_error", ServerError),
        (418, "teapot", APIError),
    ],
)
def test_error_status_maps_to_exception(status, code, error_type):
    body = {"detail": "what went wrong", "code": code, "request_id": "abc", "problems": ["one", "two"]}

    with _client_answering(status, body) as client, pytest.raises(error_type) as raised:
        client.get_expert("x")

    assert type(raised.value) is error_type
    assert raised.value.status_code == status
    assert raised.value.code == code
    assert raised.value.detail == "what went wrong"
    assert raised.value.problems == ["one", "two"]
    assert raised.value.request_id == "abc"


def test_error_without_json_body():
    def handler(request):
        return httpx.Response(502, text="bad gateway")

    with Client("http://quiver.test", transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(ServerError, match="502 http_error: bad gateway"):
            client.health()


def test_unreachable_server(tmp_path):
    from tests.live_server import free_port

    with Client(f"http://127.0.0.1:{free_port()}", timeout=5) as client:
        with pytest.raises(TransportError, match="cannot reach"):
            client.health()


def test_upload_checks_folder(tmp_path):
    with Client("http://quiver.test") as client:
        with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
            client.upload_expert(tmp_path, name="x")


def test_generate_rejects_unknown_parameter():
    with Client("http://quiver.test") as client:
        with pytest.raises(ValueError, match="max_tokens"):
            client.generate("hello", max_tokens=5)
