"""The statistics that decide the paper's claim: each method's knowledge-skill frontier (knowledge at equal
downstream skill, interpolated along it) and a paired bootstrap interval for the knowledge difference of two
methods over (seed, question).

Why a frontier: a method trained harder (higher lr, more data) gains skill and loses knowledge, so comparing two
methods at one lr compares two points of different skill. Sweeping the lr traces each method's trade-off curve;
reading every curve at the same downstream level compares knowledge at matched skill.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Point:
    """One trained model: its downstream skill and its world knowledge (fractions in [0, 1])."""

    downstream: float
    knowledge: float


DECIMALS = 9  # scores are compared to this many decimals (means of counts carry float noise)


def _rounded(p: Point) -> Point:
    return Point(round(p.downstream, DECIMALS), round(p.knowledge, DECIMALS))


def pareto_frontier(points: Sequence[Point]) -> list[Point]:
    """The points that no other point dominates (as good on skill and knowledge, better on one), by rising skill
    (so strictly falling knowledge).

    Ties: of equal points one is kept; a point with equal skill and less knowledge, or equal knowledge and less
    skill, is dominated (its method reached that knowledge with more skill elsewhere). Values are compared to 9
    decimals: scores are means of counts, and 0.38 averaged over three seeds is 0.37999999999999995.
    """
    best: list[Point] = []
    for p in sorted({_rounded(q) for q in points}, key=lambda q: (-q.downstream, -q.knowledge)):  # most skill first
        if not best or p.knowledge > best[-1].knowledge:
            best.append(p)
    return best[::-1]


def knowledge_at(points: Sequence[Point], level: float) -> float | None:
    """Knowledge on the frontier of ``points`` at downstream skill ``level``: linear between the two frontier
    points around it; the least-skilled frontier point's knowledge below them; None above the most skilled
    (the method never reached that skill)."""
    front, level = pareto_frontier(points), round(level, DECIMALS)
    if not front or level > front[-1].downstream:
        return None
    for lo, hi in zip(front, front[1:]):
        if lo.downstream <= level <= hi.downstream:
            t = (level - lo.downstream) / (hi.downstream - lo.downstream)
            return lo.knowledge + t * (hi.knowledge - lo.knowledge)
    return front[0].knowledge  # level below every frontier point


def paired_bootstrap(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]], draws: int = 10_000,
                     seed: int = 0, level: float = 0.95) -> tuple[float, tuple[float, float]]:  # fmt: skip
    """Mean of ``a - b`` and its percentile bootstrap interval; ``a[s][q]`` and ``b[s][q]`` are two methods' scores
    with seed s on question q (the same questions and seeds for both: the difference is paired).

    Each draw resamples seeds and, independently, questions with replacement (a two-way bootstrap), so the
    interval carries both sources of variation: which facts were asked and how training happened to go.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2 or a.size == 0:
        raise ValueError(f"paired_bootstrap: expected two equal, non-empty [seeds][questions] tables, got shapes "
                         f"{a.shape} and {b.shape}.")  # fmt: skip
    d = a - b
    seeds, questions = d.shape
    rng = np.random.default_rng(seed)
    # how often each seed / question is drawn, per bootstrap draw: the draw's mean is c_s^T d c_q / (S Q)
    count_s = _draw_counts(rng, draws, seeds)
    count_q = _draw_counts(rng, draws, questions)
    means = np.einsum("ks,sq,kq->k", count_s, d, count_q) / (seeds * questions)
    tail = (1 - level) / 2
    lo, hi = np.quantile(means, [tail, 1 - tail])
    return float(d.mean()), (float(lo), float(hi))


def _draw_counts(rng: np.random.Generator, draws: int, n: int) -> np.ndarray:
    """[draws, n]: multiplicity of each of n items in each of ``draws`` resamples of size n with replacement."""
    return rng.multinomial(n, np.full(n, 1.0 / n), size=draws).astype(np.float64)
