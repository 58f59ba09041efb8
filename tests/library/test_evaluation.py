"""The evaluation harness, end to end on a tiny model."""

import json

import pytest
import torch

from quiver.library import ArrowRouter, ExpertLibrary, RoutingSettings
from quiver.library.evaluation import Evaluator, Method, TaskSet, dataset_task, default_methods, summarize, write_report
from quiver.library.statistics import load_or_compute_input_means
from tests.factories import make_adapter, tiny_llama, tiny_tokenizer

TASKS = [
    TaskSet("echo", "first", ["abc:", "hello:", "xyz:"], ["abc", "hello", "xyz"]),
    TaskSet("count", "second", ["one two:", "three:"], ["2", "1"]),
]


@pytest.fixture(scope="module")
def evaluator(tmp_path_factory):
    folder = tmp_path_factory.mktemp("evaluation")
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    library = ExpertLibrary(folder / "library", model)
    library.add("first", make_adapter(model, folder / "first", seed=1))
    library.add("second", make_adapter(model, folder / "second", seed=2))
    router = ArrowRouter(model)
    router.load_experts([library.load(name) for name in library.names()], library.revision)
    with torch.no_grad(), router.routing(RoutingSettings(experts=())):
        router.set_input_means(load_or_compute_input_means(library.root, model, tokenizer))
    return Evaluator(model, tokenizer, router, max_new_tokens=4, batch_size=2)


@pytest.fixture(scope="module")
def results(evaluator):
    return evaluator.run(TASKS, default_methods())


def test_every_method_and_task_reported(results):
    pairs = {(result.method, result.task) for result in results}

    assert pairs == {(method.name, task.name) for method in default_methods() for task in TASKS}
    assert all(0 <= result.accuracy <= 1 for result in results)
    assert all(len(result.examples) == len(task.prompts) for result, task in zip(results, TASKS * len(default_methods())))


def test_oracle_routes_to_own_expert(results):
    oracle = [result for result in results if result.method == "oracle"]

    for result in oracle:
        assert result.routing["prompt"] == 1.0
        assert result.routing["request"] == 1.0
        assert result.routing["first"] == 1.0


def test_base_model_routes_nothing(results):
    base = [result for result in results if result.method == "base model"]

    assert all(result.routing == {"request": None} for result in base)


def test_uniform_merge_ties_experts(evaluator):
    task = TASKS[0]
    recorder_settings = Method("uniform merge", RoutingSettings(), uniform=True).settings_for(task, evaluator.router.expert_names)

    assert recorder_settings.top_k == 2
    assert recorder_settings.temperature >= 1e6


def test_routing_shares_are_fractions(results):
    for result in results:
        for key, value in result.routing.items():
            assert value is None or 0 <= value <= 1, (result.method, key, value)


def test_generation_matches_replayed_decisions(evaluator):
    # Exact match of a result must agree with its recorded example texts.
    result = evaluator.run_task(TASKS[0], Method("arrow top-1", RoutingSettings(top_k=1)))

    assert result.accuracy == sum(example["correct"] for example in result.examples) / len(result.examples)


def test_report_files_written(results, tmp_path):
    rows = summarize(results)

    paths = write_report(rows, results, tmp_path, title="Tiny evaluation")

    markdown = paths["markdown"].read_text()
    assert markdown.startswith("# Tiny evaluation")
    assert "| oracle |" in markdown
    assert "| arrow top-1 |" in markdown
    payload = json.loads(paths["json"].read_text())
    assert {row["method"] for row in payload["summary"]} == {method.name for method in default_methods()}
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summary_share_of_oracle(results):
    rows = {row["method"]: row for row in summarize(results)}

    oracle = rows["oracle"]
    assert oracle["share_of_oracle"] in (None, 1.0)
    assert rows["arrow top-1"]["mean"] == pytest.approx(sum(rows["arrow top-1"]["tasks"].values()) / 2)


def test_dataset_task_from_csv(tmp_path):
    path = tmp_path / "sums.csv"
    path.write_text("prompt,answer\n1+1=,2\n2+2=,4\n")

    task = dataset_task(str(path), expert="math")

    assert task.name == "sums"
    assert task.prompts == ["1+1=", "2+2="]
    assert task.answers == ["2", "4"]


def test_dataset_task_from_saved_folder(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"question": ["a?"], "reply": ["b"]}).save_to_disk(str(tmp_path / "saved"))

    task = dataset_task(str(tmp_path / "saved"), expert="x", prompt_column="question", answer_column="reply")

    assert task.prompts == ["a?"]
    assert task.answers == ["b"]


def test_dataset_task_missing_column(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("question,answer\nq,a\n")

    with pytest.raises(ValueError, match="no column 'prompt'"):
        dataset_task(str(path), expert="x")
