"""Measure how well each routing method reuses a library: exact match and routing accuracy.

A task set is a list of (prompt, answer) pairs plus the name of the expert that was trained for
it (its *own* expert). For every method and task the harness generates greedily, in batches,
and reports:

- exact-match accuracy per task and on average, and the average as a share of the oracle's
  (each task served by its own expert alone);
- routing accuracy: the share of top-1 decisions (one per token and routed module) that pick
  the task's own expert, for prompt tokens and generated tokens apart, and by depth (first,
  middle and last third of the layers); and per request, the share of requests whose expert
  with the largest total weight is their own.

Routing decisions are read from one teacher-forced forward pass over each prompt and its
generated answer (cut at EOS), which makes the same per-token decisions as generation did,
because every decision depends only on the tokens before it.
"""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .routing import ArrowRouter, RoutingSettings
from .skills import exact_match

logger = logging.getLogger(__name__)

UNIFORM_TEMPERATURE = 1e9
"""A temperature so high that the softmax over all experts is uniform: a uniform merge."""

_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")
DEPTHS = ("first", "middle", "last")


@dataclass(frozen=True)
class TaskSet:
    """Prompts and answers of one task, and the expert trained for it."""

    name: str
    expert: str
    prompts: list[str]
    answers: list[str]


@dataclass(frozen=True)
class Method:
    """A way of serving a task: a routing setting, or the oracle (the task's own expert alone)."""

    name: str
    settings: RoutingSettings | None = None  # None: the oracle
    uniform: bool = False  # every expert in scope, equal weights

    def settings_for(self, task: TaskSet, experts: Sequence[str]) -> RoutingSettings:
        if self.settings is None:
            return RoutingSettings(experts=(task.expert,), top_k=1)
        if self.uniform:
            return RoutingSettings(top_k=len(experts), temperature=UNIFORM_TEMPERATURE)
        return self.settings


def default_methods() -> list[Method]:
    """Return the methods ``quiver eval`` compares by default."""
    methods = [
        Method("base model", RoutingSettings(experts=())),
        Method("oracle"),
        Method("uniform merge", RoutingSettings(), uniform=True),
    ]
    for k in (1, 2, 4):
        methods.append(Method(f"arrow top-{k}", RoutingSettings(method="arrow", top_k=k)))
    for k in (1, 2):
        methods.append(Method(f"centered top-{k}", RoutingSettings(method="centered", top_k=k)))
        methods.append(Method(f"normalized top-{k}", RoutingSettings(method="normalized", top_k=k, temperature=0.05)))
    methods += [
        Method("sequence top-1", RoutingSettings(method="sequence", top_k=1)),
        Method("sequence top-2", RoutingSettings(method="sequence", top_k=2, temperature=0.02)),
        Method("sequence vote top-1", RoutingSettings(method="sequence", pooling="vote", top_k=1)),
        Method("hybrid top-1", RoutingSettings(method="hybrid", top_k=1)),
    ]
    return methods


@dataclass
class _RoutingTally:
    """Counts of top-1 decisions on the task's own expert, by phase and depth."""

    hits: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    totals: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    request_hits: int = 0
    requests: int = 0

    def add(self, key: str, hits: int, total: int) -> None:
        self.hits[key] += hits
        self.totals[key] += total

    def shares(self) -> dict[str, float | None]:
        shares = {key: self.hits[key] / self.totals[key] if self.totals[key] else None for key in sorted(self.totals)}
        shares["request"] = self.request_hits / self.requests if self.requests else None
        return shares


class _TraceRecorder:
    """Keeps the dense routing weights (B, T, E) of every routed module in one forward pass."""

    def __init__(self) -> None:
        self.weights: dict[str, tuple[list[str], torch.Tensor]] = {}

    def record(self, module: str, expert_names: Sequence[str], weights: torch.Tensor, rows: torch.Tensor | None = None) -> None:
        self.weights[module] = (list(expert_names), weights.detach().float().cpu())


@dataclass(frozen=True)
class TaskResult:
    method: str
    task: str
    accuracy: float
    routing: dict[str, float | None]
    examples: list[dict[str, str | bool]]


