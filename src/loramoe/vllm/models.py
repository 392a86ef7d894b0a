"""vLLM models with LoRAMoE experts in the FFN: vLLM's own Llama, Mistral and Qwen2, unchanged, with each adapted
decoder layer's MLP swapped for one that adds the experts (`loramoe.vllm.experts`) to ``gate_up_proj`` and
``down_proj``. The base weights load through vLLM's loader as for the plain model; the adapter's tensors come
from the adapter folder named by the ``loramoe_adapter`` config attribute, checked by `plan_adapter`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.distributed import tensor_model_parallel_all_reduce
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM

from .adapter import ADAPTER_KEY, AdapterPlan, plan_adapter
from .experts import FusedExperts

GATE_UP = ("gate_proj", "up_proj")  # the blocks of vLLM's gate_up_proj output, in order


class LoraMoeMLP(nn.Module):
    """vLLM's SiLU-gated MLP (its own gate_up_proj, act_fn and down_proj, under the same names so that the base
    weights load unchanged) plus the experts of the adapted linears."""

    def __init__(self, mlp: nn.Module, gate_up: FusedExperts | None, down: FusedExperts | None) -> None:
        super().__init__()
        self.gate_up_proj, self.act_fn, self.down_proj = mlp.gate_up_proj, mlp.act_fn, mlp.down_proj
        self.gate_up_experts, self.down_experts = gate_up, down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up, _ = self.gate_up_proj(x)
        if self.gate_up_experts is not None:
            gate_up = self.gate_up_experts(x, gate_up)
        h = self.act_fn(gate_up)
        out, _ = self.down_proj(h)
        if self.down_experts is not None:
            out = self.down_experts(h, out)
        return out


def _refuse_unsupported(vllm_config: VllmConfig) -> None:
    """Engine settings the plugin does not handle are refused by name rather than served wrongly."""
    if vllm_config.lora_config is not None:
        raise ValueError("--enable-lora: vLLM's own LoRA on top of a LoRAMoE model is not supported (serve one adapter)")
    if vllm_config.quant_config is not None:
        raise ValueError(f"quantization={vllm_config.model_config.quantization!r}: the LoRAMoE plugin serves "
                         "unquantized bases only")  # fmt: skip
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        raise ValueError("--pipeline-parallel-size > 1 is not supported by the LoRAMoE plugin (tensor parallelism is)")


class LoraMoeMixin:
    """Put before a vLLM causal LM class: builds it, then swaps in `LoraMoeMLP` where the adapter has experts."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "", **kwargs: Any) -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        _refuse_unsupported(vllm_config)
        hf_config = vllm_config.model_config.hf_config
        adapter = getattr(hf_config, ADAPTER_KEY, None)
        if not adapter:
            raise ValueError(f"{ADAPTER_KEY}: not set in the model config (start the server with `loramoe serve`, or "
                             f"pass --hf-overrides '{{\"{ADAPTER_KEY}\": \"/path/to/adapter\", ...}}')")  # fmt: skip
        self.loramoe_plan: AdapterPlan = plan_adapter(adapter, hf_config)
        dtype = vllm_config.model_config.dtype
        plan = self.loramoe_plan
        for layer, linears in plan.targets.items():
            block = self.model.layers[layer]
            mlp = block.mlp
            gate_up = [i for i, name in enumerate(GATE_UP) if name in linears]
            if not mlp.down_proj.reduce_results:
                raise ValueError(f"model.layers.{layer}.mlp.down_proj: an unreduced down_proj is not supported")
            gu, dp = mlp.gate_up_proj, mlp.down_proj
            block.mlp = LoraMoeMLP(
                mlp,
                FusedExperts(gate_up, 2, plan.num_experts, plan.r, gu.input_size, gu.output_sizes[0], dtype,
                             "column", (gu.tp_rank, gu.tp_size)) if gate_up else None,  # fmt: skip
                FusedExperts([0], 1, plan.num_experts, plan.r, dp.input_size, dp.output_size, dtype, "row",
                             (dp.tp_rank, dp.tp_size), tensor_model_parallel_all_reduce)  # fmt: skip
                if "down_proj" in linears else None,
            )

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The base's weights as the base class loads them, then the adapter's, whose names are returned too so
        that vLLM's check that every parameter was loaded covers the experts."""
        loaded = set(super().load_weights(weights))
        plan, tensors = self.loramoe_plan, self.loramoe_plan.tensors()
        for layer, linears in plan.targets.items():
            mlp = self.model.layers[layer].mlp
            for attr, group in (("gate_up_experts", GATE_UP), ("down_experts", ("down_proj",))):
                experts = getattr(mlp, attr)
                if experts is None:
                    continue
                names = [name for name in group if name in linears]
                experts.load_(*([tensors[plan.key(layer, name, part)] for name in names] for part in ("router", "A", "B")),
                              scaling=plan.scaling)  # fmt: skip
                loaded |= {f"model.layers.{layer}.mlp.{attr}.{p}" for p in ("shrink", "expand")}
        return loaded


class LoraMoeLlamaForCausalLM(LoraMoeMixin, LlamaForCausalLM):
    pass


class LoraMoeMistralForCausalLM(LoraMoeMixin, MistralForCausalLM):
    pass


class LoraMoeQwen2ForCausalLM(LoraMoeMixin, Qwen2ForCausalLM):
    pass
