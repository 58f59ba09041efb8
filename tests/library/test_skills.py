"""Tests of the demo skills' task data: formats, determinism and the train/test split."""

from __future__ import annotations

import importlib.resources
import os
import subprocess
import sys

import pytest

from quiver.library.errors import QuiverError, SkillNotFoundError
from quiver.library.skills import (
    CAPITAL_HELD_OUT_FRACTION,
    HELD_OUT_FRACTION,
    DEMO_SKILLS,
    SKILLS,
    WORDS,
    Example,
    demo_prompts,
    exact_match,
    get_skill,
    is_held_out,
    load_capitals,
    make_examples,
    score,
)

SKILL_NAMES = ["reverse", "uppercase", "add", "capital", "sort", "spell", "subtract", "multiply"]


def _input_content(skill_name: str, prompt: str) -> set[str]:
    """Return the units of a prompt's input that the split keeps apart: words, a pair or a country."""
    text = get_skill(skill_name).parse_input(prompt)
    if skill_name in ("reverse", "uppercase", "sort"):
        return set(text.split())
    if skill_name in ("add", "multiply"):
        first, operator, second = text.split()
        low, high = sorted((int(first), int(second)))
        return {f"{low}{'+' if operator == '+' else 'x'}{high}"}
    if skill_name == "subtract":
        first, _, second = text.split()
        return {f"{first}-{second}"}
    return {text}


def test_registry_has_required_skills():
    for name in SKILL_NAMES:
        assert name in SKILLS
        assert SKILLS[name].name == name
        assert get_skill(name) is SKILLS[name]


@pytest.mark.parametrize(
    ("skill_name", "text", "answer"),
    [
        ("reverse", "red apple tree", " tree apple red"),
        ("uppercase", "red apple tree", " RED APPLE TREE"),
        ("add", "12 + 34", " 46"),
        ("add", "77 + 24", " 101"),
        ("capital", "France", " Paris"),
        ("sort", "pear apple lamp", " apple lamp pear"),
        ("spell", "paper", " p a p e r"),
        ("subtract", "84 - 27", " 57"),
        ("multiply", "7 x 8", " 56"),
    ],
)
def test_skill_answers_known_inputs(skill_name, text, answer):
    assert get_skill(skill_name).answer(text) == answer


def test_prompt_formats():
    assert get_skill("reverse").prompt("red apple tree") == "Reverse the words: red apple tree\nAnswer:"
    assert get_skill("uppercase").prompt("red apple") == "Convert to upper case: red apple\nAnswer:"
    assert get_skill("add").prompt("12 + 34") == "Add the numbers: 12 + 34\nAnswer:"
    assert get_skill("capital").prompt("France") == "Name the capital of France.\nAnswer:"


@pytest.mark.parametrize("skill_name", SKILL_NAMES)
@pytest.mark.parametrize("split", ["train", "test"])
def test_examples_follow_template(skill_name, split):
    skill = get_skill(skill_name)
    instruction = skill.template.split("{input}")[0]
    for example in make_examples(skill_name, split, 30):
        assert isinstance(example, Example)
        assert example.prompt.startswith(instruction)
        assert example.prompt.endswith("\nAnswer:")
        assert example.answer.startswith(" ")
        assert not example.answer.startswith("  ")
        assert "\n" not in example.answer
        assert example.answer == skill.answer(skill.parse_input(example.prompt))


def test_instructions_are_distinct():
    instructions = [skill.template.split("{input}")[0] for skill in SKILLS.values()]
    first_words = [instruction.split()[0] for instruction in instructions]
    assert len(set(first_words)) == len(instructions)


@pytest.mark.parametrize("skill_name", SKILL_NAMES)
@pytest.mark.parametrize("split", ["train", "test"])
def test_examples_are_deterministic(skill_name, split):
    assert make_examples(skill_name, split, 25, seed=3) == make_examples(skill_name, split, 25, seed=3)
    assert make_examples(skill_name, split, 25, seed=3) != make_examples(skill_name, split, 25, seed=4)


def test_examples_same_across_processes():
    # Python's hash() of a string changes with PYTHONHASHSEED, which the split must not depend on.
    code = (
        "from quiver.library.skills import make_examples, SKILLS\n"
        "print(repr([make_examples(name, split, 10, seed=1) for name in sorted(SKILLS) for split in ('train', 'test')]))\n"
    )
    outputs = []
    for hash_seed in ("1", "2"):
        environment = {**os.environ, "PYTHONHASHSEED": hash_seed}
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment, check=True)
        outputs.append(result.stdout)
    expected = repr([make_examples(name, split, 10, seed=1) for name in sorted(SKILLS) for split in ("train", "test")])
    assert outputs[0] == expected + "\n"
    assert outputs[1] == expected + "\n"


