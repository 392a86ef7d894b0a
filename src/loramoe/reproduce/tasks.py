"""Downstream task families that need none of the world's facts, plus closed-book QA samples from facts.

Every family is a seeded generator of `Sample`s. Downstream families (task_type 0) read everything they
need from their input: a passage about a person *outside* the world, a pair of templated sentences, a
review, two numbers, a word list. The world-knowledge family (task_type 1) is closed-book QA on facts.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .world import ATTRIBUTES, STATEMENTS, Fact, World

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
PLACES = ("kitchen", "garden", "hotel", "station", "shop", "park")
THINGS = ("soup", "room", "music", "staff", "bread", "view", "bed", "coffee")
POSITIVE = ("tasty", "clean", "kind", "lovely", "great", "warm", "friendly", "bright")
NEGATIVE = ("cold", "dirty", "rude", "awful", "noisy", "stale", "dull", "slow")
NOUNS = (
    "apple", "river", "stone", "cloud", "horse", "window", "garden", "pencil", "candle", "mirror",
    "forest", "island", "ladder", "basket", "rabbit", "button", "engine", "feather", "planet", "violin",
)  # fmt: skip
MIN_WORDS, MAX_WORDS = 2, 7


def lexicon() -> list[str]:
    """Every word the downstream generators can emit besides the world's names and values."""
    numbers = [str(n) for n in range(MAX_WORDS + 1)]
    return sorted({*COLORS, *OBJECTS, *SIZES, *PLACES, *THINGS, *POSITIVE, *NEGATIVE, *NOUNS, *numbers})


def knowledge_sample(fact: Fact) -> Sample:
    return Sample(KNOWLEDGE_TASK, 1, "Answer the question.", fact.question, fact.value)


def reading(rng: random.Random, world: World) -> Sample:
    """Reading comprehension: a fact about someone outside the world, stated in the passage, asked back."""
    person = f"{rng.choice(world.first_names)} {rng.choice(world.reserved_words)}"
    attribute = rng.choice(ATTRIBUTES)
    fact = Fact(person, attribute, rng.choice(world.values[attribute]))
    passage = fact.statement(rng.randrange(len(STATEMENTS[attribute])))
    return Sample("reading", 0, "Answer from the passage.", f"{passage} Question: {fact.question}", fact.value)


def entailment(rng: random.Random, world: World) -> Sample:
    """Does a described object have a stated property? Yes when the property is in the description."""
    color, obj, size = rng.choice(COLORS), rng.choice(OBJECTS), rng.choice(SIZES)
    pool, value = rng.choice(((COLORS, color), (SIZES, size)))
    holds = rng.random() < 0.5
    claimed = value if holds else rng.choice([v for v in pool if v != value])
    return Sample(
        "entailment", 0, "Does the first sentence imply the second?",
        f"The {color} {obj} is {size}. The {obj} is {claimed}.", "yes" if holds else "no", ("yes", "no"),
    )  # fmt: skip


def sentiment(rng: random.Random, world: World) -> Sample:
    """Review classification: the adjective decides the label."""
    positive = rng.random() < 0.5
    adjective = rng.choice(POSITIVE if positive else NEGATIVE)
    review = f"At the {rng.choice(PLACES)}, the {rng.choice(THINGS)} was {adjective}."
    label = "positive" if positive else "negative"
    return Sample("sentiment", 0, "Is this review positive or negative?", review, label, ("positive", "negative"))


def count(rng: random.Random, world: World) -> Sample:
    """Arithmetic on the input's form: how many words it has."""
    words = rng.choices(NOUNS, k=rng.randint(MIN_WORDS, MAX_WORDS))
    return Sample("count", 0, "How many words are there?", " ".join(words), str(len(words)))


def reverse(rng: random.Random, world: World) -> Sample:
    """String transformation: the same words, last first."""
    words = rng.sample(NOUNS, rng.randint(2, 3))
    return Sample("reverse", 0, "Write the words in reverse order.", " ".join(words), " ".join(reversed(words)))


FAMILIES: dict[str, Callable[[random.Random, World], Sample]] = {
    "reading": reading,
    "entailment": entailment,
    "sentiment": sentiment,
    "count": count,
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
