"""Deterministic task data for the demo skills that Quiver trains one LoRA expert each on.

Every skill turns an input (a few words, two numbers or a country) into a plain-text prompt that
starts with the skill's own instruction, and an answer that starts with a space::

    Reverse the words: red apple tree\\nAnswer:    ->  " tree apple red"

The prompts use no chat template because the server's /generate endpoint takes raw text.
Training appends the tokenizer's EOS token to the answer so that greedy decoding stops by itself.

Each skill splits its inputs into a train and a test part by a fixed hash of the input's content
(the word, the unordered number pair or the country), so held-out test prompts never contain a
word, a number pair or a country that a training prompt contains.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import importlib.resources
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

from .errors import SkillNotFoundError

Split = Literal["train", "test"]
SPLITS: tuple[str, ...] = ("train", "test")

HELD_OUT_FRACTION = 0.25
"""Share of the words and number pairs that only test examples use (approximate, because a hash decides)."""

CAPITAL_HELD_OUT_FRACTION = 0.3
"""Share of the countries that only test examples use: 22 of the 83 in capitals.csv, so that a
20-prompt evaluation needs no country twice."""

# After this many draws in a row that repeat an earlier prompt, make_examples assumes that the
# split's inputs are exhausted and starts repeating prompts.
_MAX_REPEATED_DRAWS = 1000


class Example(NamedTuple):
    """One prompt and its expected answer, which starts with a space."""

    prompt: str
    answer: str


@dataclass(frozen=True)
class Skill:
    """A task with a prompt template and a generator of inputs for each split.

    ``template`` contains one ``{input}`` field. ``sample_input(rng, split)`` draws an input
    from that split's part of the inputs, and ``solve(input)`` returns the answer without the
    leading space.
    """

    name: str
    description: str
    template: str
    sample_input: Callable[[random.Random, Split], str]
    solve: Callable[[str], str]

    def prompt(self, text: str) -> str:
        """Return this skill's prompt for the input ``text``."""
        return self.template.format(input=text)

    def answer(self, text: str) -> str:
        """Return the expected answer for ``text``, with the leading space the model generates."""
        return " " + self.solve(text)

    def example(self, rng: random.Random, split: Split) -> Example:
        """Draw one example of ``split`` from ``rng``."""
        text = self.sample_input(rng, split)
        return Example(self.prompt(text), self.answer(text))

    def parse_input(self, prompt: str) -> str:
        """Return the input that ``prompt`` was built from.

        Raises:
            ValueError: ``prompt`` does not follow this skill's template.
        """
        prefix, suffix = self.template.split("{input}")
        if not (prompt.startswith(prefix) and prompt.endswith(suffix)) or len(prompt) < len(prefix) + len(suffix):
            raise ValueError(f"prompt {prompt!r} does not follow the template of skill {self.name!r}: {self.template!r}")
        return prompt[len(prefix) : len(prompt) - len(suffix)]


def is_held_out(key: str, fraction: float = HELD_OUT_FRACTION) -> bool:
    """Return True when the input content ``key`` belongs to the test split.

    About ``fraction`` of all keys do. SHA-256 decides, not Python's ``hash``, so the split is
    the same in every process, and adding keys never moves an existing key to the other split.
    """
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split {split!r} is invalid; use 'train' or 'test'")


def _partition(items: Sequence[str], split: str, fraction: float = HELD_OUT_FRACTION) -> tuple[str, ...]:
    _check_split(split)
    held_out = split == "test"
    return tuple(item for item in items if is_held_out(item, fraction) == held_out)


