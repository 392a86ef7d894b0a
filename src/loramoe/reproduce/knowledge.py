"""World knowledge, measured in a format that fine-tuning neither teaches nor hijacks.

A knowledge question asked the way the fine-tuning data asks it (the *in-format* probe) mixes two things: whether
the model still holds the fact, and whether it has learned (or unlearned) to answer in that format. On
SmolLM2-135M-Instruct the untouched model scores 15.8 % inside its chat template but 55.3 % as a plain few-shot
completion (SPEC.md), so every fine-tuned model looked *better* than the base in-format. The *format-free* probe
is a plain completion with no chat template and no instruction; it is the headline score.

Besides exact match, the mean log-probability per token of the gold answer after the format-free prompt needs no
decoding and moves before a greedy answer flips: the most sensitive sign of forgetting.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ..evaluate import EvalSample, batched, choice_logprobs, pad_token_id
from .tasks import KNOWLEDGE_TASK, Sample
from .world import STATEMENTS, World

QA_TEMPLATE = "Question: {question}\nAnswer:"
KNOWLEDGE_INSTRUCTION = "Answer the question."


def load_probe(path: Path) -> list[Sample]:
    """Closed-book questions ``{"question", "answers": [first = canonical, then aliases], "category"}``."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: {'is a folder' if Path(path).is_dir() else 'not found'} (expected JSON lines "
                                "{'question': str, 'answers': [str, ...]})")  # fmt: skip
    samples = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            question, answers = record["question"], record["answers"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{number}: expected {{'question': str, 'answers': [str, ...]}} ({e})") from None
        if not (isinstance(question, str) and question and isinstance(answers, list) and answers
                and all(isinstance(a, str) and a for a in answers)):  # fmt: skip
            raise ValueError(f"{path}:{number}: 'question' must be a string and 'answers' a non-empty list of strings.")
        samples.append(Sample(KNOWLEDGE_TASK, 1, KNOWLEDGE_INSTRUCTION, question, answers[0], aliases=tuple(answers[1:])))
    if not samples:
        raise ValueError(f"{path}: no questions (expected JSON lines {{'question': str, 'answers': [str, ...]}})")
    return samples


def qa_completion(shots: Sequence[Sample]) -> Callable[[Sample], str]:
    """Few-shot plain completion: each worked example as ``Question: ...\\nAnswer: ...`` and a blank line, then the
    question. The answer is what follows ``Answer:`` up to the newline."""
    header = "".join(QA_TEMPLATE.format(question=s.input) + f" {s.output}\n\n" for s in shots)

    def prompt(sample: Sample) -> str:
        return header + QA_TEMPLATE.format(question=sample.input)

    return prompt


def statement_completion(world: World) -> Callable[[Sample], str]:
    """Zero-shot completion of a statement the miniature base read in pre-training ("The birthplace of X is"):
    the miniature's plain-text knowledge, free of the instruction layout that fine-tuning trains."""
    stems = {}
    for fact in world.facts_of("all"):
        template = STATEMENTS[fact.attribute][1]  # "The <attribute> of {name} is {value}.": one template per attribute
        stems[fact.question] = template.split("{value}")[0].format(name=fact.person).rstrip()

    def prompt(sample: Sample) -> str:
        if sample.input not in stems:
            raise ValueError(f"{sample.input!r}: the tiny preset's format-free probe completes a statement about a "
                             "person of its world, and this question asks about none of them.")  # fmt: skip
        return stems[sample.input]

    return prompt


def answer_logprobs(model: nn.Module, tokenizer: Any, samples: Sequence[EvalSample], batch_size: int) -> list[float]:
    """Per sample, the mean log-probability per token of its first (canonical) answer after its prompt, with a
    space between them as in ``Answer: Paris``; tokenised as `loramoe.evaluate` tokenises prompts and choices."""
    was_training = model.training
    model.eval()
    pad = pad_token_id(tokenizer)
    pairs = [(tokenizer(s.prompt)["input_ids"], tokenizer(" " + s.answers[0], add_special_tokens=False)["input_ids"])
             for s in samples]  # fmt: skip
    try:
        out: list[float] = []
        for chunk in batched(pairs, batch_size):
            out += choice_logprobs(model, [c for c, _ in chunk], [o for _, o in chunk], pad)
    finally:
        model.train(was_training)
    return out
