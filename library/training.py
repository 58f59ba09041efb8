"""Train one LoRA expert on a demo skill, and measure a skill's held-out exact-match accuracy.

:func:`train_expert` adapts the base model in place with PEFT, trains with a plain AdamW loop and
removes the adapter layers again before it returns, so the caller's model is left as it was.
Of what PEFT's ``save_pretrained`` writes, the adapter folder keeps only these two files::

    <output_dir>/
      adapter_config.json
      adapter_model.safetensors
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from .skills import Skill, exact_match, get_skill, make_examples

logger = logging.getLogger(__name__)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
"""The files of a saved expert; :func:`train_expert` removes anything else PEFT writes."""

ALL_LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The seven linear module kinds of a Llama decoder layer."""


@dataclass(frozen=True)
class TrainingConfig:
    """Hyperparameters of :func:`train_expert`."""

    steps: int
    rank: int
    alpha: int
    learning_rate: float
    batch_size: int
    target_modules: tuple[str, ...]
    warmup_steps: int


DEFAULT_TRAINING = TrainingConfig(
    steps=60,
    rank=8,
    alpha=16,
    learning_rate=5e-4,
    batch_size=8,
    target_modules=ALL_LINEAR_MODULES,
    warmup_steps=5,
)
"""Defaults for the demo experts on SmolLM2-135M-Instruct, sized for a CPU.

The README promises a first ``quiver demo`` run of 15 minutes, which leaves about 8 minutes to
train the four experts on a 2-core CPU. Measured on a 2-core AMD EPYC (AVX2) virtual machine in
float32 with torch 2.13, in two runs: 65-114 s per expert, 320-340 s for all four. Held-out
exact match of each expert alone, from ``evaluate_skill(count=60, seed=2)`` (count=22, every
test country, for capital): reverse 0.87, uppercase 0.18, add 0.85, capital 0.82. The base
model without an adapter scores 0 on every skill, mainly because it keeps generating after
the answer.
A learning rate of 1e-3 scored the same or lower, and made the capital expert garble names.
"""

ProgressCallback = Callable[[int, int, float], None]


