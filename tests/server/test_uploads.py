"""Uploads over real HTTP.

Every malformed adapter is rejected with its problem named, and the library stays exactly as it
was. Replace and concurrent uploads work as documented.
"""

import json
import os
import socket
import struct
import threading
import time
from urllib.parse import urlsplit

import httpx
import pytest
import torch
from safetensors.torch import save_file

from quiver.client import Client
from tests.factories import library_snapshot, make_adapter, tiny_llama

LFS_POINTER = b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"0" * 64 + b"\nsize 123456\n"
Q_PROJ = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.fixture
def adapter(engine, tmp_path):
    return make_adapter(tiny_llama(), tmp_path / "adapter", seed=1)


@pytest.fixture
def kept(base_url, tmp_path):
    """A library holding one expert, so that "unchanged" covers a non-empty listing."""
    response = _post(base_url, _parts(make_adapter(tiny_llama(), tmp_path / "kept", seed=3)), name="kept")
    assert response.status_code == 201
    return response.json()


def _parts(adapter, config=None, weights=None, weights_name="adapter_model.safetensors"):
    config = (adapter / "adapter_config.json").read_bytes() if config is None else config
    weights = (adapter / "adapter_model.safetensors").read_bytes() if weights is None else weights
    return {"adapter_config": ("adapter_config.json", config), "adapter_model": (weights_name, weights)}


def _post(base_url, files, **form):
    return httpx.post(f"{base_url}/experts", data=form, files=files, timeout=60)


def _state(base_url, library_dir):
    listing = httpx.get(f"{base_url}/experts").json()
    return listing, library_snapshot(library_dir)


# Each case edits the adapter's config (a dict) or its tensors (a dict), or replaces a file's bytes.
def _config(edit):
    def build(adapter):
        config = json.loads((adapter / "adapter_config.json").read_text())
        edit(config)
        return _parts(adapter, config=json.dumps(config).encode())

    return build


def _tensors(edit):
    def build(adapter):
        from safetensors.torch import load_file

        tensors = load_file(adapter / "adapter_model.safetensors")
        edit(tensors)
        path = adapter / "edited.safetensors"
        save_file(tensors, path)
        return _parts(adapter, weights=path.read_bytes())

    return build


def _weights_bytes(make):
    return lambda adapter: _parts(adapter, weights=make((adapter / "adapter_model.safetensors").read_bytes()))


def _header(header: dict, data: bytes = b"") -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def _set(key, value):
    return lambda tensors: tensors.__setitem__(key, value)


def _pop(key):
    return lambda tensors: tensors.pop(key)


def _map(function):
    def edit(tensors):
        for key in list(tensors):
            tensors[key] = function(key, tensors[key])

    return edit


def _first_nan(key, tensor):
    if key == f"{Q_PROJ}.lora_A.weight":
        tensor = tensor.clone()
        tensor[0, 0] = float("nan")
    return tensor


def _first_inf(key, tensor):
    if key == f"{Q_PROJ}.lora_B.weight":
        tensor = tensor.clone()
        tensor[0, 0] = float("inf")
    return tensor


