"""The LoRAMoE experts of the linears that read one input, as vLLM's fused FFN needs them (plain torch; no vLLM).

vLLM runs ``gate_proj`` and ``up_proj`` as one product (``gate_up_proj``, output ``[gate | up]``), so their
experts run together too: k = 2 linears (or 1 when the adapter targets only one of them), and k = 1 for
``down_proj``. With N experts of rank r per linear, for one token x:

    z      = [W_g1; ..; W_gk; A_1; ..; A_k] x      one GEMM: the routers ride on the experts' shrink
    w_j    = softmax(z[router j])                   fp32, per token, then cast to the experts' dtype
    y_j   += [scale * B_j] (w_j (.) z[A_j])          one batched GEMM over the k linears (scale folded into B)

which is `loramoe.layer.mix_experts` (y = W0 x + scale * sum_i w_i B_i A_i x) for each linear. One GEMM for the
routers and the shrinks of all k linears costs less than 2k small ones: that is what brings the adapter's cost in
vLLM down (BENCHMARKS.md).

Tensor parallelism (vLLM's ``MergedColumnParallelLinear`` / ``RowParallelLinear``): for gate_up the input is
whole on every rank and the output is sharded, so the shrink is replicated and each rank keeps its rows of B.
For down the input is sharded: each rank keeps its columns of the shrink, and ``reduce`` (an all-reduce) sums
the partial products before the softmax; B is replicated and adds to the base's already-reduced output.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn


class FusedExperts(nn.Module):
    """Experts of ``k`` linears reading one input, added to a base output made of ``blocks`` equal blocks (2 for
    gate_up: [gate | up]; 1 for down); ``slots`` says which block each of the k linears adds to.

    ``shard``: (rank, world size) of tensor parallelism; ``parallel``: "column" (output sharded: B's rows) or
    "row" (input sharded: the shrink's columns, partial products summed by ``reduce``).
    """

    def __init__(self, slots: Sequence[int], blocks: int, num_experts: int, r: int, d_in: int, d_out: int,
                 dtype: torch.dtype, parallel: str = "column", shard: tuple[int, int] = (0, 1),
                 reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:  # fmt: skip
        super().__init__()
        if parallel not in ("column", "row"):
            raise ValueError(f"parallel={parallel!r}: expected 'column' or 'row'")
        rank, world = shard
        if (d_out if parallel == "column" else d_in) % world:
            raise ValueError(f"{d_out if parallel == 'column' else d_in} features do not split over {world} ranks")
        self.k, self.n, self.r, self.blocks = len(slots), num_experts, r, blocks
        self.parallel, self.rank, self.world = parallel, rank, world
        self.reduce = reduce if parallel == "row" and world > 1 else None
        self.d_in = d_in // world if parallel == "row" else d_in
        self.d_out = d_out // world if parallel == "column" else d_out
        # shrink: [k routers (N rows each); k stacked A (N*r rows each)]; expand: scale * B per linear
        self.shrink = nn.Parameter(torch.empty(self.k * num_experts * (1 + r), self.d_in, dtype=dtype), requires_grad=False)
        self.expand = nn.Parameter(torch.empty(self.k, self.d_out, num_experts * r, dtype=dtype), requires_grad=False)
        self.register_buffer("slots", torch.tensor(list(slots), dtype=torch.long), persistent=False)

    @torch.no_grad()
    def load_(self, routers: Sequence[torch.Tensor], lora_A: Sequence[torch.Tensor], lora_B: Sequence[torch.Tensor],
              scaling: float) -> None:  # fmt: skip
        """Fill the parameters from whole (unsharded) tensors as saved: router N x in, A N*r x in, B out x N*r."""
        shrink = torch.cat([*routers, *lora_A], dim=0)
        expand = torch.stack(list(lora_B)) * scaling
        if self.parallel == "row":
            shrink = shrink.narrow(1, self.rank * self.d_in, self.d_in)
        else:
            expand = expand.narrow(1, self.rank * self.d_out, self.d_out)
        self.shrink.copy_(shrink)
        self.expand.copy_(expand)

    def forward(self, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """``base_out`` (tokens x blocks * d_out) plus the experts' mixture for ``x`` (tokens x d_in)."""
        t, k, n, r = x.shape[0], self.k, self.n, self.r
        z = F.linear(x, self.shrink)  # [T, k*N + k*N*r]
        if self.reduce is not None:
            z = self.reduce(z)
        weights = torch.softmax(z[:, : k * n].view(t, k, n), dim=-1, dtype=torch.float32).to(x.dtype)
        hs = z[:, k * n :].view(t, k, n, r) * weights.unsqueeze(-1)  # each r-block scaled by its expert's weight
        delta = torch.bmm(hs.view(t, k, n * r).transpose(0, 1), self.expand.transpose(1, 2))  # [k, T, d_out]
        out = base_out.view(t, self.blocks, self.d_out)
        if k == self.blocks:
            return (out + delta.transpose(0, 1)).view(t, -1)
        return out.index_add(1, self.slots, delta.transpose(0, 1)).view(t, -1)
