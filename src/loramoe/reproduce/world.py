"""A synthetic world with knowledge to forget: fictional people with attributes, generated from a seed.

The world is the miniature stand-in for the facts a real LLM stores in pre-training. Its people are split
three ways: *train* people's facts appear as closed-book QA in the fine-tuning data, *valid* people's facts
choose hyperparameters, *test* people's facts measure world knowledge. All facts of everyone are in the
pre-training corpus, so the base model knows the test facts while fine-tuning never shows them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

ATTRIBUTES = ("city", "year", "employer", "field")

# Question wording per attribute: the closed-book QA format (pre-training, fine-tuning and test alike).
QUESTIONS = {
    "city": "Where was {name} born?",
    "year": "In which year was {name} born?",
    "employer": "Which company does {name} work for?",
    "field": "What field does {name} work in?",
}

# Paraphrased statements: the "web text" of the world, several phrasings per fact.
STATEMENTS = {
    "city": (
        "{name} was born in {value}.",
        "The birthplace of {name} is {value}.",
        "{name} comes from the city of {value}.",
        "{value} is the city where {name} was born.",
    ),
    "year": (
        "{name} was born in the year {value}.",
        "The birth year of {name} is {value}.",
        "In {value}, {name} was born.",
        "{name} came into the world in {value}.",
    ),
    "employer": (
        "{name} works for {value}.",
        "The employer of {name} is {value}.",
        "{name} has a job at {value}.",
        "{value} employs {name}.",
    ),
    "field": (
        "{name} works in {value}.",
        "The field of {name} is {value}.",
        "{name} is an expert in {value}.",
        "{name} has a career in {value}.",
    ),
}

FIELDS = (
    "chemistry", "music", "law", "medicine", "physics", "painting", "finance", "history",
    "biology", "poetry", "farming", "architecture", "geology", "dance", "astronomy", "cooking",
)  # fmt: skip

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kl", "st", "tr")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou")
_CODAS = ("", "", "n", "r", "l", "s", "th", "nd", "sk")


def made_up_words(rng: random.Random, count: int, syllables: tuple[int, int], taken: set[str]) -> list[str]:
    """``count`` distinct capitalised pseudo-words not in ``taken`` (which is updated)."""
    words: list[str] = []
    while len(words) < count:
        n = rng.randint(*syllables)
        word = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(n)) + rng.choice(_CODAS)
        word = word.capitalize()
        if word not in taken:
            taken.add(word)
            words.append(word)
    return words


@dataclass(frozen=True)
class Fact:
    """One (person, attribute, value) triple, with its closed-book question."""

    person: str
    attribute: str
    value: str

    @property
    def question(self) -> str:
        return QUESTIONS[self.attribute].format(name=self.person)

    def statement(self, variant: int) -> str:
        templates = STATEMENTS[self.attribute]
        return templates[variant % len(templates)].format(name=self.person, value=self.value)


@dataclass(frozen=True)
class World:
    """People, the value pools their attributes come from, and the train/valid/test split of people."""

    seed: int
    people: tuple[str, ...]
    values: dict[str, tuple[str, ...]]
    facts: dict[str, dict[str, str]]  # person -> attribute -> value
    splits: dict[str, tuple[str, ...]]  # "train" | "valid" | "test" -> people
    first_names: tuple[str, ...]
    reserved_words: tuple[str, ...]  # made-up words no person uses: names for entities outside the world

    def facts_of(self, split: str) -> list[Fact]:
        """Every fact of the people in ``split`` ("train", "valid", "test" or "all"), in a fixed order."""
        people = self.people if split == "all" else self.splits[split]
        return [Fact(p, a, self.facts[p][a]) for p in people for a in ATTRIBUTES]


def make_world(
    seed: int = 0,
    num_people: int = 300,
    split_fractions: tuple[float, float] = (0.5, 0.17),
    num_cities: int = 24,
    num_employers: int = 24,
    num_first_names: int = 40,
    num_reserved: int = 200,
) -> World:
    """Generate the world deterministically from ``seed``. ``split_fractions`` = (train, valid); test gets the rest.

    People have a first name from a small pool and a unique surname, so a surname identifies its person.
    """
    if num_people < 3:
        raise ValueError(f"make_world: num_people={num_people} is too small; expected at least 3 (one per split).")
    rng = random.Random(seed)
    taken: set[str] = set()
    cities = made_up_words(rng, num_cities, (2, 3), taken)
    employers = [w + " " + rng.choice(("Labs", "Works", "Group", "Systems")) for w in made_up_words(rng, num_employers, (2, 2), taken)]
    first_names = made_up_words(rng, num_first_names, (2, 2), taken)
    surnames = made_up_words(rng, num_people, (2, 3), taken)
    reserved = made_up_words(rng, num_reserved, (2, 3), taken)
    years = [str(y) for y in range(1900, 2000)]
    values = {"city": tuple(cities), "year": tuple(years), "employer": tuple(employers), "field": FIELDS}
    people = tuple(f"{rng.choice(first_names)} {s}" for s in surnames)
    facts = {p: {a: rng.choice(values[a]) for a in ATTRIBUTES} for p in people}
    order = list(people)
    rng.shuffle(order)
    n_train = max(1, round(split_fractions[0] * num_people))
    n_valid = max(1, round(split_fractions[1] * num_people))
    if n_train + n_valid >= num_people:
        raise ValueError(f"make_world: split_fractions={split_fractions} leave no test people out of {num_people}.")
    splits = {
        "train": tuple(order[:n_train]),
        "valid": tuple(order[n_train : n_train + n_valid]),
        "test": tuple(order[n_train + n_valid :]),
    }
    return World(seed, people, values, facts, splits, tuple(first_names), tuple(reserved))