# Words for the reverse and uppercase skills: lower-case, common and free of punctuation. A larger
# vocabulary makes an adapter learn the task instead of memorizing the training words.
WORDS: tuple[str, ...] = tuple(
    """
    red blue green yellow black white brown purple pink gray gold silver orange
    apple tree river stone cloud bread house garden window bird horse fish flower road ship train
    chair table lamp book letter music piano song dance paper candle forest mountain island beach
    ocean lake field farm city village bridge tower castle market street door wall roof floor
    kitchen coffee tea milk cheese butter honey sugar salt rice soup cake lemon grape cherry peach
    banana tomato potato carrot onion
    dog cat mouse rabbit tiger lion bear wolf fox owl duck goat sheep cow frog snake eagle whale
    shark camel zebra monkey donkey turtle spider bee ant pony deer moose otter seal panda koala
    parrot pigeon crow swan goose hen chicken
    small big old young quiet loud happy sad warm cold bright dark fast slow soft hard sweet sour
    clean dirty rich poor tall short long wide thin thick heavy light empty full fresh wet dry new
    strong weak brave calm kind wild proud gentle busy lazy clever funny simple early late deep high
    low round flat sharp smooth rough
    runs sings jumps sleeps reads writes walks swims flies waits eats drinks plays cooks climbs
    builds paints draws smiles laughs cries shouts listens watches opens closes falls grows burns
    melts shines rains snows moves stops starts turns pulls pushes throws catches kicks holds
    carries finds loses keeps gives takes brings sends sells buys pays
    morning night winter summer spring autumn friend teacher doctor farmer baker driver singer
    dancer painter writer pilot sailor king queen prince child mother father sister brother uncle
    aunt baby girl boy man woman student worker player
    car bus truck bike boat plane rocket wheel engine path hill valley desert jungle meadow pond
    stream shore cliff cave rock sand snow rain wind storm sun moon star sky planet earth fire water
    ice smoke dust
    cup plate bowl spoon fork knife glass bottle box bag basket bucket rope chain ring key lock
    clock watch phone camera radio screen pencil brush card map ticket coin gift toy ball doll kite
    drum flute guitar violin bell
    shirt coat hat shoe sock dress skirt scarf glove boot belt button pocket jacket
    nose eye ear hand foot arm leg head hair face mouth tooth heart bone skin finger
    school office church hotel museum library garage bank shop bakery prison palace temple station
    airport harbor factory hospital
    egg meat bean corn wheat flour pepper garlic olive melon plum pear berry nut seed leaf root
    branch grass moss bush vine
    chess game story dream idea plan poem joke riddle secret answer question number word name color
    shape line circle square
    copper iron steel wood cotton wool silk leather plastic
    sofa bed desk shelf mirror carpet curtain pillow blanket towel soap stove oven fridge sink
    canal tunnel fence gate yard porch attic cellar tent cabin barn mill
    """.split()
)
MIN_SENTENCE_WORDS = 3
MAX_SENTENCE_WORDS = 4


@functools.cache
def _words(split: str) -> tuple[str, ...]:
    return _partition(WORDS, split)


def _sample_sentence(rng: random.Random, split: str) -> str:
    length = rng.randint(MIN_SENTENCE_WORDS, MAX_SENTENCE_WORDS)
    return " ".join(rng.sample(_words(split), length))


def _reverse_words(text: str) -> str:
    return " ".join(reversed(text.split()))


MIN_ADDEND = 10
MAX_ADDEND = 99


def _sample_addition(rng: random.Random, split: str) -> str:
    _check_split(split)
    # About a quarter of the pairs are held out, so either split accepts a draw often enough
    # for rejection sampling to stay cheap.
    while True:
        first = rng.randint(MIN_ADDEND, MAX_ADDEND)
        second = rng.randint(MIN_ADDEND, MAX_ADDEND)
        # The pair is unordered, so "12 + 34" and "34 + 12" always fall into the same split.
        key = f"{min(first, second)}+{max(first, second)}"
        if is_held_out(key) == (split == "test"):
            return f"{first} + {second}"


def _add(text: str) -> str:
    first, plus, second = text.split()
    if plus != "+":
        raise ValueError(f"addition {text!r} is invalid; expected 'A + B'")
    return str(int(first) + int(second))


def _sort_words(text: str) -> str:
    return " ".join(sorted(text.split()))


