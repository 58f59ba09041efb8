"""Export: an expert downloaded from the server loads in PEFT and gives the logits Quiver serves."""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from quiver.client import Client, ConflictError, InvalidExpertError, NotFoundError
from quiver.client.models import GenerateParameters
from quiver.library import RoutingSettings
from tests.factories import make_adapter, tiny_llama, tiny_tokenizer

QUIVER = str(Path(sys.executable).parent / "quiver")


@pytest.fixture
def client(base_url):
    with Client(base_url=base_url, timeout=60) as client:
        yield client


def _served_logits(engine, name, ids):
    """Logits of the server's own routed model with only ``name`` in scope."""
    engine.generate("a", GenerateParameters(max_new_tokens=1))  # loads the library's current experts
    with torch.no_grad(), engine.router.routing(RoutingSettings(experts=(name,), top_k=1)):
        return engine.model(input_ids=ids).logits


@pytest.mark.parametrize(
    "options",
    [{}, {"use_rslora": True}, {"rank_pattern": {"v_proj": 2}, "alpha_pattern": {"q_proj": 3}}],
    ids=["plain", "rslora", "patterns"],
)
def test_exported_adapter_loads_in_peft_with_served_logits(client, engine, tmp_path, options):
    adapter = make_adapter(tiny_llama(), tmp_path / "adapter", seed=6, **options)
    client.upload_expert(adapter, name="round-trip", task="round trip")

    folder = client.export_expert("round-trip", tmp_path / "exported")

    assert sorted(path.name for path in folder.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert "base_model:" in (folder / "README.md").read_text()
    peft_model = PeftModel.from_pretrained(tiny_llama(), folder).eval()
    ids = torch.randint(3, 40, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    served = _served_logits(engine, "round-trip", ids)
    assert (served - expected).abs().max() <= 1e-5
    with torch.no_grad():
        assert (expected - tiny_llama()(input_ids=ids).logits).abs().max() > 1e-3


def test_exported_adapter_generates_what_the_server_generates(client, tmp_path):
    client.upload_expert(make_adapter(tiny_llama(), tmp_path / "adapter", seed=8, alpha=64), name="talker")
    folder = client.export_expert("talker", tmp_path / "exported")
    tokenizer = tiny_tokenizer()
    peft_model = PeftModel.from_pretrained(tiny_llama(), folder).eval()
    prompt = "abc 123"

    served = client.generate(prompt, max_new_tokens=8, routing={"experts": ["talker"]})
    encoded = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        output = peft_model.generate(**encoded, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    expected = tokenizer.decode(output[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)

    assert served.generated_text == expected


def test_export_of_pickled_upload_is_safetensors(client, tmp_path):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(2)
    source = get_peft_model(copy.deepcopy(tiny_llama()), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    source.save_pretrained(tmp_path / "bin", safe_serialization=False)
    client.upload_expert(tmp_path / "bin", name="pickled")

    folder = client.export_expert("pickled", tmp_path / "exported")

    assert (folder / "adapter_model.safetensors").is_file()
    PeftModel.from_pretrained(tiny_llama(), folder)


def test_export_unknown_expert_is_404(client, tmp_path):
    with pytest.raises(NotFoundError, match="'ghost' not found"):
        client.export_expert("ghost", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_refuses_to_overwrite(client, tmp_path):
    client.upload_expert(make_adapter(tiny_llama(), tmp_path / "adapter", seed=6), name="kept")
    client.export_expert("kept", tmp_path / "out")

    with pytest.raises(FileExistsError, match="already contains an adapter"):
        client.export_expert("kept", tmp_path / "out")
    assert client.export_expert("kept", tmp_path / "out", overwrite=True) == tmp_path / "out"


def test_client_replace_and_conflict(client, tmp_path):
    first = client.upload_expert(make_adapter(tiny_llama(), tmp_path / "one", seed=1), name="swap")

    with pytest.raises(ConflictError, match="replace"):
        client.upload_expert(make_adapter(tiny_llama(), tmp_path / "two", seed=2), name="swap")
    second = client.replace_expert(tmp_path / "two", name="swap")

    assert second.weights_sha256 != first.weights_sha256
    assert client.get_expert("swap").weights_sha256 == second.weights_sha256


def test_client_imports_mttl_checkpoint(client, tmp_path):
    from tests.library.test_mttl import _mttl_checkpoint

    adapter = make_adapter(tiny_llama(), tmp_path / "adapter", seed=4)
    checkpoint = _mttl_checkpoint(adapter, tmp_path / "expert.ckpt")

    created = client.import_mttl(checkpoint, name="adder")

    assert created.task == "add two numbers"
    assert created.module_count == 6
    with pytest.raises(InvalidExpertError) as raised:
        client.import_mttl(adapter / "adapter_config.json", name="not-a-checkpoint")
    assert any("not a torch.save file" in problem for problem in raised.value.problems)


def _quiver(*args):
    return subprocess.run([QUIVER, *args], capture_output=True, text=True, timeout=120)


def test_cli_experts_commands(base_url, tmp_path):
    adapter = make_adapter(tiny_llama(), tmp_path / "adapter", seed=6)

    added = _quiver("experts", "add", str(adapter), "--name", "cli", "--task", "demo", "--url", base_url)
    listed = _quiver("experts", "list", "--json", "--url", base_url)
    shown = _quiver("experts", "show", "cli", "--url", base_url)
    exported = _quiver("experts", "export", "cli", str(tmp_path / "out"), "--url", base_url)
    again = _quiver("experts", "add", str(adapter), "--name", "cli", "--url", base_url)
    replaced = _quiver("experts", "add", str(adapter), "--name", "cli", "--replace", "--url", base_url)
    removed = _quiver("experts", "rm", "cli", "--url", base_url)
    missing = _quiver("experts", "show", "cli", "--url", base_url)

    assert added.returncode == 0
    assert "added expert cli" in added.stdout
    assert [expert["name"] for expert in json.loads(listed.stdout)] == ["cli"]
    assert "task: demo" in shown.stdout
    assert exported.returncode == 0
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert again.returncode == 1
    assert "already exists" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    assert replaced.returncode == 0
    assert "replaced expert cli" in replaced.stdout
    assert removed.returncode == 0
    assert missing.returncode == 1
    assert "not found" in missing.stderr


def test_cli_add_bad_folder_fails_with_one_line(tmp_path):
    result = _quiver("experts", "add", str(tmp_path), "--name", "x", "--url", "http://127.0.0.1:9")

    assert result.returncode == 1
    assert "is not a PEFT LoRA adapter folder" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_adapter_id_serves_one_expert_like_peft(client, tmp_path):
    client.upload_expert(make_adapter(tiny_llama(), tmp_path / "one", seed=8, alpha=64), name="one")
    client.upload_expert(make_adapter(tiny_llama(), tmp_path / "two", seed=9, alpha=64), name="two")
    tokenizer = tiny_tokenizer()
    peft_model = PeftModel.from_pretrained(tiny_llama(), tmp_path / "two").eval()
    encoded = tokenizer("abc 123", return_tensors="pt")
    with torch.no_grad():
        output = peft_model.generate(**encoded, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)

    served = client.generate("abc 123", max_new_tokens=8, adapter_id="two")

    assert served.generated_text == tokenizer.decode(output[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
    assert served.details.routing == {"two": 1.0}


def test_merged_adapters_and_their_errors(client, base_url, tmp_path):
    import httpx

    client.upload_expert(make_adapter(tiny_llama(), tmp_path / "one", seed=8), name="one")
    client.upload_expert(make_adapter(tiny_llama(), tmp_path / "two", seed=9), name="two")

    merged = client.generate("abc", max_new_tokens=3, merged_adapters={"ids": ["one", "two"], "weights": [0.25, 0.75]})
    both = httpx.post(f"{base_url}/generate", json={"inputs": "abc", "parameters": {"adapter_id": "one", "merged_adapters": {"ids": ["two"]}}})
    uneven = httpx.post(f"{base_url}/generate", json={"inputs": "abc", "parameters": {"merged_adapters": {"ids": ["one", "two"], "weights": [1.0]}}})
    unknown = httpx.post(f"{base_url}/generate", json={"inputs": "abc", "parameters": {"adapter_id": "ghost"}})

    assert merged.details.routing == {"one": 0.25, "two": 0.75}
    assert both.status_code == 422
    assert "not both" in both.json()["detail"]
    assert uneven.status_code == 422
    assert "one weight per id" in uneven.json()["detail"]
    assert unknown.status_code == 404
    assert "'ghost'" in unknown.json()["detail"]