def _depth(module: str, layer_count: int) -> str:
    match = _LAYER_INDEX.search("." + module)
    if match is None or layer_count < 1:
        return "middle"
    return DEPTHS[min(2, int(match.group(1)) * 3 // layer_count)]


class Evaluator:
    """Runs task sets through a routed model with each method.

    Args:
        model, tokenizer: the base model, with ``router`` installed in it.
        router: an :class:`ArrowRouter` holding the experts (and input statistics for the
            centred methods).
        max_new_tokens: generation length limit per prompt.
        batch_size: prompts generated together.
    """

    def __init__(self, model, tokenizer, router: ArrowRouter, *, max_new_tokens: int = 24, batch_size: int = 16) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.router = router
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.layer_count = int(getattr(model.config, "num_hidden_layers", 0))
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def run(self, tasks: Sequence[TaskSet], methods: Sequence[Method], progress: Callable[[str], None] | None = None) -> list[TaskResult]:
        results = []
        for method in methods:
            for task in tasks:
                result = self.run_task(task, method)
                results.append(result)
                if progress is not None:
                    progress(f"{method.name:<22} {task.name:<12} exact match {result.accuracy:.2f}")
        return results

    def run_task(self, task: TaskSet, method: Method) -> TaskResult:
        settings = method.settings_for(task, self.router.expert_names)
        tally = _RoutingTally()
        examples = []
        for start in range(0, len(task.prompts), self.batch_size):
            prompts = task.prompts[start : start + self.batch_size]
            answers = task.answers[start : start + self.batch_size]
            generated = self._generate(prompts, settings, task, tally)
            for prompt, answer, text in zip(prompts, answers, generated):
                examples.append({"prompt": prompt, "answer": answer, "generated": text, "correct": exact_match(answer, text)})
        accuracy = sum(example["correct"] for example in examples) / max(1, len(examples))
        return TaskResult(method.name, task.name, accuracy, tally.shares(), examples)

    def _generate(self, prompts: list[str], settings: RoutingSettings, task: TaskSet, tally: _RoutingTally) -> list[str]:
        tokenizer = self.tokenizer
        # Left padding puts every prompt's last token at the same position for generation.
        # The caller's tokenizer setting is restored afterwards.
        padding_side = tokenizer.padding_side
        tokenizer.padding_side = "left"
        try:
            encoded = tokenizer(prompts, return_tensors="pt", padding=True).to(self.device)
        finally:
            tokenizer.padding_side = padding_side
        prompt_length = encoded["input_ids"].shape[1]

        # 1. Generate greedily with the method's routing.
        with self.router.routing(settings):
            self.router.score_prompt(encoded["input_ids"], encoded["attention_mask"])
            output = self.model.generate(
                **encoded,
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        new_tokens = output[:, prompt_length:]  # (B, T_new)
        texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)

        # 2. Replay prompt and answer (up to and excluding EOS) to read the routing decisions.
        is_eos = new_tokens == tokenizer.eos_token_id
        generated_mask = (is_eos.long().cumsum(dim=-1) == 0).long()  # (B, T_new): 1 before the first EOS
        mask = torch.cat([encoded["attention_mask"], generated_mask], dim=-1)  # (B, T)
        if settings.experts != () and self.router.expert_names:
            recorder = _TraceRecorder()
            with self.router.routing(settings, recorder):
                self.router.score_prompt(encoded["input_ids"], encoded["attention_mask"])
                # Positions as generate() counts them: left padding takes no position.
                positions = (mask.cumsum(dim=-1) - 1).clamp_min(0)  # (B, T)
                self.model(input_ids=output, attention_mask=mask, position_ids=positions)
            self._tally(recorder, mask, prompt_length, task.expert, tally)
        return texts

    def _tally(self, recorder: _TraceRecorder, mask: torch.Tensor, prompt_length: int, own: str, tally: _RoutingTally) -> None:
        mask = mask.cpu().bool()  # (B, T)
        phase = torch.zeros_like(mask)
        phase[:, prompt_length:] = True  # (B, T): True on generated positions
        request_weights: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros(mask.shape[0]))
        for module, (names, weights) in recorder.weights.items():
            top1 = weights.argmax(dim=-1)  # (B, T)
            hit = torch.zeros_like(mask) if own not in names else (top1 == names.index(own))  # (B, T)
            depth = _depth(module, self.layer_count)
            for phase_name, in_phase in (("prompt", mask & ~phase), ("generated", mask & phase)):
                tally.add(phase_name, int((hit & in_phase).sum()), int(in_phase.sum()))
            tally.add(depth, int((hit & mask).sum()), int(mask.sum()))
            for index, name in enumerate(names):
                request_weights[name] += (weights[..., index] * mask).sum(dim=-1)  # (B,)
        if request_weights:
            names = sorted(request_weights)
            stacked = torch.stack([request_weights[name] for name in names], dim=-1)  # (B, E)
            winners = stacked.argmax(dim=-1).tolist()
            tally.request_hits += sum(names[winner] == own for winner in winners)
            tally.requests += len(winners)


def skill_tasks(skills: Sequence[str], count: int, seed: int = 0) -> list[TaskSet]:
    """Return held-out task sets of the built-in skills; each skill's own expert has its name."""
    from .skills import make_examples

    tasks = []
    for skill in skills:
        examples = make_examples(skill, "test", count, seed=seed)
        tasks.append(TaskSet(skill, skill, [example.prompt for example in examples], [example.answer for example in examples]))
    return tasks


def dataset_task(path: str, *, expert: str, name: str | None = None, prompt_column: str = "prompt", answer_column: str = "answer", split: str = "test", count: int | None = None) -> TaskSet:
    """Return a task set from a ``datasets`` data set with prompt and answer columns.

    ``path`` is a folder saved with ``Dataset.save_to_disk``, a data file (CSV, JSON, JSON
    Lines or Parquet), or anything ``datasets.load_dataset`` can open without a download.
    """
    import datasets

    source = Path(path)
    if source.is_dir() and (source / "dataset_info.json").is_file():
        data = datasets.load_from_disk(str(source))
    elif source.is_file():
        kind = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}.get(source.suffix)
        if kind is None:
            raise ValueError(f"data file {path!r} has an unknown extension; use .csv, .json, .jsonl or .parquet")
        data = datasets.load_dataset(kind, data_files=str(source), split="train")
    else:
        data = datasets.load_dataset(path, split=split)
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise ValueError(f"data set {path!r} has no split {split!r}; it has {', '.join(data)}")
        data = data[split]
    missing = [column for column in (prompt_column, answer_column) if column not in data.column_names]
    if missing:
        raise ValueError(f"data set {path!r} has no column {', '.join(map(repr, missing))}; its columns are {', '.join(data.column_names)}")
    if count is not None:
        data = data.select(range(min(count, len(data))))
    return TaskSet(name or source.stem, expert, [str(value) for value in data[prompt_column]], [str(value) for value in data[answer_column]])