@contextmanager
def _peft_deprecation_silenced() -> Iterator[None]:
    """Hide the FutureWarning that PeftModel.__init__ triggers on every adapter it wraps.

    peft 0.21.2 reads ``is_gradient_checkpointing``, which transformers 5.25 deprecates.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


@contextmanager
def _model_state_restored(model: PreTrainedModel) -> Iterator[None]:
    """Restore the training mode and each parameter's ``requires_grad`` flag on exit.

    PEFT freezes every base parameter when it wraps a model, and unload() does not undo that.
    """
    was_training = model.training
    requires_grad = {name: parameter.requires_grad for name, parameter in model.named_parameters()}
    try:
        yield
    finally:
        for name, parameter in model.named_parameters():
            if name in requires_grad:
                parameter.requires_grad_(requires_grad[name])
        model.train(was_training)


def train_expert(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    skill: Skill | str,
    output_dir: str | os.PathLike[str],
    *,
    steps: int = DEFAULT_TRAINING.steps,
    rank: int = DEFAULT_TRAINING.rank,
    alpha: int = DEFAULT_TRAINING.alpha,
    learning_rate: float = DEFAULT_TRAINING.learning_rate,
    batch_size: int = DEFAULT_TRAINING.batch_size,
    target_modules: Sequence[str] = DEFAULT_TRAINING.target_modules,
    warmup_steps: int = DEFAULT_TRAINING.warmup_steps,
    seed: int = 0,
    progress: ProgressCallback | None = None,
) -> Path:
    """Train a LoRA adapter for ``skill`` on ``model`` and save it to ``output_dir``.

    The loss covers only the answer tokens and the EOS token after them. The run is
    deterministic for a given ``seed`` on the same hardware and thread count. The adapter is
    saved into a temporary folder next to ``output_dir`` and renamed into place, so
    ``output_dir`` never holds a partial adapter. ``progress(step, steps, loss)`` is called
    after every optimizer step, with ``step`` counting from 1.

    Returns:
        ``output_dir`` as a :class:`~pathlib.Path`.

    Raises:
        FileExistsError: ``output_dir`` already exists.
        SkillNotFoundError: ``skill`` is a name that no skill has.
        ValueError: a hyperparameter is out of range.
    """
    resolved = skill if isinstance(skill, Skill) else get_skill(skill)
    output = Path(output_dir)
    _check_hyperparameters(
        steps=steps, rank=rank, batch_size=batch_size, learning_rate=learning_rate, warmup_steps=warmup_steps
    )
    if output.exists():
        raise FileExistsError(f"output folder {output} already exists; remove it or choose another folder")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token, so a trained expert could not stop generating")

    examples = make_examples(resolved, "train", steps * batch_size, seed=seed)
    dataset = _tokenize(
        Dataset.from_list([example._asdict() for example in examples]),
        tokenizer,
    )
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=list(target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    logger.info(
        "training expert %r: %d steps of %d examples, rank %d, learning rate %g, modules %s",
        resolved.name, steps, batch_size, rank, learning_rate, ",".join(target_modules),
    )

    output.parent.mkdir(parents=True, exist_ok=True)
    # mkdir, unlike tempfile.mkdtemp, applies the umask, so the renamed folder gets the usual mode
    # and not 0700.
    staging = output.parent / f".{output.name}.{uuid.uuid4().hex}.tmp"
    staging.mkdir()
    started = time.monotonic()
    # get_peft_model draws the LoRA A matrices from torch's global generator. Forking it keeps
    # the run reproducible and leaves the caller's random state as it was.
    with torch.random.fork_rng(devices=[]), _model_state_restored(model):
        torch.manual_seed(seed)
        with _peft_deprecation_silenced():
            peft_model = get_peft_model(model, config)
        try:
            losses = _run_training(
                peft_model, dataset, tokenizer,
                steps=steps, batch_size=batch_size, learning_rate=learning_rate,
                warmup_steps=warmup_steps, progress=progress,
            )
            peft_model.save_pretrained(staging)
            _keep_only_adapter_files(staging)
            try:
                os.replace(staging, output)
            except OSError as error:
                raise FileExistsError(f"cannot move the trained adapter to {output}: {error}") from error
        finally:
            # unload() puts the original linear layers back without merging the adapter into them.
            peft_model.unload()
            shutil.rmtree(staging, ignore_errors=True)

    logger.info(
        "trained expert %r in %.1f s: loss %.4f at the first step, %.4f at the last; saved to %s",
        resolved.name, time.monotonic() - started, losses[0], losses[-1], output,
    )
    return output


def _check_hyperparameters(*, steps: int, rank: int, batch_size: int, learning_rate: float, warmup_steps: int) -> None:
    for name, value in (("steps", steps), ("rank", rank), ("batch_size", batch_size)):
        if value < 1:
            raise ValueError(f"{name} must be 1 or more, got {value}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be 0 or more, got {warmup_steps}")
    if not learning_rate > 0:
        raise ValueError(f"learning_rate must be positive, got {learning_rate}")


def _tokenize(dataset: Dataset, tokenizer: PreTrainedTokenizerBase) -> Dataset:
    """Add ``input_ids`` and ``answer_length`` (the answer tokens plus EOS) to each example.

    The prompt and the answer are tokenized apart, because generation also starts from the
    prompt's tokens alone. The prompt gets the tokenizer's default special tokens, as
    ``tokenizer(prompt)`` gives them at generation time (SmolLM2's tokenizer adds none).
    """

    def encode(example: dict[str, str]) -> dict[str, object]:
        prompt_ids = tokenizer(example["prompt"])["input_ids"]
        answer_ids = tokenizer(example["answer"], add_special_tokens=False)["input_ids"]
        answer_ids = [*answer_ids, tokenizer.eos_token_id]
        return {"input_ids": prompt_ids + answer_ids, "answer_length": len(answer_ids)}

    # The map progress bar would interleave with the caller's own progress display.
    bars_were_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        return dataset.map(encode, remove_columns=dataset.column_names)
    finally:
        if bars_were_enabled:
            datasets.enable_progress_bars()


def _collate(rows: list[dict[str, list[int] | int]], pad_token_id: int) -> dict[str, torch.Tensor | int]:
    """Left-pad a batch, so every answer ends at the last position.

    With the answers aligned at the end, the model computes logits for only the last
    ``max answer length + 1`` positions, which skips most of the vocabulary projection.
    """
    length = max(len(row["input_ids"]) for row in rows)
    answer_span = max(row["answer_length"] for row in rows)
    input_ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    loss_mask = torch.zeros((len(rows), answer_span), dtype=torch.bool)
    for index, row in enumerate(rows):
        ids = row["input_ids"]
        input_ids[index, length - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[index, length - len(ids) :] = 1
        loss_mask[index, answer_span - row["answer_length"] :] = True
    # Positions count from 0 at each row's first real token, as they do in unpadded generation.
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "loss_mask": loss_mask,
        "answer_span": answer_span,
    }


def _run_training(
    peft_model: PeftModel,
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    *,
    steps: int,
    batch_size: int,
    learning_rate: float,
    warmup_steps: int,
    progress: ProgressCallback | None,
) -> list[float]:
    """Run ``steps`` AdamW steps over consecutive batches of ``dataset`` and return each step's loss."""
    parameters = [parameter for parameter in peft_model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0)
    # Linear warmup, then linear decay to zero at the last step.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min((step + 1) / max(warmup_steps, 1), max(steps - step, 0) / max(steps - warmup_steps, 1)),
    )
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(peft_model.parameters()).device

    peft_model.train()
    losses: list[float] = []
    for step in range(steps):
        batch = _collate(_rows(dataset, step, batch_size), pad_token_id)
        span = batch["answer_span"]
        outputs = peft_model(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            position_ids=batch["position_ids"].to(device),
            logits_to_keep=span + 1,
            use_cache=False,
        )
        # The logit at position i predicts token i + 1, so the kept logits, less the last one,
        # predict the last `span` tokens.
        logits = outputs.logits[:, :-1, :].float()
        targets = batch["input_ids"][:, -span:].to(device)
        mask = batch["loss_mask"].to(device)
        loss = torch.nn.functional.cross_entropy(logits[mask], targets[mask])

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()

        losses.append(loss.item())
        logger.debug("step %d/%d: loss %.4f", step + 1, steps, losses[-1])
        if progress is not None:
            progress(step + 1, steps, losses[-1])
    return losses


