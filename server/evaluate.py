"""``quiver eval``: compare routing methods on a library and task sets, and write the report."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .settings import Settings


def add_eval_parser(commands) -> None:
    parser = commands.add_parser(
        "eval",
        help="measure exact match and routing accuracy of each routing method",
        description="Generate answers for held-out prompts with every routing method and write evaluation.md, "
        "evaluation.json and evaluation.png. Each task's own expert must be in the library.",
    )
    parser.add_argument("--library-dir", type=Path, required=True, help="the expert library to evaluate")
    parser.add_argument("--skills", default="", help="comma-separated built-in skills to evaluate; each needs an expert of the same name")
    parser.add_argument("--count", type=int, default=20, help="held-out prompts per skill or data set (default: 20)")
    parser.add_argument("--dataset", action="append", default=[], metavar="PATH=EXPERT",
                        help="a data set with 'prompt' and 'answer' columns (saved folder, CSV, JSON Lines or Parquet file), "
                        "and the expert trained for it; repeatable")
    parser.add_argument("--methods", default="", help="comma-separated evaluation method names to run, as the report names them, "
                        "for example 'oracle,arrow top-1,sequence top-1' (default: all)")
    parser.add_argument("--output", type=Path, default=Path("docs"), help="folder for the report files (default: docs)")
    parser.add_argument("--json", action="store_true", help="print the summary rows and the written files as JSON")
    parser.add_argument("--max-new-tokens", type=int, default=24, help="generated tokens per prompt at most (default: 24)")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts generated together (default: 16)")
    parser.add_argument("--base-model", help="transformers causal LM id or local path (default: the embedded model)")
    parser.add_argument("--cache-dir", type=Path, help="cache folder for the converted embedded model (default: ~/.cache/quiver)")
    parser.add_argument("--device", help="'auto', 'cpu', 'cuda' or 'cuda:N' (default: auto)")
    parser.add_argument("--title", default="Routing evaluation", help="heading of evaluation.md")
    parser.set_defaults(handler=run_eval_command)


def run_eval_command(args: argparse.Namespace) -> int:
    import torch

    from quiver.library import ArrowRouter, ExpertLibrary, RoutingSettings, load_base_model
    from quiver.library.evaluation import Evaluator, dataset_task, default_methods, skill_tasks, summarize, write_report
    from quiver.library.statistics import load_or_compute_input_means

    if args.count < 1:
        raise ValueError(f"--count is {args.count}; expected at least 1 prompt per task")
    if not (args.library_dir / "quiver.json").is_file():
        raise ValueError(f"{args.library_dir} is not a Quiver library (no quiver.json); pass the folder the server uses as its library")
    tasks = skill_tasks([name for name in args.skills.split(",") if name], args.count)
    for spec in args.dataset:
        path, separator, expert = spec.rpartition("=")
        if not separator or not path or not expert:
            raise ValueError(f"--dataset {spec!r} is invalid: expected PATH=EXPERT")
        tasks.append(dataset_task(path, expert=expert, count=args.count))
    if not tasks:
        raise ValueError("nothing to evaluate: pass --skills or --dataset")

    methods = default_methods()
    if args.methods:
        wanted = [name.strip() for name in args.methods.split(",")]
        known = {method.name: method for method in methods}
        unknown = [name for name in wanted if name not in known]
        if unknown:
            raise ValueError(f"unknown method {', '.join(map(repr, unknown))}; known methods: {', '.join(known)}")
        methods = [known[name] for name in wanted]

    settings = Settings.from_env(base_model=args.base_model, cache_dir=args.cache_dir, device=args.device)
    model, tokenizer = load_base_model(settings.base_model, device=settings.device, dtype=settings.dtype, cache_dir=settings.cache_dir)
    library = ExpertLibrary(args.library_dir, model)
    missing = sorted({task.expert for task in tasks} - set(library.names()))
    if missing:
        raise ValueError(f"the library {args.library_dir} has no expert {', '.join(map(repr, missing))}; add one per task first")

    router = ArrowRouter(model)
    router.load_experts([library.load(name) for name in library.names()], library.revision)
    with torch.no_grad(), router.routing(RoutingSettings(experts=())):
        router.set_input_means(load_or_compute_input_means(library.root, model, tokenizer))

    evaluator = Evaluator(model, tokenizer, router, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    results = evaluator.run(tasks, methods, progress=lambda line: print(line, file=sys.stderr, flush=True))
    rows = summarize(results)
    paths = write_report(rows, results, args.output, title=args.title)
    if args.json:
        print(json.dumps({"methods": rows, "files": {kind: str(path) for kind, path in paths.items()}}, indent=2, default=str))
        return 0
    for row in rows:
        print(f"{row['method']:<22} mean exact match {row['mean']:.2f}")
    print(f"Wrote {', '.join(str(path) for path in paths.values())}")
    return 0
