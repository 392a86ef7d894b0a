"""The four things compared, built around one shared frozen base linear.

- ``base``: the frozen linear alone (the floor every adapter pays);
- ``lora``: PEFT's LoRA of rank N*r (the cost LoRAMoE aims for);
- ``loramoe``: this project's fused layer;
- ``loop``: SPEC.md's formula computed the way the reference code does it, one expert at a time, written here
  from the spec (not imported): each expert draws its own dropout mask and adds its own full-size output.
"""

from __future__ import annotations

import torch
from peft import LoraConfig
from peft.tuners.lora import Linear as PeftLoraLinear
from torch import nn

from loramoe import LoraMoeConfig
from loramoe.layer import Linear as LoraMoeLinear

METHODS = ("base", "lora", "loramoe", "loop")
ALPHA = 32.0


class LoopLoraMoe(nn.Module):
    """y = W0 x + sum_i B_i(A_i(dropout(x))) * w_i(x) * scaling, one expert after the other (reference style).

    ``sink``, when a list, receives the fp32 router weights of each call (for the LBC at model level).
    """

    def __init__(self, base: nn.Linear, num_experts: int, r: int, lora_alpha: float, dropout: float) -> None:
        super().__init__()
        self.base = base
        self.router = nn.Linear(base.in_features, num_experts, bias=False)
        self.lora_A = nn.ModuleList(nn.Linear(base.in_features, r, bias=False) for _ in range(num_experts))
        self.lora_B = nn.ModuleList(nn.Linear(r, base.out_features, bias=False) for _ in range(num_experts))
        self.dropout = nn.Dropout(dropout)
        self.scaling = lora_alpha / r
        self.sink: list[torch.Tensor] | None = None

    @torch.no_grad()
    def copy_from(self, layer: LoraMoeLinear) -> LoopLoraMoe:
        """Take the experts and router of a fused layer, so both compute the same function."""
        n, r = len(self.lora_A), self.lora_A[0].out_features
        A, B = layer.loramoe_A["default"], layer.loramoe_B["default"]
        self.router.weight.copy_(layer.loramoe_router["default"])
        for i in range(n):
            self.lora_A[i].weight.copy_(A[i * r : (i + 1) * r])
            self.lora_B[i].weight.copy_(B[:, i * r : (i + 1) * r])
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        weights = torch.softmax(self.router(x).float(), dim=-1)
        if self.sink is not None:
            self.sink.append(weights)
        w = weights.to(result.dtype)
        for i, (A, B) in enumerate(zip(self.lora_A, self.lora_B)):
            result = result + B(A(self.dropout(x))) * w[..., i : i + 1] * self.scaling
        return result


def build_layer(method: str, base: nn.Linear, num_experts: int, r: int, dropout: float, seed: int = 0) -> nn.Module:
    """One method around ``base`` (frozen, shared). Adapter weights are random (B non-zero) and reproducible."""
    torch.manual_seed(seed)
    if method == "base":
        return base
    if method == "lora":
        config = LoraConfig(r=num_experts * r, lora_alpha=ALPHA, lora_dropout=dropout)
        layer = PeftLoraLinear(base, "default", config=config, r=config.r, lora_alpha=config.lora_alpha)
        with torch.no_grad():
            layer.lora_B["default"].weight.normal_(0, 0.02)
        return layer
    fused = LoraMoeLinear(base, "default", LoraMoeConfig(num_experts=num_experts, r=r, lora_alpha=ALPHA,
                                                          lora_dropout=dropout, init_weights=False))
    if method == "loramoe":
        return fused
    if method == "loop":
        return LoopLoraMoe(base, num_experts, r, ALPHA, dropout).copy_from(fused)
    raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
