"""A write killed at any file-system step leaves the library loadable, with each expert whole.

Each write runs in a child process that replaces the store's file operations with counting
wrappers and sends itself SIGKILL just before the K-th one. A first run without a kill counts the
steps, then one child runs per kill point, each on its own copy of the library. The parent then
opens the copy, which runs recovery, and checks what readers would see.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from quiver.library import ExpertLibrary
from quiver.library.arrow import load_prototypes
from quiver.library.store import render_model_card
from tests.factories import library_snapshot, make_adapter, tiny_llama

REPO_ROOT = Path(__file__).resolve().parents[2]
WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
EXPERT_JSON = "expert.json"

# Each child spends about 6 s importing torch and transformers (measured on 2 cores), so at most two run at once.
WORKERS = 2
CHILD_TIMEOUT_S = 180

# argv: library folder, expert name, adapter folder, "replace" or "add", kill point (0 runs to the end).
# The child prints the list of steps it reached as JSON when it is not killed.
CHILD_SCRIPT = """
import json, os, pathlib, shutil, signal, sys

import quiver.library.store as store
from tests.factories import tiny_llama

root, name, adapter, mode, kill_at = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
library = store.ExpertLibrary(root, tiny_llama())
steps = []

def describe(argument):
    return pathlib.Path(argument).name if isinstance(argument, (str, os.PathLike)) else "..."

def counted(label, operation):
    def run_step(*args, **kwargs):
        steps.append(label + "(" + ", ".join(describe(argument) for argument in args[:2]) + ")")
        if len(steps) == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        return operation(*args, **kwargs)
    return run_step

# Wrapped after opening, so only the write's own steps count. store.save_prototypes covers the
# safetensors write of arrow.safetensors, and store.save_file writes converted pickled weights.
# Path.write_text is left out because it writes expert.json into staging or a temporary file that
# the next os.replace renames. A kill before it leaves the state of a kill before that rename, less
# a temporary file, and each extra kill point costs another child.
os.replace = counted("os.replace", os.replace)
shutil.copyfile = counted("shutil.copyfile", shutil.copyfile)
store.save_prototypes = counted("save_prototypes", store.save_prototypes)
store.save_file = counted("save_file", store.save_file)

library.add(name, adapter, replace=mode == "replace")
print(json.dumps(steps))
"""


@dataclass(frozen=True)
class Scenario:
    expert: str
    adapter: Path
    mode: str


@dataclass(frozen=True)
class Setup:
    model: torch.nn.Module
    base: Path
    base_revision: int
    new_adapter: Path
    work: Path
    scenarios: dict[str, Scenario]
    steps: dict[str, list[str]]
    finished: dict[str, Path]


def run_child(root: Path, scenario: Scenario, kill_at: int) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    # One thread per child keeps two children from competing for cores, and it keeps the order of
    # floating-point sums the same in every child, so prototypes match the full run exactly.
    env["OMP_NUM_THREADS"] = "1"
    command = [sys.executable, "-c", CHILD_SCRIPT, str(root), scenario.expert, str(scenario.adapter), scenario.mode, str(kill_at)]
    return subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)


def copy_library(base: Path, target: Path) -> Path:
    shutil.copytree(base, target)
    return target


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> Setup:
    """Build a library containing "other" and "target", then count each scenario's steps with one full run."""
    work = tmp_path_factory.mktemp("crash")
    model = tiny_llama()
    old_adapter = make_adapter(model, work / "adapter-old", seed=1)
    new_adapter = make_adapter(model, work / "adapter-new", seed=2)
    other_adapter = make_adapter(model, work / "adapter-other", seed=3)

    base = work / "base"
    library = ExpertLibrary(base, model)
    library.add("other", other_adapter, task="untouched bystander")
    library.add("target", old_adapter)

    scenarios = {
        "add": Scenario("fresh", new_adapter, "add"),
        "replace": Scenario("target", new_adapter, "replace"),
    }
    base_revision = library.revision

    finished = {label: copy_library(base, work / f"{label}-finished") for label in scenarios}
    with ThreadPoolExecutor(WORKERS) as pool:
        results = dict(zip(scenarios, pool.map(lambda label: run_child(finished[label], scenarios[label], 0), scenarios)))

    steps = {}
    for label, result in results.items():
        assert result.returncode == 0, f"the {label} run without a kill failed:\n{result.stderr[-3000:]}"
        steps[label] = json.loads(result.stdout.strip().splitlines()[-1])
        print(f"{label}: {len(steps[label])} kill points: {', '.join(steps[label])}")
    return Setup(model, base, base_revision, new_adapter, work, scenarios, steps, finished)


def run_kill_points(setup: Setup, label: str) -> dict[int, tuple[Path, subprocess.CompletedProcess]]:
    scenario = setup.scenarios[label]
    points = range(1, len(setup.steps[label]) + 1)
    roots = {kill_at: copy_library(setup.base, setup.work / f"{label}-kill-{kill_at}") for kill_at in points}
    with ThreadPoolExecutor(WORKERS) as pool:
        results = pool.map(lambda kill_at: run_child(roots[kill_at], scenario, kill_at), points)
        return {kill_at: (roots[kill_at], result) for kill_at, result in zip(points, results)}