def summarize(results: Sequence[TaskResult]) -> list[dict]:
    """Return one row per method: per-task accuracy, mean, share of the oracle, routing accuracy."""
    by_method: dict[str, list[TaskResult]] = defaultdict(list)
    for result in results:
        by_method[result.method].append(result)
    oracle = by_method.get("oracle")
    oracle_mean = sum(result.accuracy for result in oracle) / len(oracle) if oracle else None

    rows = []
    for method, method_results in by_method.items():
        mean = sum(result.accuracy for result in method_results) / len(method_results)
        routing: dict[str, list[float]] = defaultdict(list)
        for result in method_results:
            for key, value in result.routing.items():
                if value is not None:
                    routing[key].append(value)
        rows.append(
            {
                "method": method,
                "tasks": {result.task: result.accuracy for result in method_results},
                "mean": mean,
                "share_of_oracle": mean / oracle_mean if oracle_mean else None,
                "routing_accuracy": {key: sum(values) / len(values) for key, values in sorted(routing.items())},
            }
        )
    return rows


def write_report(rows: list[dict], results: Sequence[TaskResult], folder: Path, *, title: str, notes: str = "") -> dict[str, Path]:
    """Write ``evaluation.md``, ``evaluation.json`` and ``evaluation.png`` into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": folder / "evaluation.md", "json": folder / "evaluation.json", "plot": folder / "evaluation.png"}
    tasks = list(rows[0]["tasks"]) if rows else []

    lines = [f"# {title}", ""]
    if notes:
        lines += [notes.strip(), ""]
    lines += [
        "Exact match per task, the mean, the mean as a share of the oracle's, and routing accuracy: the share of",
        "top-1 decisions on the task's own expert over prompt tokens, generated tokens, each third of the layers,",
        "and per request (the expert with the largest total weight). A dash means the method routes nothing.",
        "",
        "| method | " + " | ".join(tasks) + " | mean | of oracle | route prompt | route generated | first | middle | last | per request |",
        "| --- | " + " | ".join("---:" for _ in tasks) + " | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]

    def cell(value: float | None) -> str:
        return "–" if value is None else f"{value:.2f}"

    for row in rows:
        routing = row["routing_accuracy"]
        cells = [cell(row["tasks"][task]) for task in tasks]
        cells += [cell(row["mean"]), cell(row["share_of_oracle"])]
        cells += [cell(routing.get(key)) for key in ("prompt", "generated", "first", "middle", "last", "request")]
        lines.append(f"| {row['method']} | " + " | ".join(cells) + " |")
    paths["markdown"].write_text("\n".join(lines) + "\n", encoding="utf-8")

    payload = {"summary": rows, "results": [asdict(result) for result in results]}
    paths["json"].write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    _plot(rows, paths["plot"])
    return paths


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [row["method"] for row in rows]
    means = [row["mean"] for row in rows]
    figure, axes = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.2))
    axes.barh(names, means, color="#4c72b0")
    axes.invert_yaxis()
    axes.set_xlim(0, 1)
    axes.set_xlabel("mean exact match")
    axes.set_title("Accuracy by routing method")
    for y, value in enumerate(means):
        axes.text(value + 0.01, y, f"{value:.2f}", va="center", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
