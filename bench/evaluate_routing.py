"""Evaluate every routing method on the embedded model with one trained expert per built-in skill.

Trains the skill experts that are not cached yet (the same cache as ``quiver demo``), puts them
in a library, runs the ``quiver eval`` harness over held-out prompts of every skill, and writes
``docs/evaluation.md``, ``docs/evaluation.json`` and ``docs/evaluation.png``.

    .venv/bin/python bench/evaluate_routing.py --count 20

On a 2-core CPU, training takes about 1.5 minutes per expert when nothing else runs, and the
evaluation took about 12 minutes for 8 skills, 20 prompts each and the 14 default methods.
"""

from __future__ import annotations

import argparse
import logging
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

from quiver.library import ArrowRouter, ExpertLibrary, RoutingSettings, load_base_model
from quiver.library.evaluation import Evaluator, default_methods, skill_tasks, summarize, write_report
from quiver.library.skills import SKILLS
from quiver.library.statistics import load_or_compute_input_means
from quiver.server.demo import ensure_demo_experts
from quiver.server.settings import Settings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=20, help="held-out prompts per skill (default: 20)")
    parser.add_argument("--output", type=Path, default=Path("docs"), help="report folder (default: docs)")
    parser.add_argument("--methods", default="", help="comma-separated method names (default: all)")
    parser.add_argument("--batch-size", type=int, default=20, help="prompts generated together (default: 20)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    settings = Settings.from_env(device="cpu")
    started = time.perf_counter()
    experts = ensure_demo_experts(settings, skills=tuple(SKILLS))
    trained = time.perf_counter()

    model, tokenizer = load_base_model(device="cpu", cache_dir=settings.cache_dir)
    library_dir = Path(settings.cache_dir).expanduser() / "evaluation-library"
    shutil.rmtree(library_dir, ignore_errors=True)
    library = ExpertLibrary(library_dir, model)
    for name, folder in experts.items():
        library.add(name, folder, task=SKILLS[name].description)
    router = ArrowRouter(model)
    router.load_experts([library.load(name) for name in library.names()], library.revision)
    with torch.no_grad(), router.routing(RoutingSettings(experts=())):
        router.set_input_means(load_or_compute_input_means(library.root, model, tokenizer))

    methods = default_methods()
    if args.methods:
        wanted = set(args.methods.split(","))
        methods = [method for method in methods if method.name in wanted]
    tasks = skill_tasks(list(experts), args.count)
    evaluator = Evaluator(model, tokenizer, router, batch_size=args.batch_size)
    results = evaluator.run(tasks, methods, progress=lambda line: print(line, file=sys.stderr, flush=True))
    finished = time.perf_counter()

    notes = (
        f"Measured with `.venv/bin/python bench/evaluate_routing.py --count {args.count}` on "
        f"{platform.machine()} with {torch.get_num_threads()} CPU threads, torch {torch.__version__}, in float32. "
        f"Base model: the embedded SmolLM2-135M-Instruct. {len(experts)} skill experts, one per built-in skill "
        f"(rank 8 on all seven linear module kinds, trained by `quiver train` defaults); {args.count} held-out "
        f"prompts per skill, whose words, numbers and countries never appear in training; greedy decoding, at most "
        f"24 new tokens, exact match after stripping whitespace. Training took {trained - started:.0f} s "
        f"(0 when cached), the evaluation {finished - trained:.0f} s."
    )
    paths = write_report(summarize(results), results, args.output, title="Routing evaluation", notes=notes)
    print(f"Wrote {', '.join(str(path) for path in paths.values())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