def _sample_word(rng: random.Random, split: str) -> str:
    return rng.choice(_words(split))


def _spell(word: str) -> str:
    return " ".join(word)


def _sample_subtraction(rng: random.Random, split: str) -> str:
    _check_split(split)
    while True:
        first, second = sorted((rng.randint(MIN_ADDEND, MAX_ADDEND), rng.randint(MIN_ADDEND, MAX_ADDEND)), reverse=True)
        if first != second and is_held_out(f"{first}-{second}") == (split == "test"):
            return f"{first} - {second}"


def _subtract(text: str) -> str:
    first, minus, second = text.split()
    if minus != "-":
        raise ValueError(f"subtraction {text!r} is invalid; expected 'A - B'")
    return str(int(first) - int(second))


MIN_FACTOR = 2
MAX_FACTOR = 12


def _sample_multiplication(rng: random.Random, split: str) -> str:
    _check_split(split)
    while True:
        first = rng.randint(MIN_FACTOR, MAX_FACTOR)
        second = rng.randint(MIN_FACTOR, MAX_FACTOR)
        # Unordered, like addition, so "3 x 7" and "7 x 3" fall into the same split.
        if is_held_out(f"{min(first, second)}x{max(first, second)}") == (split == "test"):
            return f"{first} x {second}"


def _multiply(text: str) -> str:
    first, times, second = text.split()
    if times != "x":
        raise ValueError(f"multiplication {text!r} is invalid; expected 'A x B'")
    return str(int(first) * int(second))


