"""LBC against hand-computed numbers, and the direction of its optimum in both modes."""

from __future__ import annotations

import pytest
import torch

from loramoe.balance import group_coefficients, importance, localized_balancing_loss

# Two samples (type 1 then type 0), two tokens each, two experts (K = 1).
W = torch.tensor([[[0.5, 0.5], [0.7, 0.3]], [[0.1, 0.9], [0.3, 0.7]]])  # Q = [[1.2, 0.8], [0.4, 1.6]]
TYPES = torch.tensor([1, 0])


def test_importance_sums_tokens_and_masks_padding():
    torch.testing.assert_close(importance(W), torch.tensor([[1.2, 0.8], [0.4, 1.6]]))
    mask = torch.tensor([[1, 1], [1, 0]])
    torch.testing.assert_close(importance(W, mask), torch.tensor([[1.2, 0.8], [0.1, 0.9]]))


def test_coefficients_own_group_and_reference():
    own = group_coefficients(TYPES, 2, 1, 0.1, "own_group")
    ref = group_coefficients(TYPES, 2, 1, 0.1, "reference")
    torch.testing.assert_close(own, torch.tensor([[0.9, 1.1], [1.1, 0.9]]))
    torch.testing.assert_close(ref, torch.tensor([[1.1, 0.9], [0.9, 1.1]]))


def test_lbc_hand_computed_own_group():
    # Z = [1.08, 0.88, 0.44, 1.44]; mean 0.96; squared deviations sum 0.5216; unbiased var 0.5216 / 3
    loss = localized_balancing_loss(importance(W), TYPES, 1, 0.1, "own_group")
    assert loss.item() == pytest.approx(0.5216 / 3 / 0.96**2, rel=1e-6)


def test_lbc_hand_computed_reference():
    # Z = [1.32, 0.72, 0.36, 1.76]; mean 1.04; squared deviations sum 1.1616
    loss = localized_balancing_loss(importance(W), TYPES, 1, 0.1, "reference")
    assert loss.item() == pytest.approx(1.1616 / 3 / 1.04**2, rel=1e-6)


def test_untyped_samples_are_neutral():
    w3 = torch.cat([W, torch.tensor([[[0.9, 0.1], [0.9, 0.1]]])])
    with_untyped = localized_balancing_loss(importance(w3), torch.tensor([1, 0, -1]), 1, 0.1)
    without = localized_balancing_loss(importance(W), TYPES, 1, 0.1)
    torch.testing.assert_close(with_untyped, without)
    assert localized_balancing_loss(importance(W), torch.tensor([-1, -1]), 1, 0.1).item() == 0.0


def test_delta_zero_is_plain_cv_squared():
    q = importance(W).flatten()
    expected = q.var() / q.mean() ** 2
    torch.testing.assert_close(localized_balancing_loss(importance(W), TYPES, 1, 0.0), expected)


@pytest.mark.parametrize("mode, own_share", [("own_group", 0.55), ("reference", 0.45)])
def test_optimum_direction(mode, own_share):
    """SPEC.md's worked example: one knowledge sample, two experts. Minimising LBC over the router logits
    gives the knowledge expert (1 + delta) / 2 of the weight in own_group mode, (1 - delta) / 2 in reference."""
    logits = torch.zeros(1, 10, 2, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=0.05)
    for _ in range(600):
        opt.zero_grad()
        loss = localized_balancing_loss(importance(logits.softmax(-1)), torch.tensor([1]), 1, 0.1, mode)
        loss.backward()
        opt.step()
    share = logits.softmax(-1)[..., 0].mean().item()
    assert share == pytest.approx(own_share, abs=2e-3)
