"""The LoRAMoE layer: a frozen linear plus N LoRA experts mixed per token by a softmax router.

    w(x) = softmax(W_g x)                                   (fp32, per token)
    y    = W0 x + b + (alpha / r) * sum_i w_i(x) B_i A_i dropout(x)

The experts are stored stacked, A = [A_1; ...; A_N] (N*r x in) and B = [B_1 ... B_N] (out x N*r), so the
sum over experts is two matrix products whatever N is: h = dropout(x) A^T, scale the i-th r-block of h by
w_i(x), then h B^T. That costs what one LoRA of rank N*r costs; no Python loop over experts.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import LoraMoeConfig


def mix_experts(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    router: torch.Tensor,
    scaling: float,
    dropout: nn.Module,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(delta, weights)``: the experts' summed contribution [..., out] and router weights [..., N] (fp32).

    The router reads the un-dropped input; dropout (one mask for all experts) applies to the expert branch only.
    """
    num_experts = router.shape[0]
    logits = F.linear(x, router)
    weights = torch.softmax(logits.float(), dim=-1)
    h = F.linear(dropout(x), lora_A)  # [..., N*r]
    gate = (weights * scaling).to(h.dtype).unsqueeze(-1)  # [..., N, 1]
    h = (h.unflatten(-1, (num_experts, -1)) * gate).flatten(-2)
    return F.linear(h, lora_B), weights


class LoraMoeLayer(BaseTunerLayer):
    """Adapter state of one wrapped linear; `Linear` below adds the forward."""

    adapter_layer_names = ("loramoe_A", "loramoe_B", "loramoe_router")
    other_param_names = ("r", "num_experts", "scaling", "loramoe_dropout")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.num_experts: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.loramoe_dropout = nn.ModuleDict({})
        self.loramoe_A = nn.ParameterDict({})
        self.loramoe_B = nn.ParameterDict({})
        self.loramoe_router = nn.ParameterDict({})
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.kwargs = kwargs
        # Where router weights go during a forward; None (the default) costs one `if` per call.
        self._blc_sink: list[torch.Tensor] | None = None
        self._capture_sink: list[torch.Tensor] | None = None

        base = self.get_base_layer()
        if isinstance(base, nn.Linear):
            self.in_features, self.out_features = base.in_features, base.out_features
        elif isinstance(base, Conv1D):  # GPT-2 style: weight is (in, out)
            self.in_features, self.out_features = base.weight.shape
        else:
            raise TypeError(f"LoRAMoE wraps nn.Linear or transformers Conv1D, not {type(base).__name__}.")

    def update_layer(self, adapter_name: str, config: LoraMoeConfig) -> None:
        n, r = config.num_experts, config.r
        self.r[adapter_name] = r
        self.num_experts[adapter_name] = n
        self.scaling[adapter_name] = config.scaling
        self.loramoe_dropout[adapter_name] = nn.Dropout(config.lora_dropout) if config.lora_dropout else nn.Identity()
        self.loramoe_A[adapter_name] = nn.Parameter(torch.empty(n * r, self.in_features))
        self.loramoe_B[adapter_name] = nn.Parameter(torch.empty(self.out_features, n * r))
        self.loramoe_router[adapter_name] = nn.Parameter(torch.empty(n, self.in_features))
        self.reset_parameters(adapter_name, config.init_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    @torch.no_grad()
    def reset_parameters(self, adapter_name: str, init_weights: bool = True) -> None:
        """Reference initialisation: each A_i and W_g kaiming-uniform(a=sqrt(5)), B zero."""
        # Stacking keeps fan_in = in_features, so one call draws each A_i exactly as the reference does.
        nn.init.kaiming_uniform_(self.loramoe_A[adapter_name], a=math.sqrt(5))
        nn.init.kaiming_uniform_(self.loramoe_router[adapter_name], a=math.sqrt(5))
        if init_weights:
            nn.init.zeros_(self.loramoe_B[adapter_name])
        else:
            nn.init.normal_(self.loramoe_B[adapter_name], std=0.02)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise NotImplementedError(
            "LoRAMoE cannot be merged into the base weights: the router mixes the experts per token."
        )


class Linear(nn.Module, LoraMoeLayer):
    """A frozen `nn.Linear` or `Conv1D` with LoRAMoE experts. The base weight is used in place, never copied."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraMoeConfig, **kwargs: Any) -> None:
        super().__init__()
        LoraMoeLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            return result
        for name in self.active_adapters:
            if name not in self.loramoe_A:
                continue
            A = self.loramoe_A[name]
            delta, weights = mix_experts(
                self._cast_input_dtype(x, A.dtype),
                A,
                self.loramoe_B[name],
                self.loramoe_router[name],
                self.scaling[name],
                self.loramoe_dropout[name],
            )
            result = result + delta.to(result.dtype)
            if self._blc_sink is not None:
                self._blc_sink.append(weights)
            if self._capture_sink is not None:
                self._capture_sink.append(weights.detach())
        return result

    def __repr__(self) -> str:
        return "loramoe." + super().__repr__()