def _rows(dataset: Dataset, step: int, batch_size: int) -> list[dict[str, list[int] | int]]:
    batch = dataset[step * batch_size : (step + 1) * batch_size]
    return [
        {"input_ids": input_ids, "answer_length": answer_length}
        for input_ids, answer_length in zip(batch["input_ids"], batch["answer_length"], strict=True)
    ]


def _keep_only_adapter_files(folder: Path) -> None:
    """Delete what PEFT saves besides the adapter, such as its README.md model card."""
    for path in folder.iterdir():
        if path.name in ADAPTER_FILES:
            continue
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    missing = [name for name in ADAPTER_FILES if not (folder / name).is_file()]
    if missing:
        raise RuntimeError(f"PEFT did not write {', '.join(missing)} into {folder}")


@torch.no_grad()
def generate_greedy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int = 32,
) -> list[str]:
    """Generate a greedy continuation of each prompt, stopping at the EOS token.

    Prompts are left-padded into batches, and the returned texts exclude the prompt and the
    special tokens.
    """
    pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    generation_config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=pad_token_id,
    )
    device = next(model.parameters()).device
    texts: list[str] = []
    for start in range(0, len(prompts), batch_size):
        encoded = [tokenizer(prompt)["input_ids"] for prompt in prompts[start : start + batch_size]]
        length = max(len(ids) for ids in encoded)
        input_ids = torch.full((len(encoded), length), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), length), dtype=torch.long)
        for index, ids in enumerate(encoded):
            input_ids[index, length - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[index, length - len(ids) :] = 1
        output = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            generation_config=generation_config,
        )
        texts.extend(tokenizer.batch_decode(output[:, length:], skip_special_tokens=True))
    return texts


def evaluate_skill(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    skill: Skill | str,
    count: int = 20,
    adapter_dir: str | os.PathLike[str] | None = None,
    *,
    seed: int = 0,
    max_new_tokens: int = 16,
) -> float:
    """Measure the exact-match accuracy of greedy answers to ``count`` held-out prompts of ``skill``.

    With ``adapter_dir``, the adapter is loaded onto ``model`` for the evaluation and removed
    afterwards.
    """
    resolved = skill if isinstance(skill, Skill) else get_skill(skill)
    examples = make_examples(resolved, "test", count, seed=seed)
    if not examples:
        return 0.0

    prompts = [example.prompt for example in examples]
    with _model_state_restored(model):
        if adapter_dir is None:
            model.eval()
            generated = generate_greedy(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
        else:
            with _peft_deprecation_silenced():
                adapted = PeftModel.from_pretrained(model, str(adapter_dir))
            try:
                adapted.eval()
                generated = generate_greedy(adapted, tokenizer, prompts, max_new_tokens=max_new_tokens)
            finally:
                adapted.unload()

    correct = sum(exact_match(example.answer, text) for example, text in zip(examples, generated, strict=True))
    for example, text in zip(examples, generated, strict=True):
        logger.debug("%s: %r -> %r (expected %r)", resolved.name, example.prompt, text, example.answer)
    return correct / len(examples)