def files_of(root: Path, expert: str) -> dict[str, bytes]:
    return {path.removeprefix(expert + "/"): data for path, data in library_snapshot(root).items() if path.startswith(expert + "/")}


def without_created(expert_json: bytes) -> dict:
    info = json.loads(expert_json)
    info.pop("created")
    return info


def check_common(setup: Setup, root: Path, context: str) -> ExpertLibrary:
    """Open the library after a kill, check the invariants of every scenario and return the library."""
    library = ExpertLibrary(root, setup.model)

    assert isinstance(library.revision, int), context
    assert library.revision >= setup.base_revision, context

    staging = root / ".staging"
    leftovers = sorted(path.name for path in staging.iterdir()) if staging.exists() else []
    assert leftovers == [], f"{context}: staging leftovers after opening"
    temporaries = sorted(str(path.relative_to(root)) for path in root.rglob("*.tmp"))
    assert temporaries == [], f"{context}: temporary files left after opening"

    assert files_of(root, "other") == files_of(setup.base, "other"), f"{context}: another expert changed"
    assert library.load("other").modules, context

    # Opening the library rewrites a card left outdated by a kill between the rename and the card.
    card = (root / "README.md").read_text(encoding="utf-8")
    assert card == render_model_card(library.base_model_id, library.list()), f"{context}: outdated model card"
    return library


def check_new_expert(setup: Setup, root: Path, library: ExpertLibrary, label: str, context: str) -> None:
    """Check that the written expert is whole: the uploaded files, and the metadata and prototypes of the full run."""
    expert = setup.scenarios[label].expert
    stored = files_of(root, expert)
    finished = files_of(setup.finished[label], expert)

    assert sorted(stored) == sorted(finished), context
    assert stored[WEIGHTS_FILE] == (setup.new_adapter / WEIGHTS_FILE).read_bytes(), f"{context}: weights differ from the upload"
    assert stored[CONFIG_FILE] == (setup.new_adapter / CONFIG_FILE).read_bytes(), f"{context}: config differs from the upload"
    # safetensors 0.8.0 writes the header's metadata keys in a different order in each process,
    # so the prototypes are compared as tensors, not as bytes.
    prototypes = load_prototypes(root / expert / "arrow.safetensors")
    expected = load_prototypes(setup.finished[label] / expert / "arrow.safetensors")
    assert sorted(prototypes) == sorted(expected), context
    for module, (vector, singular_value) in expected.items():
        assert torch.equal(prototypes[module][0], vector), f"{context}: prototype of {module} differs from the full run"
        assert prototypes[module][1] == singular_value, f"{context}: singular value of {module} differs from the full run"
    assert without_created(stored[EXPERT_JSON]) == without_created(finished[EXPERT_JSON]), context
    assert library.get(expert).weights_sha256 == hashlib.sha256(stored[WEIGHTS_FILE]).hexdigest(), context
    assert library.load(expert).modules, context
    assert library.revision > setup.base_revision, f"{context}: the expert changed without a revision bump"


@pytest.mark.parametrize("label", ["add", "replace"])
def test_full_run_writes_expert(setup, label):
    root = setup.finished[label]
    context = f"{label} without a kill"

    library = check_common(setup, root, context)

    assert setup.scenarios[label].expert in library, context
    assert (root / setup.scenarios[label].expert / WEIGHTS_FILE).read_bytes() == (setup.new_adapter / WEIGHTS_FILE).read_bytes(), context
    assert library.revision > setup.base_revision, context


def test_add_killed_at_each_step(setup):
    outcomes = run_kill_points(setup, "add")

    for kill_at, (root, result) in outcomes.items():
        context = f"add killed before step {kill_at} {setup.steps['add'][kill_at - 1]}"
        assert result.returncode == -signal.SIGKILL, f"{context}: child exited with {result.returncode}:\n{result.stderr[-3000:]}"

        library = check_common(setup, root, context)

        if "fresh" in library:
            check_new_expert(setup, root, library, "add", context)
        else:
            assert not (root / "fresh").exists(), f"{context}: a folder for the absent expert exists"
            assert library.names() == ["other", "target"], context


def test_replace_killed_at_each_step(setup):
    outcomes = run_kill_points(setup, "replace")
    old_files = files_of(setup.base, "target")
    new_weights = (setup.new_adapter / WEIGHTS_FILE).read_bytes()

    for kill_at, (root, result) in outcomes.items():
        context = f"replace killed before step {kill_at} {setup.steps['replace'][kill_at - 1]}"
        assert result.returncode == -signal.SIGKILL, f"{context}: child exited with {result.returncode}:\n{result.stderr[-3000:]}"

        library = check_common(setup, root, context)

        assert library.names() == ["other", "target"], context
        stored_weights = (root / "target" / WEIGHTS_FILE).read_bytes()
        assert stored_weights in (old_files[WEIGHTS_FILE], new_weights), f"{context}: weights are neither the old nor the new adapter"
        if stored_weights == old_files[WEIGHTS_FILE]:
            assert files_of(root, "target") == old_files, f"{context}: the old expert was changed"
            assert library.load("target").modules, context
        else:
            check_new_expert(setup, root, library, "replace", context)
