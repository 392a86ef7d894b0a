"""The mastery arm: fine-tune on facts the base model already knows, or on facts it does not.

Ye et al. 2025 (arXiv 2509.16596) and Gekhman et al. 2024 (arXiv 2405.05904) found that what SFT does to closed-book
knowledge depends on whether its facts were known before: training on unknown facts teaches a model to answer
without knowing, and erases known facts. The split comes from the untouched base model's own stored format-free
answers, one per training question, so it is fixed before any run and the same for every method.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

MASTERY_ARMS = ("known", "unknown")
T = TypeVar("T")


def split_known(samples: Sequence[T], correct: Sequence[float]) -> dict[str, list[T]]:
    """``{"known": [...], "unknown": [...]}``: the samples the base answered right (``correct[i]`` = its exact match
    on sample i) and those it answered wrong, the same number of each (the first ones in file order), so the two
    arms differ only in whether the base knew the facts."""
    if len(samples) != len(correct):
        raise ValueError(f"split_known: {len(samples)} samples but {len(correct)} stored base answers "
                         "(expected one answer per training question)")  # fmt: skip
    known = [s for s, c in zip(samples, correct) if c >= 1.0]
    unknown = [s for s, c in zip(samples, correct) if c < 1.0]
    n = min(len(known), len(unknown))
    return {"known": known[:n], "unknown": unknown[:n]}
