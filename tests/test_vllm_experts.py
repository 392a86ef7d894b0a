"""The vLLM plugin's fused experts (loramoe.vllm.experts) against conftest's per-expert oracle, whole and split over
tensor-parallel ranks as vLLM splits the FFN. Plain torch: no vLLM needed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import NaiveLoraMoe
from loramoe.vllm.experts import FusedExperts

N, R, SCALE, T, HIDDEN, INNER = 3, 4, 2.0, 7, 16, 24


def _experts(d_in, d_out, seed):
    g = torch.Generator().manual_seed(seed)
    return ([torch.randn(R, d_in, generator=g) for _ in range(N)], [torch.randn(d_out, R, generator=g) for _ in range(N)],
            torch.randn(N, d_in, generator=g))  # fmt: skip


def _oracle(linear: nn.Linear, experts) -> NaiveLoraMoe:
    return NaiveLoraMoe(linear, *experts, SCALE)


def _load(module: FusedExperts, experts_list) -> FusedExperts:
    module.load_([e[2] for e in experts_list], [torch.cat(e[0]) for e in experts_list], [torch.cat(e[1], dim=1) for e in experts_list],
                 SCALE)  # fmt: skip
    return module


@pytest.fixture
def ffn():
    torch.manual_seed(0)
    gate, up, down = nn.Linear(HIDDEN, INNER, bias=False), nn.Linear(HIDDEN, INNER, bias=False), nn.Linear(INNER, HIDDEN, bias=False)
    return gate, up, down, _experts(HIDDEN, INNER, 1), _experts(HIDDEN, INNER, 2), _experts(INNER, HIDDEN, 3)


@torch.no_grad()
def test_gate_up_and_down_match_the_per_expert_oracle(ffn):
    gate, up, down, e_gate, e_up, e_down = ffn
    x = torch.randn(T, HIDDEN)
    gate_up = _load(FusedExperts([0, 1], 2, N, R, HIDDEN, INNER, torch.float32), [e_gate, e_up])
    base = torch.cat([gate(x), up(x)], dim=-1)  # vLLM's gate_up_proj output: [gate | up]
    expected = torch.cat([_oracle(gate, e_gate)(x), _oracle(up, e_up)(x)], dim=-1)
    torch.testing.assert_close(gate_up(x, base), expected, rtol=1e-5, atol=1e-5)

    h = torch.randn(T, INNER)
    down_experts = _load(FusedExperts([0], 1, N, R, INNER, HIDDEN, torch.float32, "row"), [e_down])
    torch.testing.assert_close(down_experts(h, down(h)), _oracle(down, e_down)(h), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_one_adapted_half_of_gate_up_leaves_the_other_alone(ffn):
    gate, up, _, _, e_up, _ = ffn
    x = torch.randn(T, HIDDEN)
    only_up = _load(FusedExperts([1], 2, N, R, HIDDEN, INNER, torch.float32), [e_up])
    out = only_up(x, torch.cat([gate(x), up(x)], dim=-1))
    torch.testing.assert_close(out[:, :INNER], gate(x))
    torch.testing.assert_close(out[:, INNER:], _oracle(up, e_up)(x), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_router_softmax_is_fp32_in_a_bf16_model(ffn):
    """Experts in bf16, router weights from fp32 softmax: the bf16 result stays close to the fp32 oracle."""
    gate, up, _, e_gate, e_up, _ = ffn
    x = torch.randn(T, HIDDEN)
    gate_up = _load(FusedExperts([0, 1], 2, N, R, HIDDEN, INNER, torch.bfloat16), [e_gate, e_up])
    assert gate_up.shrink.dtype == gate_up.expand.dtype == torch.bfloat16
    base = torch.cat([gate(x), up(x)], dim=-1)
    out = gate_up(x.bfloat16(), base.bfloat16())
    assert out.dtype == torch.bfloat16
    expected = torch.cat([_oracle(gate, e_gate)(x), _oracle(up, e_up)(x)], dim=-1)
    torch.testing.assert_close(out.float(), expected, rtol=0.05, atol=0.25)


@torch.no_grad()
def test_tensor_parallel_shards_recombine_to_the_whole(ffn):
    """Two ranks as vLLM splits the FFN: gate_up column-parallel (each rank its rows of gate and of up), down
    row-parallel (each rank its columns of the input; the partial shrinks summed before the softmax)."""
    gate, up, down, e_gate, e_up, e_down = ffn
    world, x, h = 2, torch.randn(T, HIDDEN), torch.randn(T, INNER)
    shard = INNER // world
    rows = [slice(rank * shard, (rank + 1) * shard) for rank in range(world)]

    parts = []
    for rank in range(world):
        m = _load(FusedExperts([0, 1], 2, N, R, HIDDEN, INNER, torch.float32, "column", (rank, world)), [e_gate, e_up])
        local_base = torch.cat([F.linear(x, gate.weight[rows[rank]]), F.linear(x, up.weight[rows[rank]])], dim=-1)
        parts.append(m(x, local_base).view(T, 2, shard))
    expected = torch.cat([_oracle(gate, e_gate)(x), _oracle(up, e_up)(x)], dim=-1)
    torch.testing.assert_close(torch.cat(parts, dim=-1).view(T, -1), expected, rtol=1e-5, atol=1e-5)

    ranks = [FusedExperts([0], 1, N, R, INNER, HIDDEN, torch.float32, "row", (rank, world)) for rank in range(world)]
    for rank, m in enumerate(ranks):
        _load(m, [e_down])
        other = ranks[1 - rank]
        m.reduce = lambda z, other=other, rank=rank: z + F.linear(h[:, rows[1 - rank]], other.shrink)  # the all-reduce
    reduced_base = down(h)  # RowParallelLinear's output after its own all-reduce
    for rank, m in enumerate(ranks):
        torch.testing.assert_close(m(h[:, rows[rank]], reduced_base), _oracle(down, e_down)(h), rtol=1e-5, atol=1e-5)


def test_bad_layouts_are_refused():
    with pytest.raises(ValueError, match="parallel='diagonal'"):
        FusedExperts([0], 1, N, R, INNER, HIDDEN, torch.float32, "diagonal")
    with pytest.raises(ValueError, match="do not split over 5 ranks"):
        FusedExperts([0], 1, N, R, INNER, HIDDEN, torch.float32, "row", (0, 5))
