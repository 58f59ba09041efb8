"""The client package: its public names, torch-free import and error mapping."""

import subprocess
import sys

import httpx
import pytest

import quiver.client
from quiver.client import (
    APIError,
    AsyncClient,
    Client,
    ConflictError,
    HubError,
    InvalidExpertError,
    InvalidRequestError,
    NotFoundError,
    OverloadedError,
    ServerError,
    TransportError,
    UnauthorizedError,
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

    return Client(base_url="http://quiver.test", transport=httpx.MockTransport(handler))


@pytest.mark.parametrize(
    ("status", "code", "error_type"),
    [
        (404, "expert_not_found", NotFoundError),
        (409, "expert_exists", ConflictError),
        (422, "invalid_expert", InvalidExpertError),
        (422, "invalid_request", InvalidRequestError),
        (500, "internal_error", ServerError),
        (418, "teapot", APIError),
        (401, "unauthorized", UnauthorizedError),
        (503, "request_timeout", OverloadedError),
        (404, "hub_repo_not_found", HubError),
        (502, "hub_unavailable", HubError),
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

    with Client(base_url="http://quiver.test", transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(ServerError, match="502 http_error: bad gateway"):
            client.health()


def test_unreachable_server(tmp_path):
    from tests.live_server import free_port

    with Client(base_url=f"http://127.0.0.1:{free_port()}", timeout=5, max_retries=0) as client:
        with pytest.raises(TransportError, match="cannot reach"):
            client.health()


def test_upload_checks_folder(tmp_path):
    with Client(base_url="http://quiver.test") as client:
        with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
            client.upload_expert(tmp_path, name="x")


def test_generate_rejects_unknown_parameter():
    with Client(base_url="http://quiver.test") as client:
        with pytest.raises(InvalidRequestError, match=r"invalid request: parameters.max_tokens: Extra inputs are not permitted \(got 5\)") as raised:
            client.generate("hello", max_tokens=5)

    assert raised.value.status_code == 422
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(
    ("options", "message"),
    [({"base_url": "127.0.0.1:8000"}, "expected an address starting with http://"), ({"timeout": 0}, "timeout is 0; expected a positive number")],
    ids=["no-scheme", "zero-timeout"],
)
def test_bad_client_options_are_rejected(options, message):
    with pytest.raises(ValueError, match=message):
        Client(**options)


def _overloaded_then_ok(failures: int, calls: list, retry_after: str = "0"):
    def handler(request):
        calls.append(request)
        if len(calls) <= failures:
            body = {"detail": "the server is at capacity", "code": "overloaded", "request_id": "r"}
            return httpx.Response(503, json=body, headers={"Retry-After": retry_after})
        return httpx.Response(200, json={"status": "ok", "base_model": "m", "device": "cpu", "experts": 0})

    return handler


def test_overloaded_request_is_retried():
    calls: list = []

    with Client(base_url="http://quiver.test", transport=httpx.MockTransport(_overloaded_then_ok(2, calls))) as client:
        health = client.health()

    assert health.status == "ok"
    assert len(calls) == 3


def test_retries_give_up_with_overloaded_error():
    calls: list = []

    with Client(base_url="http://quiver.test", max_retries=1, transport=httpx.MockTransport(_overloaded_then_ok(5, calls))) as client:
        with pytest.raises(OverloadedError, match="at capacity") as raised:
            client.health()

    assert len(calls) == 2
    assert raised.value.retry_after == 0


def test_timed_out_request_is_not_retried():
    calls: list = []

    def handler(request):
        calls.append(request)
        return httpx.Response(503, json={"detail": "timed out", "code": "request_timeout", "request_id": "r"}, headers={"Retry-After": "1"})

    with Client(base_url="http://quiver.test", transport=httpx.MockTransport(handler)) as client:
        with pytest.raises(OverloadedError):
            client.health()

    assert len(calls) == 1


def test_async_client_retries_too():
    import asyncio

    calls: list = []

    async def run():
        transport = httpx.MockTransport(_overloaded_then_ok(1, calls))
        async with AsyncClient(base_url="http://quiver.test", transport=transport) as client:
            return await client.health()

    assert asyncio.run(run()).status == "ok"
    assert len(calls) == 2


def test_token_is_sent_as_bearer(monkeypatch):
    seen: list = []

    def handler(request):
        seen.append(request.headers.get("Authorization"))
        return httpx.Response(200, json={"status": "ok", "base_model": "m", "device": "cpu", "experts": 0})

    monkeypatch.setenv("QUIVER_API_TOKEN", "from-the-environment")
    with Client(base_url="http://quiver.test", token="explicit-token-1234", transport=httpx.MockTransport(handler)) as client:
        client.health()
    with Client(base_url="http://quiver.test", transport=httpx.MockTransport(handler)) as client:
        client.health()

    assert seen == ["Bearer explicit-token-1234", "Bearer from-the-environment"]


def test_options_are_keyword_only():
    with pytest.raises(TypeError):
        Client("http://quiver.test")  # type: ignore[misc]
