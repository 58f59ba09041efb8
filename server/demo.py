"""``quiver demo`` and ``quiver train``: train the demo skill experts and show them routed.

The demo trains one LoRA expert per demo skill (or reuses them from the cache), starts a
Quiver server on 127.0.0.1 over a fresh demo library, uploads the experts through the client,
and prints each skill's answer with the routing weights measured during its generation::

    <cache_dir>/demo-experts/<config hash>/<skill>/   trained PEFT adapters, reused across runs
    <cache_dir>/demo-library/                         the demo server's library, recreated each run
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import sys
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path

from quiver.client import Client

from .settings import Settings

logger = logging.getLogger(__name__)

DEMO_MAX_NEW_TOKENS = 24


def demo_experts_dir(cache_dir: Path) -> Path:
    """Return the folder of the cached demo experts for the current training defaults."""
    from quiver.library.training import DEFAULT_TRAINING

    digest = hashlib.sha256(json.dumps(asdict(DEFAULT_TRAINING), sort_keys=True).encode()).hexdigest()[:12]
    return Path(cache_dir).expanduser() / "demo-experts" / digest


def _is_trained(folder: Path) -> bool:
    return (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()


def _progress_bar(skill: str):
    from tqdm.auto import tqdm

    bar = None

    def update(step: int, total: int, loss: float) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=f"training {skill}", unit="step", file=sys.stderr)
        bar.update(step - bar.n)
        bar.set_postfix(loss=f"{loss:.3f}")
        if step >= total:
            bar.close()

    return update


def ensure_demo_experts(settings: Settings, retrain: bool = False, skills: tuple[str, ...] | None = None) -> dict[str, Path]:
    """Train the experts of ``skills`` (default: the demo skills) not cached yet; return their folders by skill."""
    from quiver.library.skills import DEMO_SKILLS

    root = demo_experts_dir(settings.cache_dir)
    folders = {name: root / name for name in (skills or DEMO_SKILLS)}
    missing = [name for name, folder in folders.items() if retrain or not _is_trained(folder)]
    if not missing:
        print(f"Reusing the trained demo experts in {root}")
        return folders

    from quiver.library import load_base_model
    from quiver.library.training import train_expert

    print(f"Training {len(missing)} skill experts ({', '.join(missing)}) into {root}; later runs reuse them.")
    model, tokenizer = load_base_model(settings.base_model, device=settings.device, dtype=settings.dtype, cache_dir=settings.cache_dir)
    for name in missing:
        started = time.perf_counter()
        shutil.rmtree(folders[name], ignore_errors=True)
        train_expert(model, tokenizer, name, folders[name], progress=_progress_bar(name))
        print(f"  trained {name} in {time.perf_counter() - started:.0f} s")
    del model
    return folders


def _format_routing(routing: dict[str, float]) -> str:
    ranked = sorted(routing.items(), key=lambda item: -item[1])
    return "  ".join(f"{name} {weight:.0%}" for name, weight in ranked) or "(base model only)"


def run_demo(settings: Settings, *, port: int = 0, serve: bool = False, retrain: bool = False, results: list[dict] | None = None) -> int:
    """Run the demo end to end, print each skill's routed output, and return the exit status.

    ``results``, when given, receives one entry per prompt: skill, prompt, answer, correct and routing.
    """
    import uvicorn

    from quiver.library.skills import SKILLS, demo_prompts, score

    from .app import create_app

    experts = ensure_demo_experts(settings, retrain=retrain)

    library_dir = Path(settings.cache_dir).expanduser() / "demo-library"
    shutil.rmtree(library_dir, ignore_errors=True)
    if not port:
        from socket import socket

        with socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
    demo_settings = replace(settings, library_dir=library_dir, host="127.0.0.1", port=port)

    server = uvicorn.Server(uvicorn.Config(create_app(demo_settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="quiver-demo-server", daemon=True)
    thread.start()
    base_url = f"http://127.0.0.1:{port}"
    print(f"Starting the Quiver server on {base_url} ...")
    while not server.started:
        if not thread.is_alive():
            print("quiver demo: error: the server failed to start; see the log above", file=sys.stderr)
            return 1
        time.sleep(0.1)

    try:
        with Client(base_url=base_url, timeout=600) as client:
            for name, folder in experts.items():
                expert = client.upload_expert(folder, name=name, task=SKILLS[name].description)
                print(f"Uploaded expert {expert.name!r}: rank {expert.rank}, {expert.module_count} modules, prototypes computed")

            routing = client.health().routing
            print(
                f"\nOne prompt per skill, routed across all {len(experts)} experts "
                f"(method {routing['method']}, pooling {routing['pooling']}, top_k {routing['top_k']}):\n"
            )
            own_weights = []
            correct = 0
            for name, prompt in demo_prompts().items():
                answer = client.generate(prompt, max_new_tokens=DEMO_MAX_NEW_TOKENS)
                routing = answer.details.routing
                own_weights.append(routing.get(name, 0.0))
                is_correct = score(name, prompt, answer.generated_text)
                correct += is_correct
                if results is not None:
                    results.append({"skill": name, "prompt": prompt, "answer": answer.generated_text, "correct": bool(is_correct), "routing": routing})
                print(f"[{name}] {prompt.replace(chr(10), ' ')}")
                print(f"  answer:  {answer.generated_text.strip()!r} ({'correct' if is_correct else 'wrong'})")
                print(f"  routing: {_format_routing(routing)}\n")

            chance = 1 / len(experts)
            mean_own = sum(own_weights) / len(own_weights)
            print(
                f"{correct}/{len(own_weights)} answers correct. Mean routing weight on each prompt's own expert: "
                f"{mean_own:.0%} (an even mix would give {chance:.0%})."
            )
            print("Routing weights are averaged over every routed module and every position that produced a token.")
            if serve:
                print(f"\nServing the demo library at {base_url} until Ctrl-C. Try:\n"
                      f"  curl -s {base_url}/experts\n"
                      f"  curl -s {base_url}/generate -H 'Content-Type: application/json' "
                      f"-d '{{\"inputs\": \"Add the numbers: 31 + 45\\nAnswer:\"}}'")
                while thread.is_alive():
                    time.sleep(0.5)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
    return 0


def train_command(args: argparse.Namespace) -> int:
    """Run ``quiver train``: train one skill's expert and write it as a PEFT adapter folder."""
    from quiver.library.skills import SKILLS, get_skill
    from quiver.library.training import DEFAULT_TRAINING

    if args.list or not args.skill:
        stream = sys.stdout if args.list else sys.stderr
        if not args.list:
            print("quiver train: error: name the skill to train, one of:", file=stream)
        for skill in SKILLS.values():
            print(f"  {skill.name:<10} {skill.description}", file=stream)
        return 0 if args.list else 2

    skill = get_skill(args.skill)
    output = args.output or Path("adapters") / skill.name
    if output.exists() and any(output.iterdir()):
        print(f"quiver train: error: {output} exists and is not empty; choose another --output or remove it", file=sys.stderr)
        return 1

    from quiver.library import load_base_model
    from quiver.library.training import train_expert

    options = {
        "steps": args.steps or DEFAULT_TRAINING.steps,
        "rank": args.rank or DEFAULT_TRAINING.rank,
        "learning_rate": args.learning_rate or DEFAULT_TRAINING.learning_rate,
        "seed": args.seed,
    }
    model, tokenizer = load_base_model(args.base_model, cache_dir=args.cache_dir)
    started = time.perf_counter()
    train_expert(model, tokenizer, skill, output, progress=_progress_bar(skill.name), **options)
    seconds = time.perf_counter() - started
    if args.json:
        print(json.dumps({"skill": skill.name, "output": str(output), "seconds": round(seconds, 1), **options}))
    else:
        print(f"Trained {skill.name} in {seconds:.0f} s: {output}")
    return 0
