"""Builders for the tiny models and LoRA adapters that unit tests run on."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

TINY_VOCAB = 64


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """A two-layer Llama with hidden size 32 (about 30k parameters), in evaluation mode."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    model = LlamaForCausalLM(config).eval()
    model.config.name_or_path = "tiny-llama"
    return model


def make_adapter(
    model: torch.nn.Module,
    folder: Path,
    *,
    seed: int = 0,
    rank: int = 4,
    alpha: float = 8,
    target_modules: list[str] | str = ("q_proj", "v_proj", "down_proj"),
    **config: object,
) -> Path:
    """Save a PEFT LoRA adapter with random, non-zero A and B for ``model`` into ``folder``."""
    torch.manual_seed(seed)
    lora = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=list(target_modules) if not isinstance(target_modules, str) else target_modules,
        init_lora_weights=False,
        **config,
    )
    peft_model = get_peft_model(copy.deepcopy(model), lora)
    peft_model.save_pretrained(folder)
    return Path(folder)


def edit_weights(folder: Path, edit) -> None:
    """Rewrite the adapter's weights file with ``edit(tensors)`` applied to its tensors dict."""
    path = Path(folder) / "adapter_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def edit_config(folder: Path, edit) -> None:
    """Rewrite the adapter's config with ``edit(config)`` applied to its JSON object."""
    path = Path(folder) / "adapter_config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def library_snapshot(root: Path) -> dict[str, bytes]:
    """Every file under a library folder with its bytes, except the lock file, for before/after checks."""
    return {
        str(path.relative_to(root)): path.read_bytes()
        for path in sorted(Path(root).rglob("*"))
        if path.is_file() and path.name != ".lock"
    }


TINY_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789 :.,?!\n"


def tiny_tokenizer():
    """A character-level tokenizer whose ids fit :func:`tiny_llama`'s vocabulary, built offline."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<eos>"]
    vocab = {token: index for index, token in enumerate(specials + list(TINY_ALPHABET))}
    assert len(vocab) <= TINY_VOCAB
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")
    # A chat template that uses only characters of the alphabet, for the chat completion routes.
    tokenizer.chat_template = (
        "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    return tokenizer


def slow_down(model: torch.nn.Module, seconds: float) -> torch.nn.Module:
    """Make every forward pass of ``model`` take at least ``seconds`` longer, so tests can act while it generates."""
    import time

    model.register_forward_pre_hook(lambda module, args: time.sleep(seconds))
    return model