@pytest.mark.parametrize("skill_name", SKILL_NAMES)
def test_train_and_test_disjoint(skill_name):
    train_content: set[str] = set()
    for example in make_examples(skill_name, "train", 2000, seed=0):
        train_content |= _input_content(skill_name, example.prompt)
    test_content: set[str] = set()
    for seed in range(3):
        for example in make_examples(skill_name, "test", 200, seed=seed):
            test_content |= _input_content(skill_name, example.prompt)

    assert train_content
    assert test_content
    assert train_content.isdisjoint(test_content)


def test_splits_cover_all_countries():
    train = {get_skill("capital").parse_input(example.prompt) for example in make_examples("capital", "train", 3000)}
    test = {get_skill("capital").parse_input(example.prompt) for example in make_examples("capital", "test", 500)}
    assert train | test == set(load_capitals())
    assert len(test) >= 20


def test_test_prompts_distinct_until_exhausted():
    for name in SKILL_NAMES:
        prompts = [example.prompt for example in make_examples(name, "test", 20)]
        assert len(set(prompts)) == 20, name

    countries = len({get_skill("capital").parse_input(e.prompt) for e in make_examples("capital", "test", 500)})
    more_than_available = make_examples("capital", "test", countries + 5)
    assert len(more_than_available) == countries + 5
    assert len({example.prompt for example in more_than_available}) == countries


def test_make_examples_count_zero():
    assert make_examples("reverse", "train", 0) == []


def test_make_examples_rejects_invalid_arguments():
    with pytest.raises(ValueError, match="split 'validation' is invalid"):
        make_examples("reverse", "validation", 3)
    with pytest.raises(ValueError, match="count must be 0 or more"):
        make_examples("reverse", "train", -1)


def test_make_examples_accepts_skill_object():
    assert make_examples(get_skill("add"), "train", 5) == make_examples("add", "train", 5)


def test_unknown_skill_error():
    with pytest.raises(SkillNotFoundError) as raised:
        get_skill("translate")
    error = raised.value
    assert isinstance(error, KeyError)
    assert isinstance(error, QuiverError)
    assert error.name == "translate"
    message = str(error)
    assert "'translate'" in message
    for name in SKILL_NAMES:
        assert name in message


def test_unknown_skill_in_make_examples():
    with pytest.raises(SkillNotFoundError):
        make_examples("translate", "train", 1)


def test_capitals_table():
    capitals = load_capitals()
    assert len(capitals) >= 80
    assert capitals["France"] == "Paris"
    assert capitals["Japan"] == "Tokyo"
    for country, capital in capitals.items():
        assert country
        assert capital
        assert country.strip() == country
        assert capital.strip() == capital
    # load_capitals returns a dict, so a repeated country would silently replace the earlier row.
    rows = importlib.resources.files("quiver.library").joinpath("data", "capitals.csv").read_text("utf-8").splitlines()
    assert rows[0] == "country,capital"
    assert len(rows) - 1 == len(capitals)


def test_words_are_lowercase_and_unique():
    assert len(WORDS) == len(set(WORDS))
    for word in WORDS:
        assert word.isascii(), word
        assert word.isalpha(), word
        assert word.islower(), word


def test_demo_prompts_are_held_out():
    prompts = demo_prompts()
    assert sorted(prompts) == sorted(DEMO_SKILLS)
    test_content = {
        name: set().union(*(_input_content(name, e.prompt) for e in make_examples(name, "test", 300)))
        for name in ("reverse", "uppercase")
    }
    for name, prompt in prompts.items():
        skill = get_skill(name)
        content = _input_content(name, prompt)
        fraction = CAPITAL_HELD_OUT_FRACTION if name == "capital" else HELD_OUT_FRACTION
        for key in content:
            assert is_held_out(key, fraction), (name, key)
        if name in test_content:
            assert content <= test_content[name]
        assert score(name, prompt, skill.answer(skill.parse_input(prompt)))


def test_demo_prompts_are_fixed():
    assert demo_prompts() == demo_prompts()
    assert demo_prompts()["capital"] == "Name the capital of Ireland.\nAnswer:"


def test_score_exact_match():
    prompt = "Reverse the words: red apple tree\nAnswer:"
    assert score("reverse", prompt, " tree apple red")
    assert score("reverse", prompt, "tree apple red\n")
    assert not score("reverse", prompt, " tree apple red.")
    assert not score("reverse", prompt, " red apple tree")
    assert not score("reverse", prompt, "")
    assert score("add", "Add the numbers: 56 + 27\nAnswer:", " 83")
    assert not score("add", "Add the numbers: 56 + 27\nAnswer:", " 82")


def test_score_rejects_other_skill_prompt():
    with pytest.raises(ValueError, match="does not follow the template of skill 'add'"):
        score("add", "Reverse the words: red apple tree\nAnswer:", " tree apple red")


def test_exact_match_strips_whitespace():
    assert exact_match(" Paris", "Paris \n")
    assert not exact_match(" Paris", "paris")
    assert not exact_match(" Paris", "Paris France")
