"""Shared pytest fixtures: a tiny random Llama model and a byte-level tokenizer built offline."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

TINY_EOS_TOKEN = "<eos>"
TINY_PAD_TOKEN = "<pad>"


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Build a tokenizer with one token per byte, plus pad and EOS tokens.

    It is a byte-level BPE model with no merges, so it encodes any text and needs no download.
    """
    vocab = {character: index for index, character in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab[TINY_PAD_TOKEN] = len(vocab)
    vocab[TINY_EOS_TOKEN] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=TINY_EOS_TOKEN, pad_token=TINY_PAD_TOKEN)


def build_tiny_llama(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> LlamaForCausalLM:
    """Build a randomly initialized two-layer Llama in evaluation mode, the same one for the same seed."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        # With the default 0.02, the frozen random output layer keeps every logit within about ±0.6, so no
        # adapter can bring the loss much below ln(vocabulary size) and training shows no progress.
        initializer_range=0.2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.eval()
    return model


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with pad and EOS tokens; see :func:`build_tiny_tokenizer`."""
    return build_tiny_tokenizer()


@pytest.fixture
def tiny_llama(tiny_tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """A fresh tiny random Llama for each test, so a test may change it."""
    return build_tiny_llama(tiny_tokenizer)


@pytest.fixture
def make_tiny_llama(tiny_tokenizer: PreTrainedTokenizerFast) -> Callable[[int], LlamaForCausalLM]:
    """A function that builds a new tiny random Llama from a seed, for tests that need several."""
    return lambda seed=0: build_tiny_llama(tiny_tokenizer, seed)
