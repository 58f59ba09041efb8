"""The ``quiver`` command through its installed entry point."""

import subprocess
import sys
from pathlib import Path

import pytest

QUIVER = str(Path(sys.executable).parent / "quiver")


def _run(*args, timeout=120):
    return subprocess.run([QUIVER, *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("command", [[], ["serve"], ["train"], ["demo"], ["eval"]])
def test_help_exits_zero(command):
    result = _run(*command, "--help")

    assert result.returncode == 0
    assert "usage: quiver" in result.stdout


def test_train_lists_skills():
    result = _run("train", "--list")

    assert result.returncode == 0
    for skill in ("reverse", "uppercase", "add", "capital", "sort", "spell", "subtract", "multiply"):
        assert skill in result.stdout


def test_train_unknown_skill_fails():
    result = _run("train", "poetry")

    assert result.returncode == 1
    assert "skill 'poetry' not found" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_eval_missing_library_fails(tmp_path):
    missing = tmp_path / "typo"

    result = _run("eval", "--library-dir", str(missing), "--skills", "add")

    assert result.returncode == 1
    assert "is not a Quiver library" in result.stderr
    assert not missing.exists()


def test_eval_zero_count_fails(tmp_path):
    result = _run("eval", "--library-dir", str(tmp_path), "--skills", "add", "--count", "0")

    assert result.returncode == 1
    assert "--count is 0" in result.stderr


def test_train_json_reports_the_adapter(tmp_path):
    import json

    from tests.factories import tiny_llama, tiny_tokenizer

    model_dir = tmp_path / "tiny-llama"
    tiny_llama().save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)

    result = _run("train", "reverse", "--steps", "2", "--base-model", str(model_dir), "--output", str(tmp_path / "out"), "--json")

    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["skill"] == "reverse"
    assert report["steps"] == 2
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
