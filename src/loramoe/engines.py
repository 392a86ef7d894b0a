"""Engine set-up for `loramoe train`: which Accelerator a run gets (DDP, torch FSDP2 with ``--fsdp``, DeepSpeed
ZeRO with ``--deepspeed CONFIG``), what each refuses, and the three places where the engines differ for the loop
(a micro-batch's backward, the end of a step, gathering the trainable weights).

Why a ``--deepspeed CONFIG`` flag rather than accelerate's launcher: the flag works under plain ``torchrun`` (the
reference code's launch), on GPUs and on CPUs (accelerate's launcher applies DeepSpeed only when it finds a GPU-like
device), and the config becomes a run setting like any other (YAML, ``train_config.yaml``). A DeepSpeed request
through accelerate's launcher (``ACCELERATE_USE_DEEPSPEED=true``) without the flag is refused with the command to
use, never dropped.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import zero
from .checkpoint import full_tensor, trainable_state

# DeepSpeed config keys that `loramoe train` settings decide: "auto" (or absent) takes the run's value; another
# value is refused unless equal (a config may not silently override a flag, nor a flag a config).
_FLAG_OF = {
    "train_micro_batch_size_per_gpu": "--batch-size",
    "gradient_accumulation_steps": "--grad-accum",
    "train_batch_size": "--batch-size x --grad-accum x processes",
    "gradient_clipping": "--max-grad-norm",
    "bf16.enabled": "--bf16",
    "fp16.enabled": "fp16 (loramoe trains in fp32 or --bf16)",
}


def _device_available() -> bool:
    return bool(getattr(torch, "accelerator", None) and torch.accelerator.is_available())


def deepspeed_config(path: str, cfg: Any, world: int) -> dict[str, Any]:
    """The DeepSpeed config of ``path`` with every key that a `loramoe train` setting decides filled in (see
    ``_FLAG_OF``); a config that contradicts the run, or asks for what the loop does not do, is refused."""
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: --deepspeed config not found (expected a DeepSpeed JSON file)") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e}) (expected a DeepSpeed config)") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a JSON object (a DeepSpeed config), got {type(config).__name__}")
    for section in ("optimizer", "scheduler"):
        if section in config:
            raise ValueError(f"{path}: '{section}': loramoe train builds AdamW and its schedule from --lr, "
                             "--weight-decay, --scheduler and --warmup-ratio (expected no 'optimizer' or "
                             "'scheduler' section)")  # fmt: skip
    stage = config.get("zero_optimization", {}).get("stage")
    if stage not in (2, 3):
        raise ValueError(f"{path}: zero_optimization.stage is {stage!r} (expected 2 or 3, the ZeRO stages loramoe "
                         "train supports; without ZeRO, train without --deepspeed: DDP)")  # fmt: skip
    wanted = {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": cfg.batch_size * cfg.grad_accum * world,
        "gradient_clipping": float(cfg.max_grad_norm),  # 0: DeepSpeed measures the norm and does not clip
        "bf16.enabled": bool(cfg.bf16),
        "fp16.enabled": False,
    }
    for key, value in wanted.items():
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node.setdefault(part, {})
        given = node.get(leaf, "auto")
        if given == "auto":
            node[leaf] = value
        elif given != value:
            raise ValueError(f"{path}: {key} is {given!r} but {_FLAG_OF[key]} gives {value!r} (expected \"auto\" "
                             f"or {value!r})")  # fmt: skip
    return config


def make_accelerator(cfg: Any) -> Any:
    """The run's Accelerator. DeepSpeed (``cfg.deepspeed``) needs a launcher (torchrun sets ``LOCAL_RANK``); on a
    machine without GPUs it runs over gloo, which accelerate only sets up when its state is created with that
    backend first (its ``cpu=True`` path would skip DeepSpeed). Without DeepSpeed, torchrun on CPUs needs
    ``cpu=True`` for accelerate to set up gloo."""
    from accelerate import Accelerator, DistributedDataParallelKwargs, PartialState
    from accelerate.utils import DeepSpeedPlugin, DistributedType

    launcher_asked = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if launcher_asked and not cfg.deepspeed:
        raise ValueError("ACCELERATE_USE_DEEPSPEED: accelerate's launcher asked for DeepSpeed, which loramoe train "
                         "takes as --deepspeed CONFIG (expected: accelerate launch or torchrun ... loramoe train "
                         "--deepspeed examples/deepspeed/zero2.json ..., without --use_deepspeed)")  # fmt: skip
    common = {"mixed_precision": "bf16" if cfg.bf16 else "no",
              "kwargs_handlers": [DistributedDataParallelKwargs(find_unused_parameters=False)]}  # fmt: skip
    if not cfg.deepspeed:
        distributed_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not _device_available()
        return Accelerator(cpu=distributed_cpu, **common)
    if "LOCAL_RANK" not in os.environ:
        raise ValueError("deepspeed: DeepSpeed runs under a launcher (expected torchrun --nproc_per_node N -m "
                         "loramoe.cli train --deepspeed ..., N >= 1)")  # fmt: skip
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        raise ValueError("deepspeed: DeepSpeed is not installed (expected pip install 'loramoe[deepspeed]')") from None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    plugin = DeepSpeedPlugin(hf_ds_config=deepspeed_config(cfg.deepspeed, cfg, world))
    # accelerate reads this when its state is created (DeepSpeed's own process group, which ZeRO-3 needs when the
    # model is built); it is put back afterwards so that a later run in this process chooses its engine afresh
    before = os.environ.get("ACCELERATE_USE_DEEPSPEED")
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        if not _device_available():
            PartialState(backend="gloo")
        acc = Accelerator(deepspeed_plugin=plugin, gradient_accumulation_steps=cfg.grad_accum, **common)
    finally:
        if before is None:
            del os.environ["ACCELERATE_USE_DEEPSPEED"]
        else:
            os.environ["ACCELERATE_USE_DEEPSPEED"] = before
    if acc.distributed_type != DistributedType.DEEPSPEED:  # never train without the engine that was asked for
        raise ValueError(f"deepspeed: accelerate set up {acc.distributed_type.value}, not DeepSpeed (expected a "
                         "launch by torchrun or accelerate launch)")  # fmt: skip
    return acc


def is_deepspeed(acc: Any) -> bool:
    from accelerate.utils import DistributedType

    return acc.distributed_type == DistributedType.DEEPSPEED


def check_engine(cfg: Any, acc: Any) -> bool:
    """Refuse engine combinations that cannot work; return whether parameters will be sharded (saving must then
    gather them on every rank)."""
    from accelerate.utils import DistributedType

    if cfg.fsdp and acc.num_processes < 2:
        raise ValueError("--fsdp shards over processes: launch with torchrun --nproc_per_node N (N >= 2).")
    if cfg.fsdp and (cfg.deepspeed or acc.distributed_type == DistributedType.FSDP):
        other = "--deepspeed" if cfg.deepspeed else f"accelerate's {acc.distributed_type.value} plugin"
        raise ValueError(f"--fsdp and {other} both shard: use one of them.")
    if cfg.deepspeed and cfg.quantize:
        raise ValueError(f"quantize: {cfg.quantize!r} with --deepspeed (expected one of them: DeepSpeed does not "
                         "partition bitsandbytes weights)")  # fmt: skip
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and acc.distributed_type != DistributedType.FSDP:
        acc.print(
            f"warning: accelerate's FSDP plugin is not applied here (accelerate runs {acc.distributed_type.value}: it "
            "enables FSDP only for GPU-like devices); training is replicated. Use --fsdp for torch FSDP2 on CPU."
        )
    return cfg.fsdp or acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)


def shard_with_fsdp(model: nn.Module) -> nn.Module:
    """torch FSDP2: shard each decoder block (the classes a HF model lists in ``_no_split_modules``), then the rest."""
    from torch.distributed.fsdp import fully_shard

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"--fsdp: {type(base).__name__} names no decoder block classes (_no_split_modules) to shard.")
    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def optimizer_groups(params: list[nn.Parameter], weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: matrices with weight decay, vectors (norms, biases) without. Only non-empty groups: LoRA and
    LoRAMoE train matrices only, DeepSpeed drops an empty group, and a scheduler built on the optimizer would
    then hold one group too many."""
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]  # fmt: skip
    return [g for g in groups if g["params"]]


