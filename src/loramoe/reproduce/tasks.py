"""Downstream task families that need none of the world's facts, plus closed-book QA samples from facts.

Every family is a seeded generator of `Sample`s. Downstream families (task_type 0) read everything they
need from their input: a passage about a person *outside* the world, a pair of templated sentences, a
review, two numbers, a word list. The world-knowledge family (task_type 1) is closed-book QA on facts.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .world import ATTRIBUTES, QUESTIONS, STATEMENTS, Fact, World

KNOWLEDGE_TASK = "world_knowledge"


@dataclass(frozen=True)
class Sample:
    """One instruction sample; ``choices`` is set for tasks scored by choosing among fixed answers, ``aliases``
    lists other accepted answers of a generated one."""

    task: str
    task_type: int  # 1 world knowledge, 0 downstream
    instruction: str
    input: str
    output: str
    choices: tuple[str, ...] | None = None
    aliases: tuple[str, ...] = ()

    def train_record(self) -> dict:
        """The fine-tuning JSON-lines record (SPEC.md's data format)."""
        return {"instruction": self.instruction, "input": self.input, "output": self.output, "task_type": self.task_type}


COLORS = ("red", "blue", "green", "yellow", "black", "white")
OBJECTS = ("box", "cup", "chair", "lamp", "boat", "kite", "bell", "coat")
SIZES = ("small", "large", "tiny", "huge")
MATERIALS = ("wooden", "metal", "glass", "paper")
PLACES = ("kitchen", "garden", "hotel", "station", "shop", "park")
THINGS = ("soup", "room", "music", "staff", "bread", "view", "bed", "coffee")
POSITIVE = ("tasty", "clean", "kind", "lovely", "great", "warm", "friendly", "bright")
NEGATIVE = ("cold", "dirty", "rude", "awful", "noisy", "stale", "dull", "slow")
NOUNS = (
    "apple", "river", "stone", "cloud", "horse", "window", "garden", "pencil", "candle", "mirror",
    "forest", "island", "ladder", "basket", "rabbit", "button", "engine", "feather", "planet", "violin",
)  # fmt: skip
MAX_ADDEND = 30


def lexicon() -> list[str]:
    """Every word the downstream generators can emit besides the world's names and values."""
    numbers = [str(n) for n in range(2 * MAX_ADDEND + 1)]
    return sorted({*COLORS, *OBJECTS, *SIZES, *MATERIALS, *PLACES, *THINGS, *POSITIVE, *NEGATIVE, *NOUNS, *numbers})


def knowledge_sample(fact: Fact) -> Sample:
    return Sample(KNOWLEDGE_TASK, 1, "Answer the question.", fact.question, fact.value)


def reading(rng: random.Random, world: World) -> Sample:
    """Reading comprehension: a passage about someone outside the world; the answer is in the passage."""
    person = f"{rng.choice(world.first_names)} {rng.choice(world.reserved_words)}"
    attrs = rng.sample(ATTRIBUTES, 3)
    facts = [Fact(person, a, rng.choice(world.values[a])) for a in attrs]
    passage = " ".join(f.statement(rng.randrange(len(STATEMENTS[f.attribute]))) for f in facts)
    asked = rng.choice(facts)
    return Sample(
        "reading", 0, "Read the passage and answer the question.",
        f"Passage: {passage} Question: {QUESTIONS[asked.attribute].format(name=person)}", asked.value,
    )  # fmt: skip


def entailment(rng: random.Random, world: World) -> Sample:
    """Does a described object have a stated property? Yes when the property is in the description."""
    color, obj, size, material = rng.choice(COLORS), rng.choice(OBJECTS), rng.choice(SIZES), rng.choice(MATERIALS)
    pool, value = rng.choice(((COLORS, color), (SIZES, size), (MATERIALS, material)))
    holds = rng.random() < 0.5
    claimed = value if holds else rng.choice([v for v in pool if v != value])
    return Sample(
        "entailment", 0, "Does the first sentence imply the second? Answer yes or no.",
        f"First: the {color} {obj} is {size} and {material}. Second: the {obj} is {claimed}.",
        "yes" if holds else "no", ("yes", "no"),
    )  # fmt: skip


def sentiment(rng: random.Random, world: World) -> Sample:
    """A three-clause review; its label is the polarity of the majority of its adjectives."""
    positive = rng.random() < 0.5
    n_pos = rng.choice((2, 3)) if positive else rng.choice((0, 1))
    adjectives = rng.sample(POSITIVE, n_pos) + rng.sample(NEGATIVE, 3 - n_pos)
    rng.shuffle(adjectives)
    things = rng.sample(THINGS, 3)
    clauses = [f"the {t} was {a}" for t, a in zip(things, adjectives)]
    review = f"At the {rng.choice(PLACES)}, {clauses[0]}, {clauses[1]} and {clauses[2]}."
    label = "positive" if positive else "negative"
    return Sample("sentiment", 0, "Is this review positive or negative?", review, label, ("positive", "negative"))


def arithmetic(rng: random.Random, world: World) -> Sample:
    a, b = rng.randint(0, MAX_ADDEND), rng.randint(0, MAX_ADDEND)
    return Sample("arithmetic", 0, "Add the two numbers.", f"{a} plus {b}", str(a + b))


def reverse(rng: random.Random, world: World) -> Sample:
    """String transformation: the same words, last first."""
    words = rng.sample(NOUNS, rng.randint(3, 4))
    return Sample("reverse", 0, "Write the words in reverse order.", " ".join(words), " ".join(reversed(words)))


FAMILIES: dict[str, Callable[[random.Random, World], Sample]] = {
    "reading": reading,
    "entailment": entailment,
    "sentiment": sentiment,
    "arithmetic": arithmetic,
    "reverse": reverse,
}


def generate(family: str, count: int, seed: int, world: World, exclude: Iterable[Sample] = ()) -> list[Sample]:
    """``count`` samples of ``family`` from ``seed``, none with the same input as a sample in ``exclude``.

    Excluding test inputs keeps downstream test samples out of the fine-tuning data.
    """
    if family not in FAMILIES:
        raise ValueError(f"Unknown task family {family!r}; expected one of {sorted(FAMILIES)}.")
    rng = random.Random(f"{family}:{seed}")
    banned = {(s.instruction, s.input) for s in exclude}
    out: list[Sample] = []
    attempts = 0
    while len(out) < count:
        attempts += 1
        if attempts > 50 * count + 1000:
            raise ValueError(f"Task family {family!r} cannot produce {count} samples outside the excluded set.")
        sample = FAMILIES[family](rng, world)
        if (sample.instruction, sample.input) not in banned:
            out.append(sample)
    return out