@functools.cache
def load_capitals() -> dict[str, str]:
    """Return the country-to-capital table shipped as ``quiver.library/data/capitals.csv``.

    The table lists only countries whose capitals SmolLM2-135M-Instruct already names in a
    three-shot prompt. An adapter trained on some countries cannot teach the capitals of the
    held-out ones, so the capital expert teaches the answer format and relies on that recall.
    """
    resource = importlib.resources.files("quiver.library").joinpath("data", "capitals.csv")
    with resource.open("r", encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames != ["country", "capital"]:
            raise ValueError(f"capitals.csv has columns {reader.fieldnames}; expected ['country', 'capital']")
        return {row["country"]: row["capital"] for row in reader}


@functools.cache
def _countries(split: str) -> tuple[str, ...]:
    return _partition(sorted(load_capitals()), split, CAPITAL_HELD_OUT_FRACTION)


def _sample_country(rng: random.Random, split: str) -> str:
    return rng.choice(_countries(split))


def _capital_of(country: str) -> str:
    capitals = load_capitals()
    if country not in capitals:
        raise ValueError(f"country {country!r} is not in capitals.csv")
    return capitals[country]


SKILLS: dict[str, Skill] = {
    skill.name: skill
    for skill in (
        Skill(
            name="reverse",
            description="Reverse the order of the words of a short sentence.",
            template="Reverse the words: {input}\nAnswer:",
            sample_input=_sample_sentence,
            solve=_reverse_words,
        ),
        # NOTE: an expert for this skill reaches only about 0.2 exact match on held-out words
        # with SmolLM2-135M-Instruct. Its tokenizer splits most upper-case words into two or
        # three pieces that the model must spell, and it gets only about half of unseen words right.
        Skill(
            name="uppercase",
            description="Convert a short sentence to upper case.",
            template="Convert to upper case: {input}\nAnswer:",
            sample_input=_sample_sentence,
            solve=str.upper,
        ),
        Skill(
            name="add",
            description="Add two two-digit numbers.",
            template="Add the numbers: {input}\nAnswer:",
            sample_input=_sample_addition,
            solve=_add,
        ),
        Skill(
            name="capital",
            description="Name the capital of a country.",
            template="Name the capital of {input}.\nAnswer:",
            sample_input=_sample_country,
            solve=_capital_of,
        ),
        Skill(
            name="sort",
            description="Sort the words of a short sentence alphabetically.",
            template="Sort the words: {input}\nAnswer:",
            sample_input=_sample_sentence,
            solve=_sort_words,
        ),
        Skill(
            name="spell",
            description="Spell a word letter by letter.",
            template="Spell the word: {input}\nAnswer:",
            sample_input=_sample_word,
            solve=_spell,
        ),
        Skill(
            name="subtract",
            description="Subtract a smaller two-digit number from a larger one.",
            template="Subtract the numbers: {input}\nAnswer:",
            sample_input=_sample_subtraction,
            solve=_subtract,
        ),
        Skill(
            name="multiply",
            description="Multiply two numbers from 2 to 12.",
            template="Multiply the numbers: {input}\nAnswer:",
            sample_input=_sample_multiplication,
            solve=_multiply,
        ),
    )
}
"""The built-in skills by name: the four demo skills, then four more that ``quiver eval`` uses."""

DEMO_SKILLS: tuple[str, ...] = ("reverse", "uppercase", "add", "capital")
"""The skills ``quiver demo`` trains and shows; training all of them takes about 6 minutes on 2 cores."""

# One held-out input per skill, fixed so that `quiver demo` shows the same prompts on every run.
# test_skills checks that each of them belongs to the test split.
_DEMO_INPUTS: dict[str, str] = {
    "reverse": "big owl reads paper",
    "uppercase": "quiet duck sings",
    "add": "56 + 27",
    "capital": "Ireland",
}


def get_skill(name: str) -> Skill:
    """Return the skill called ``name``.

    Raises:
        SkillNotFoundError: no skill has that name; the message lists the known skills.
    """
    try:
        return SKILLS[name]
    except KeyError:
        raise SkillNotFoundError(name, list(SKILLS)) from None


def _resolve(skill: Skill | str) -> Skill:
    return skill if isinstance(skill, Skill) else get_skill(skill)


def make_examples(skill: Skill | str, split: Split, count: int, seed: int = 0) -> list[Example]:
    """Draw ``count`` examples of ``split`` for ``skill``, the same ones for the same arguments.

    Prompts are distinct until the split runs out of inputs (the capital test split has 22
    countries), and repeat after that.

    Raises:
        SkillNotFoundError: ``skill`` is a name that no skill has.
        ValueError: ``split`` is not 'train' or 'test', or ``count`` is negative.
    """
    resolved = _resolve(skill)
    _check_split(split)
    if count < 0:
        raise ValueError(f"count must be 0 or more, got {count}")

    # random.Random seeds from a string with SHA-512, so the sequence is the same in every process.
    rng = random.Random(f"{resolved.name}:{split}:{seed}")
    examples: list[Example] = []
    seen: set[str] = set()
    repeated_draws = 0
    while len(examples) < count:
        example = resolved.example(rng, split)
        if example.prompt in seen and repeated_draws < _MAX_REPEATED_DRAWS:
            repeated_draws += 1
            continue
        if repeated_draws >= _MAX_REPEATED_DRAWS:
            seen.clear()
        repeated_draws = 0
        seen.add(example.prompt)
        examples.append(example)
    return examples


def demo_prompts() -> dict[str, str]:
    """Return one fixed held-out prompt per skill, keyed by skill name."""
    return {name: SKILLS[name].prompt(text) for name, text in _DEMO_INPUTS.items()}


def exact_match(expected: str, generated: str) -> bool:
    """Return True when the two texts are equal after stripping surrounding whitespace."""
    return expected.strip() == generated.strip()


def score(skill: Skill | str, prompt: str, generated_text: str) -> bool:
    """Return True when ``generated_text`` is the exact answer to ``prompt``.

    Raises:
        SkillNotFoundError: ``skill`` is a name that no skill has.
        ValueError: ``prompt`` does not follow the skill's template, or its input is invalid.
    """
    resolved = _resolve(skill)
    return exact_match(resolved.answer(resolved.parse_input(prompt)), generated_text)