@contextlib.contextmanager
def micro_batch(acc: Any, model: nn.Module, cfg: Any, last: bool) -> Iterator[None]:
    """Around one micro-batch's forward and backward: gradients are synchronised (reduced, or under ZeRO reduced
    into partitions) only after the step's last micro-batch."""
    if is_deepspeed(acc):
        model.set_gradient_accumulation_boundary(last)
        yield
    elif cfg.fsdp:
        model.set_requires_gradient_sync(last)
        yield
    else:
        with contextlib.nullcontext() if last else acc.no_sync(model):
            yield


def backward(acc: Any, model: nn.Module, loss: torch.Tensor) -> None:
    """``loss`` is already this micro-batch's share of the step (divided by the accumulation): DeepSpeed must not
    divide it again."""
    if is_deepspeed(acc):
        model.backward(loss, scale_wrt_gas=False)
    else:
        acc.backward(loss)


def finish_step(acc: Any, model: nn.Module, params: list[nn.Parameter], max_grad_norm: float, finite_loss: bool) -> float:
    """The gradient norm before clipping. DDP/FSDP: clip here; the loop applies the update after checking the norm.
    DeepSpeed clips inside its own step and measures the norm only there, so its step runs here, unless the loss is
    not finite; a non-finite gradient makes DeepSpeed skip the update itself (it reports the norm as inf)."""
    if not is_deepspeed(acc):
        norm = acc.clip_grad_norm_(params, max_grad_norm or float("inf"))  # inf: measure, do not clip
        return float(full_tensor(norm))
    if not finite_loss:
        return float("nan")
    model.step()
    return float(model.get_global_grad_norm())


def final_weights(acc: Any, model: nn.Module, final: nn.Module, sharded: bool) -> dict[str, torch.Tensor] | None:
    """Trainable weights to save, gathered where they are sharded (``None``: the model's own state dict will do).
    Under DeepSpeed they are its fp32 master weights, whatever the ZeRO stage."""
    if is_deepspeed(acc):
        return zero.trainable_state(model)
    return trainable_state(final) if sharded else None
