"""The Localized Balancing Constraint (LBC) of LoRAMoE, for one wrapped module.

    Q[m, n] = sum_t w_n(x_{m,t})                      importance of expert n for sample m
    I[m, n] = coefficient of expert n's group for sample m's type
    Z       = I * Q
    L_lbc   = Var(Z) / Mean(Z)^2                      unbiased variance over all M*N entries

Minimising the squared coefficient of variation drives Z towards uniform, i.e. Q towards 1 / I: the group
with the *smaller* coefficient ends with the larger share. The reference code puts 1 + delta on a sample's
own group (mode "reference"), which pushes each sample away from its own group; mode "own_group" (default)
puts 1 - delta there, so that at the optimum a sample's own group gets (1 + delta) / (1 - delta) times the
other's share, as the paper intends. See SPEC.md.
"""

from __future__ import annotations

import torch

KNOWLEDGE, DOWNSTREAM, UNTYPED = 1, 0, -1


def importance(weights: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Q: router weights [M, T, N] summed over the tokens of each sample -> [M, N] (fp32).

    ``token_mask`` [M, T] (1 = real token) leaves padding out; ``None`` counts every position, as the
    reference code does.
    """
    weights = weights.float()
    if token_mask is None:
        return weights.sum(dim=1)
    return torch.einsum("mtn,mt->mn", weights, token_mask.to(weights.dtype))


def packed_importance(weights: torch.Tensor, sample_index: torch.Tensor, num_samples: int) -> torch.Tensor:
    """Q of a packed batch: router weights [rows, T, N] summed onto the sample each token belongs to -> [M, N]
    (fp32). ``sample_index`` [rows, T] holds the token's sample (0..M-1), -1 on padding (left out).

    A packed row holds several samples, so Q keeps one row per *sample*, never per packed row: the same Q, hence
    the same LBC, as the padded batch of those samples without padding counted."""
    n = weights.shape[-1]
    index = sample_index.reshape(-1)
    index = torch.where(index < 0, num_samples, index)  # padding goes to a spare row, dropped (no host sync)
    q = weights.new_zeros(num_samples + 1, n, dtype=torch.float32)
    return q.index_add_(0, index, weights.reshape(-1, n).float())[:num_samples]


def group_coefficients(
    task_types: torch.Tensor, num_experts: int, knowledge_experts: int, delta: float, mode: str = "own_group"
) -> torch.Tensor:
    """I [M, N]: experts 0..K-1 form the knowledge group, the rest the downstream group."""
    own, other = (1.0 + delta, 1.0 - delta) if mode == "reference" else (1.0 - delta, 1.0 + delta)
    is_knowledge_expert = torch.arange(num_experts, device=task_types.device) < knowledge_experts
    in_own_group = is_knowledge_expert.unsqueeze(0) == (task_types == KNOWLEDGE).unsqueeze(1)
    return torch.where(in_own_group, own, other)


def localized_balancing_loss(
    q: torch.Tensor, task_types: torch.Tensor, knowledge_experts: int, delta: float, mode: str = "own_group"
) -> torch.Tensor:
    """L_lbc for one module from its importance matrix ``q`` [M, N]; untyped samples (-1) are left out."""
    typed = task_types >= 0
    q, task_types = q[typed], task_types[typed]
    if q.numel() < 2:  # no typed sample (or a single entry): nothing to balance
        return q.new_zeros(())
    z = group_coefficients(task_types, q.shape[1], knowledge_experts, delta, mode) * q
    return z.var() / z.mean().square()
