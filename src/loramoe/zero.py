"""A DeepSpeed ZeRO engine's trainable weights and Adam state, whole and keyed by parameter name, and back.

ZeRO-2 partitions the fp32 master weights and the optimizer state over processes, ZeRO-3 the parameters too. Our
checkpoints hold the same layout whatever the engine: ``trainable.safetensors`` keyed like ``model.state_dict()``
and the optimizer state keyed by parameter name, as ``torch.distributed.checkpoint.state_dict`` writes it for
DDP and FSDP. So a ZeRO run saves and resumes like any other, and its checkpoints are read with
``torch.load(weights_only=True)``: DeepSpeed's own ``save_checkpoint`` writes pickles that its loader reads with
``weights_only=False``, one file per rank readable only by the same ZeRO layout (and, unless told otherwise, the
frozen base model with them).

The functions that read or write state are collectives: all ranks call them. They use DeepSpeed's
``safe_get/set_full_*`` API, plus the attributes of its ZeRO optimizers that `_partitions` names.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

ADAM_STATE = ("exp_avg", "exp_avg_sq")


def is_engine(model: Any) -> bool:
    """Whether ``model`` is a DeepSpeed engine (without importing DeepSpeed where nothing did)."""
    deepspeed = sys.modules.get("deepspeed")
    return deepspeed is not None and isinstance(model, deepspeed.DeepSpeedEngine)


def _trainable(engine: Any) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]


def trainable_state(engine: Any) -> dict[str, torch.Tensor]:
    """The whole fp32 master weight of every trainable parameter, on CPU, keyed like ``model.state_dict()``."""
    from deepspeed.utils import safe_get_full_fp32_param

    return {n: safe_get_full_fp32_param(p).detach().to("cpu", copy=True).contiguous() for n, p in _trainable(engine)}


def _base_optimizer(engine: Any) -> torch.optim.Optimizer:
    """The torch (or DeepSpeed CPU) Adam that ZeRO steps on its flat fp32 partitions."""
    return engine.optimizer.optimizer


def _partitions(engine: Any) -> list[tuple[int, list[nn.Parameter], torch.Tensor]]:
    """Per ZeRO (sub-)group: its optimizer group's index, the model's parameters in it, and this rank's flat fp32
    partition of them, which the base optimizer steps and keys its state by. ZeRO's attributes: stage 1/2
    ``bit16_groups`` and ``single_partition_of_fp32_groups``; stage 3 ``fp16_groups``,
    ``fp32_partitioned_groups_flat`` and ``sub_group_to_group_id`` (its groups are split into sub-groups)."""
    zopt = engine.optimizer
    if hasattr(zopt, "bit16_groups"):
        return [(i, list(members), flat) for i, (members, flat)
                in enumerate(zip(zopt.bit16_groups, zopt.single_partition_of_fp32_groups))]  # fmt: skip
    return [(zopt.sub_group_to_group_id[i], list(members), flat)
            for i, (members, flat) in enumerate(zip(zopt.fp16_groups, zopt.fp32_partitioned_groups_flat))]  # fmt: skip


def optimizer_state(engine: Any) -> dict[str, Any]:
    """``{"state": {name: {"step", "exp_avg", "exp_avg_sq"}}, "param_groups": [{..., "params": [names]}]}``, the
    layout of ``get_optimizer_state_dict(..., full_state_dict=True)``."""
    from deepspeed.utils import safe_get_full_optimizer_state

    base = _base_optimizer(engine)
    steps = {float(s["step"]) for s in base.state.values() if "step" in s}
    step = torch.tensor(steps.pop() if steps else 0.0)
    state = {n: {"step": step.clone(), **{k: safe_get_full_optimizer_state(p, k).to("cpu", copy=True) for k in ADAM_STATE}}
             for n, p in _trainable(engine)}  # fmt: skip
    name_of = {id(p): n for n, p in _trainable(engine)}
    groups = [{**{k: v for k, v in group.items() if k != "params"}, "params": []} for group in base.param_groups]
    for index, members, _ in _partitions(engine):
        groups[index]["params"] += [name_of[id(p)] for p in members]
    return {"state": state, "param_groups": groups}


def _create_adam_state(engine: Any) -> None:
    """Adam creates its state at its first step; a resume sets it before. ZeRO-1/2 also links each model
    parameter to its slice of that state, which it would otherwise do at its first step."""
    from deepspeed.utils import lazy_init_hp_params_optimizer_state

    base = _base_optimizer(engine)
    for _, members, flat in _partitions(engine):
        if not base.state.get(flat):
            step = torch.tensor(0.0) if isinstance(base, torch.optim.AdamW) else 0  # DeepSpeed's CPU Adam: an int
            base.state[flat] = {"step": step, **{k: torch.zeros_like(flat) for k in ADAM_STATE}}
        if hasattr(engine.optimizer, "bit16_groups"):
            lazy_init_hp_params_optimizer_state(members, flat, base.state)


def load_state(engine: Any, weights: dict[str, torch.Tensor], optim_state: dict[str, Any]) -> None:
    """Put whole weights and Adam state (as `trainable_state` and `optimizer_state` give them, or as a DDP/FSDP
    checkpoint holds them) into the partitions of this rank: the fp32 masters, the model's own (possibly
    lower-precision, possibly ZeRO-3-partitioned) copies, and the Adam moments and step. The learning rate and
    weight decay are left to the caller."""
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    _create_adam_state(engine)
    params = _trainable(engine)
    sharded = [p for _, p in params if hasattr(p, "ds_id")]  # ZeRO-3: gather, change on rank 0, re-partition
    with deepspeed.zero.GatheredParameters(sharded, modifier_rank=0) if sharded else torch.no_grad(), torch.no_grad():
        for name, param in params:
            param.data.copy_(weights[name].to(param.device, param.dtype))
    for name, param in params:
        value = weights[name].to(param.device, torch.float32)
        safe_set_full_fp32_param(param, value)
        saved = optim_state["state"][name]
        for key in ADAM_STATE:
            safe_set_full_optimizer_state(param, saved[key].to(param.device, torch.float32), key)
    step = {float(s["step"]) for s in optim_state["state"].values()}.pop()
    for state in _base_optimizer(engine).state.values():
        state["step"] = torch.tensor(step) if torch.is_tensor(state["step"]) else int(step)