class _Touch:
    """Pickles as a call to Path.touch: loading it with a plain unpickler would create a file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        from pathlib import Path

        return (Path.touch, (Path(self.path),))


def _malicious_pickle(adapter):
    marker = adapter / "pickle-ran"
    path = adapter / "evil.bin"
    torch.save({f"{Q_PROJ}.lora_A.weight": torch.ones(4, 32), "payload": _Touch(marker)}, path)
    return _parts(adapter, weights=path.read_bytes(), weights_name="adapter_model.bin")


# (case id, builder of the multipart files, expected text in the problems)
MALFORMED = [
    ("bad-header-length", _weights_bytes(lambda data: struct.pack("<Q", 2**40) + data[8:]), "not a readable safetensors file"),
    ("header-not-json", _weights_bytes(lambda data: struct.pack("<Q", 12) + b"not json at all" + b"\x00" * 64), "not a readable safetensors file"),
    (
        "offsets-out-of-range",
        _weights_bytes(lambda data: _header({"x.lora_A.weight": {"dtype": "F32", "shape": [4, 32], "data_offsets": [0, 512]}}, b"\x00" * 16)),
        "not a readable safetensors file",
    ),
    ("truncated", _weights_bytes(lambda data: data[: len(data) // 2]), "not a readable safetensors file"),
    ("empty-weights", _weights_bytes(lambda data: b""), "is empty (0 bytes)"),
    ("lfs-pointer-weights", _weights_bytes(lambda data: LFS_POINTER), "Git LFS pointer"),
    ("lfs-pointer-config", lambda adapter: _parts(adapter, config=LFS_POINTER), "Git LFS pointer"),
    ("config-not-object", lambda adapter: _parts(adapter, config=b'["r", 4]'), "must contain a JSON object, found list"),
    ("config-not-json", lambda adapter: _parts(adapter, config=b"{r: 4"), "is not valid JSON"),
    ("config-without-r", _config(lambda config: config.pop("r")), "has no 'r' (the LoRA rank)"),
    ("config-without-peft-type", _config(lambda config: config.pop("peft_type")), "peft_type is missing"),
    ("ia3", _config(lambda config: config.update(peft_type="IA3")), "peft_type is 'IA3'"),
    ("prefix-tuning", _config(lambda config: config.update(peft_type="PREFIX_TUNING")), "peft_type is 'PREFIX_TUNING'"),
    ("dora", _config(lambda config: config.update(use_dora=True)), "use_dora is True"),
    ("modules-to-save", _config(lambda config: config.update(modules_to_save=["lm_head"])), "modules_to_save is ['lm_head']"),
    ("bias", _config(lambda config: config.update(bias="lora_only")), "bias is 'lora_only'"),
    ("lora-bias", _config(lambda config: config.update(lora_bias=True)), "lora_bias is True"),
    ("target-absent", _config(lambda config: config.update(target_modules=["q_proj", "v_proj", "down_proj", "w_gate"])), "target module 'w_gate' not found"),
    ("target-regex-matches-nothing", _config(lambda config: config.update(target_modules=r".*\.attn\.c_attn")), "matches no module"),
    ("target-embedding", _config(lambda config: config["target_modules"].append("embed_tokens")), "selects Embedding modules"),
    ("rank-disagrees-with-r", _config(lambda config: config.update(r=8)), "the weights have rank 4 but the config gives rank 8"),
    ("weights-not-targeted", _config(lambda config: config.update(target_modules=["q_proj", "v_proj"])), "does not select it"),
    ("other-base-model-shape", _tensors(_set(f"{Q_PROJ}.lora_A.weight", torch.randn(4, 48))), "does not match the module's input size 32"),
    (
        "module-absent",
        _tensors(lambda tensors: tensors.update({
            "base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight": torch.randn(4, 32),
            "base_model.model.model.layers.9.self_attn.q_proj.lora_B.weight": torch.randn(32, 4),
        })),
        "module not found in the base model",
    ),
    ("ranks-disagree", _tensors(_set(f"{Q_PROJ}.lora_B.weight", torch.randn(32, 3))), "lora_A has rank 4 but lora_B has rank 3"),
    ("lora-a-without-b", _tensors(_pop(f"{Q_PROJ}.lora_B.weight")), "lora_A has no matching lora_B"),
    ("unknown-tensor", _tensors(_set("base_model.model.model.norm.scale", torch.ones(32))), "1 tensor that is not a LoRA factor ('base_model.model.model.norm.scale')"),
    ("nan", _tensors(_map(_first_nan)), "lora_A contains NaN or infinite values"),
    ("infinity", _tensors(_map(_first_inf)), "lora_B contains NaN or infinite values"),
    ("integer-tensors", _tensors(_map(lambda key, tensor: tensor.round().to(torch.int32))), "expected a floating-point dtype"),
    ("all-zero", _tensors(_map(lambda key, tensor: torch.zeros_like(tensor) if ".lora_B." in key else tensor)), "zero in every module"),
    ("pickle-with-code", _malicious_pickle, "only tensors and plain containers are accepted"),
    ("pickle-not-zip", lambda adapter: _parts(adapter, weights=b"PK\x03\x04 this is not a zip", weights_name="adapter_model.bin"), "not a torch.save file"),
]


@pytest.mark.parametrize(("case", "build", "problem"), MALFORMED, ids=[case[0] for case in MALFORMED])
def test_malformed_upload_is_refused(base_url, settings, kept, adapter, case, build, problem):
    files = build(adapter)
    before = _state(base_url, settings.library_dir)

    response = _post(base_url, files, name="candidate")

    body = response.json()
    assert response.status_code == 422, body
    assert body["code"] == "invalid_expert"
    assert any(problem in line for line in body["problems"]), body["problems"]
    assert "'candidate'" in body["detail"]
    assert _state(base_url, settings.library_dir) == before
    assert not (adapter / "pickle-ran").exists()


BAD_NAMES = [
    ("empty", "", "name"),
    ("too-long", "a" * 65, "65 characters, more than 64"),
    ("slash", "team/expert", "contains '/'"),
    ("dot-dot", "..", "contains '.'"),
    ("dot", "v1.2", "contains '.'"),
    ("space", "my expert", "contains a space"),
    ("control", "tab\there", "control character U+0009"),
    ("non-ascii", "café", "non-ASCII character 'é'"),
    ("reserved", "default", "reserved"),
    ("reserved-any-case", "Base", "reserved"),
    ("device-name", "com1", "reserved"),
    ("leading-dash", "-expert", "starts with '-'"),
]


@pytest.mark.parametrize(("case", "name", "problem"), BAD_NAMES, ids=[case[0] for case in BAD_NAMES])
def test_bad_name_is_refused(base_url, settings, kept, adapter, case, name, problem):
    before = _state(base_url, settings.library_dir)

    response = _post(base_url, _parts(adapter), name=name)

    assert response.status_code == 422
    assert problem in response.json()["detail"]
    assert _state(base_url, settings.library_dir) == before


def test_existing_name_is_409_unless_replaced(base_url, settings, kept, adapter):
    before = _state(base_url, settings.library_dir)

    same = _post(base_url, _parts(adapter), name="kept")
    other_case = _post(base_url, _parts(adapter), name="KEPT")

    assert same.status_code == 409
    assert "replace" in same.json()["detail"]
    assert other_case.status_code == 409
    assert "letter case" in other_case.json()["detail"]
    assert _state(base_url, settings.library_dir) == before


def _raw_exchange(base_url, head: bytes, chunks=()) -> bytes:
    """Send a hand-written request and return the response, tolerating a server that stops reading."""
    address = urlsplit(base_url)
    with socket.create_connection((address.hostname, address.port), timeout=30) as connection:
        connection.sendall(head)
        try:
            for chunk in chunks:
                connection.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        response = b""
        while b"\r\n\r\n" not in response or not response.endswith(b"}"):
            data = connection.recv(65536)
            if not data:
                break
            response += data
    return response


def test_declared_oversize_upload_refused_before_reading(base_url, settings, kept):
    before = _state(base_url, settings.library_dir)
    head = (
        b"POST /experts HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: multipart/form-data; boundary=quiver\r\nContent-Length: 10737418240\r\n\r\n"
    )

    started = time.monotonic()
    response = _raw_exchange(base_url, head)  # no body is ever sent

    assert response.startswith(b"HTTP/1.1 413"), response[:200]
    assert b"upload_too_large" in response
    assert b"QUIVER_MAX_UPLOAD_MB" in response
    assert time.monotonic() - started < 30
    assert _state(base_url, settings.library_dir) == before


def test_streamed_oversize_upload_refused_while_streaming(base_url, settings, kept, adapter):
    before = _state(base_url, settings.library_dir)
    boundary = b"quiver"
    opening = (
        b"--quiver\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\nhuge\r\n"
        b"--quiver\r\nContent-Disposition: form-data; name=\"adapter_model\"; filename=\"adapter_model.safetensors\"\r\n"
        b"Content-Type: application/octet-stream\r\n\r\n"
    )
    head = (
        b"POST /experts HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Type: multipart/form-data; boundary=" + boundary + b"\r\n\r\n"
    )
    block = os.urandom(256 * 1024)
    pieces = [opening] + [block] * (settings.max_upload_mb * 4 + 8)  # twice the limit, never finished
    chunks = [b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces]

    response = _raw_exchange(base_url, head, chunks)

    assert response.startswith(b"HTTP/1.1 413"), response[:200]
    assert b"upload_too_large" in response
    assert b"while streaming" in response
    assert _state(base_url, settings.library_dir) == before


def test_upload_of_pickled_weights_is_stored_as_safetensors(base_url, settings, engine, tmp_path):
    from peft import LoraConfig, get_peft_model

    folder = tmp_path / "bin-adapter"
    torch.manual_seed(5)
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    model.save_pretrained(folder, safe_serialization=False)

    with Client(base_url=base_url, timeout=60) as client:
        created = client.upload_expert(folder, name="pickled")

    stored = settings.library_dir / "pickled"
    assert created.module_count == 2
    assert (stored / "adapter_model.safetensors").is_file()
    assert not (stored / "adapter_model.bin").exists()


def test_replace_swaps_weights_and_bumps_revision(base_url, settings, kept, tmp_path):
    new = make_adapter(tiny_llama(), tmp_path / "new", seed=7)
    revision = httpx.get(f"{base_url}/experts").json()["revision"]

    response = _post(base_url, _parts(new), name="kept", replace="true")

    assert response.status_code == 201
    replaced = response.json()
    assert replaced["weights_sha256"] != kept["weights_sha256"]
    assert httpx.get(f"{base_url}/experts").json()["revision"] == revision + 1
    stored = (settings.library_dir / "kept" / "adapter_model.safetensors").read_bytes()
    assert stored == (new / "adapter_model.safetensors").read_bytes()
    assert not list((settings.library_dir / ".staging").glob("*/replaced/*"))


def _greedy(base_url, expert):
    body = {"inputs": "abc abc", "parameters": {"max_new_tokens": 6, "routing": {"experts": [expert]}}}
    return httpx.post(f"{base_url}/generate", json=body, timeout=60).json()["generated_text"]


def test_replaced_weights_are_never_served_after_replace_returns(base_url, tmp_path):
    old = make_adapter(tiny_llama(), tmp_path / "old", seed=11, alpha=64)
    new = make_adapter(tiny_llama(), tmp_path / "new", seed=12, alpha=64)
    assert _post(base_url, _parts(old), name="swap").status_code == 201
    assert _post(base_url, _parts(new), name="probe").status_code == 201
    old_text, new_text = _greedy(base_url, "swap"), _greedy(base_url, "probe")
    assert old_text != new_text, "the two adapters must generate different text for this test to mean anything"

    results = []
    stop = threading.Event()

    def hammer():
        while not stop.is_set():
            started = time.monotonic()
            results.append((started, _greedy(base_url, "swap")))

    worker = threading.Thread(target=hammer)
    worker.start()
    try:
        while len(results) < 3:
            time.sleep(0.01)
        assert _post(base_url, _parts(new), name="swap", replace="true").status_code == 201
        replaced_at = time.monotonic()
        while sum(started > replaced_at for started, _ in results) < 5:
            time.sleep(0.01)
    finally:
        stop.set()
        worker.join()

    after = [text for started, text in results if started > replaced_at]
    before = [text for started, text in results if started <= replaced_at]
    assert set(after) == {new_text}
    assert old_text in before


def test_concurrent_uploads_of_one_name(base_url, settings, tmp_path):
    adapters = [make_adapter(tiny_llama(), tmp_path / f"race-{seed}", seed=seed) for seed in (21, 22)]
    for attempt in range(3):
        name = f"race{attempt}"
        barrier = threading.Barrier(2)
        statuses = {}

        def upload(index):
            files = _parts(adapters[index])
            barrier.wait()
            statuses[index] = _post(base_url, files, name=name)

        threads = [threading.Thread(target=upload, args=(index,)) for index in (0, 1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

        assert sorted(response.status_code for response in statuses.values()) == [201, 409]
        winner = next(index for index, response in statuses.items() if response.status_code == 201)
        stored = (settings.library_dir / name / "adapter_model.safetensors").read_bytes()
        assert stored == (adapters[winner] / "adapter_model.safetensors").read_bytes()
        assert httpx.get(f"{base_url}/experts/{name}").json()["weights_sha256"] == statuses[winner].json()["weights_sha256"]
    assert _greedy(base_url, "race0")


def test_upload_with_both_formats_is_refused(base_url, settings, kept, adapter):
    before = _state(base_url, settings.library_dir)
    files = dict(_parts(adapter), mttl_checkpoint=("expert.ckpt", b"PK\x03\x04"))

    response = _post(base_url, files, name="both")

    assert response.status_code == 422
    assert "not both" in response.json()["detail"]
    assert _state(base_url, settings.library_dir) == before



def test_unknown_form_field_is_refused(base_url, settings, kept, adapter):
    before = _state(base_url, settings.library_dir)

    response = _post(base_url, _parts(adapter), name="typo", tsak="a misspelt task")

    assert response.status_code == 422
    assert "unknown form fields 'tsak'" in response.json()["detail"]
    assert _state(base_url, settings.library_dir) == before


def test_bad_name_reported_with_adapter_problems(base_url, settings, kept, adapter):
    response = _post(base_url, _parts(adapter, weights=b""), name="a/b")

    problems = response.json()["problems"]
    assert response.status_code == 422
    assert any("contains '/'" in problem for problem in problems)
    assert any("is empty (0 bytes)" in problem for problem in problems)


def test_replace_keeps_task_unless_given(base_url, kept, tmp_path):
    new = make_adapter(tiny_llama(), tmp_path / "new", seed=9)
    kept_task = httpx.get(f"{base_url}/experts/kept").json()["task"]
    _post(base_url, _parts(new), name="kept", task="first task", replace="true")

    unchanged = _post(base_url, _parts(new), name="kept", replace="true").json()
    changed = _post(base_url, _parts(new), name="kept", replace="true", task="second task").json()

    assert kept_task is None
    assert unchanged["task"] == "first task"
    assert changed["task"] == "second task"


def test_same_problem_in_every_module_is_one_line(base_url, kept, adapter):
    files = _tensors(_map(lambda key, tensor: tensor.round().to(torch.int32)))(adapter)

    response = _post(base_url, files, name="ints")

    problems = response.json()["problems"]
    assert len(problems) == 2  # one for lora_A, one for lora_B
    assert all(problem.startswith("[6 modules: ") for problem in problems)
