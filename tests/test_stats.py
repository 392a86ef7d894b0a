"""The frontier interpolation and the paired bootstrap, against hand-computed answers."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from loramoe.reproduce.stats import Point, knowledge_at, paired_bootstrap, pareto_frontier

# (downstream, knowledge): base-like point, two frontier points, one dominated point, one equal-skill loser
POINTS = [Point(0.20, 0.60), Point(0.50, 0.50), Point(0.80, 0.30), Point(0.40, 0.40), Point(0.80, 0.10)]


def test_pareto_frontier_keeps_the_undominated_points_by_rising_skill():
    assert pareto_frontier(POINTS) == [Point(0.20, 0.60), Point(0.50, 0.50), Point(0.80, 0.30)]
    assert pareto_frontier([Point(0.5, 0.5), Point(0.5, 0.5)]) == [Point(0.5, 0.5)]
    assert pareto_frontier([]) == []


def test_a_weakly_dominated_point_is_not_on_the_frontier():
    """Equal knowledge with less skill (or equal skill with less knowledge) is dominated: the frontier's knowledge
    strictly falls as skill rises, and a method's curve does not get a flat step from a weaker run."""
    assert pareto_frontier([Point(0.3, 0.5), Point(0.5, 0.5), Point(0.8, 0.2)]) == [Point(0.5, 0.5), Point(0.8, 0.2)]
    assert pareto_frontier([Point(0.5, 0.4), Point(0.5, 0.5)]) == [Point(0.5, 0.5)]


@pytest.mark.parametrize(("level", "expected"), [
    (0.50, 0.50),                 # on a frontier point
    (0.35, 0.55),                 # halfway between (0.2, 0.6) and (0.5, 0.5)
    (0.65, 0.40),                 # halfway between (0.5, 0.5) and (0.8, 0.3)
    (0.60, 0.5 - 0.2 / 3),        # a third of the way
    (0.10, 0.60),                 # below every point: the least-skilled frontier point has the most knowledge
    (0.80, 0.30),                 # the most skilled point itself
])  # fmt: skip
def test_knowledge_at_interpolates_along_the_frontier(level, expected):
    assert knowledge_at(POINTS, level) == pytest.approx(expected)


def test_knowledge_at_a_skill_never_reached_is_none():
    assert knowledge_at(POINTS, 0.81) is None
    assert knowledge_at([], 0.1) is None


def test_bootstrap_of_identical_methods_is_zero_and_of_a_constant_shift_is_that_shift():
    a = [[1, 0, 1, 1], [0, 0, 1, 0]]
    assert paired_bootstrap(a, a) == (0.0, (0.0, 0.0))
    b = [[x - 0.25 for x in row] for row in a]
    diff, (lo, hi) = paired_bootstrap(a, b)
    assert diff == pytest.approx(0.25) and lo == pytest.approx(0.25) and hi == pytest.approx(0.25)


def test_bootstrap_interval_matches_the_normal_approximation_for_one_seed():
    """One seed, 400 questions: a wins 120, b wins 80, 200 ties. The mean difference is 0.1 and its standard error
    sqrt(var / n) with var = E[d^2] - 0.1^2 = 0.5 - 0.01; the 95 % interval is 0.1 +- 1.96 se."""
    d = [1] * 120 + [-1] * 80 + [0] * 200
    a = [[max(x, 0) for x in d]]
    b = [[max(-x, 0) for x in d]]
    diff, (lo, hi) = paired_bootstrap(a, b, draws=20_000)
    se = math.sqrt((0.5 - 0.1**2) / 400)
    assert diff == pytest.approx(0.1)
    assert lo == pytest.approx(0.1 - 1.96 * se, abs=0.006) and hi == pytest.approx(0.1 + 1.96 * se, abs=0.006)


def test_bootstrap_carries_the_seed_to_seed_variation():
    """Two seeds that disagree (+0.4 and -0.2 on every question): resampling seeds puts the interval's ends near the
    two seeds' own differences, so it contains 0, although resampling questions alone would not see any spread."""
    a = np.array([[0.4] * 50, [0.0] * 50])
    b = np.array([[0.0] * 50, [0.2] * 50])
    diff, (lo, hi) = paired_bootstrap(a, b)
    assert diff == pytest.approx(0.1)
    assert lo == pytest.approx(-0.2) and hi == pytest.approx(0.4)


def test_bootstrap_refuses_tables_of_different_shapes():
    with pytest.raises(ValueError, match="seeds"):
        paired_bootstrap([[1, 0]], [[1, 0, 1]])


@pytest.mark.parametrize("shape", [(1, 0), (0, 3)], ids=["no-questions", "no-seeds"])
def test_bootstrap_refuses_empty_tables_naming_them(shape):
    empty = np.zeros(shape)
    shown = re.escape(str(shape))
    with pytest.raises(ValueError, match=rf"^paired_bootstrap: expected two equal, non-empty \[seeds\]\[questions\] "
                                         rf"tables, got shapes {shown} and {shown}"):  # fmt: skip
        paired_bootstrap(empty, empty)


def test_float_noise_does_not_make_two_equal_skills_different():
    """0.38 as a mean of three seeds is 0.37999999999999995: the same skill as 0.38, so the point with more
    knowledge wins there (read naively, the other point would be the frontier's only point at 0.38)."""
    noisy = (0.38 + 0.38 + 0.38) / 3
    assert noisy != 0.38
    points = [Point(noisy, 0.99), Point(0.38, 0.92)]
    assert pareto_frontier(points) == [Point(0.38, 0.99)]
    assert knowledge_at(points, 0.38) == pytest.approx(0.99)
