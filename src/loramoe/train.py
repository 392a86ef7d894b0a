"""`loramoe train`: fine-tune a causal LM with LoRAMoE + LBC (or plain LoRA / full fine-tuning for comparison)
on instruction files, with exact resume, on one process or many (accelerate: DDP, FSDP, DeepSpeed).

Python API::

    from loramoe.train import TrainConfig, train
    result = train(TrainConfig(model="smollm2", data=["a.jsonl", ("b.jsonl", 2.0)], output_dir="runs/x"))

Data order is a pure function of the seed and the step: the sample stream is the concatenation of one seeded
permutation per epoch, and optimizer step t on rank p reads a fixed slice of it. That is what makes resuming
exact (no sampler state to save) and makes N processes x batch b equal to 1 process x batch b x N accumulation.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from .data import DataError, InstructionCollator, InstructionDataset, load_instruction_data

METHODS = ("loramoe", "lora", "full")
SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}
CHECKPOINT_PREFIX = "checkpoint-"
# Settings that fix what a checkpoint's step means; resuming with other values would not continue the same run.
RESUME_INVARIANTS = (
    "method", "data", "data_split", "seed", "max_seq_len", "grad_accum", "num_experts", "r", "knowledge_experts",
    "target_modules",
)  # fmt: skip


@dataclass
class TrainConfig:
    """Everything a training run needs. Field names are the YAML keys; CLI flags are the same with dashes."""

    model: str = field(default="smollm2", metadata={"help": "base model: HF directory, .gguf file, or 'smollm2'"})
    data: list[Any] = field(default_factory=list, metadata={
        "help": "training data, PATH or PATH:WEIGHT: JSON (lines), a save_to_disk folder, .parquet, .arrow, a Hub id"})
    data_split: str | None = field(default=None, metadata={
        "help": "split of the DatasetDict folders / Hub ids in --data (None: 'train')"})
    output_dir: str = field(default="runs/loramoe", metadata={"help": "where adapters, checkpoints, metrics go"})
    method: str = field(default="loramoe", metadata={"help": "loramoe | lora (rank N*r) | full"})
    # LoRAMoE and its LBC (see LoraMoeConfig); `lora` uses r * num_experts, lora_alpha, lora_dropout
    num_experts: int = field(default=6, metadata={"help": "N, experts per adapted linear"})
    r: int = field(default=4, metadata={"help": "rank of each expert"})
    lora_alpha: float = field(default=32.0, metadata={"help": "scale numerator (branch scale alpha / r)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "dropout on the adapter branch"})
    target_modules: list[str] | None = field(default=None, metadata={"help": "module suffixes (default: FFN)"})
    knowledge_experts: int | None = field(default=None, metadata={"help": "K, knowledge experts (default N//2)"})
    blc_alpha: float = field(default=0.1, metadata={"help": "LBC delta"})
    blc_weight: float = field(default=0.1, metadata={"help": "LBC beta (0 turns the LBC off)"})
    blc_mode: str = field(default="own_group", metadata={"help": "own_group | reference"})
    blc_count_padding: bool = field(default=False, metadata={"help": "count padding in LBC (reference code)"})
    # data
    task_type_names: dict[str, int] = field(default_factory=dict, metadata={"help": "NAME=TYPE, e.g. cbqa=1 nli=0"})
    max_seq_len: int = field(default=1024, metadata={"help": "truncate samples to this many tokens"})
    skip_bad: bool = field(default=False, metadata={"help": "skip bad records (reported) instead of failing"})
    eval_file: str | None = field(default=None, metadata={"help": "held-out instruction data for eval loss (as --data)"})
    eval_split: str | None = field(default=None, metadata={
        "help": "split of --eval-file when it is a DatasetDict folder or Hub id (needed when it has several)"})
    # optimisation
    lr: float = field(default=2e-4, metadata={"help": "peak learning rate (AdamW)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (matrices only)"})
    warmup_ratio: float = field(default=0.03, metadata={"help": "share of steps for linear warm-up"})
    scheduler: str = field(default="cosine", metadata={"help": "cosine | linear | constant (after warm-up)"})
    batch_size: int = field(default=8, metadata={"help": "samples per micro-batch per process"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping (0 = off)"})
    max_steps: int | None = field(default=None, metadata={"help": "optimizer steps (overrides epochs)"})
    epochs: float = field(default=1.0, metadata={"help": "passes over the (weighted) data"})
    seed: int = field(default=42, metadata={"help": "seed for adapter init, data order and dropout"})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast (weights stay fp32)"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations (non-reentrant)"})
    fsdp: bool = field(default=False, metadata={"help": "shard with torch FSDP2 (per decoder block); multi-process"})
    # bookkeeping
    save_every: int = field(default=0, metadata={"help": "checkpoint every k steps (0 = only the final save)"})
    keep_last: int = field(default=2, metadata={"help": "checkpoints to keep"})
    eval_every: int = field(default=0, metadata={"help": "eval every k steps (0 = only at the end)"})
    eval_batch_size: int | None = field(default=None, metadata={"help": "eval micro-batch (default batch_size)"})
    log_every: int = field(default=1, metadata={"help": "write metrics every k steps"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})
    resume: bool = field(default=False, metadata={"help": "continue from the latest checkpoint in output_dir"})
    overwrite: bool = field(default=False, metadata={"help": "discard an earlier run in output_dir"})

    def __post_init__(self) -> None:
        self.data = list(self.data) if isinstance(self.data, (list, tuple)) else [self.data]
        checks = [
            (self.method in METHODS, "method", f"one of {METHODS}"),
            (self.scheduler in SCHEDULERS, "scheduler", f"one of {tuple(SCHEDULERS)}"),
            (self.blc_mode in ("own_group", "reference"), "blc_mode", "'own_group' or 'reference'"),
            (self.batch_size >= 1, "batch_size", "an integer >= 1"),
            (self.grad_accum >= 1, "grad_accum", "an integer >= 1"),
            (self.max_steps is None or self.max_steps >= 1, "max_steps", "an integer >= 1 or None"),
            (self.epochs > 0, "epochs", "a number > 0"),
            (self.lr > 0, "lr", "a number > 0"),
            (0 <= self.warmup_ratio < 1, "warmup_ratio", "a number in [0, 1)"),
            (self.max_seq_len >= 2, "max_seq_len", "an integer >= 2"),
            (self.save_every >= 0, "save_every", "an integer >= 0"),
            (self.keep_last >= 1, "keep_last", "an integer >= 1"),
            (self.eval_every >= 0, "eval_every", "an integer >= 0"),
            (self.log_every >= 1, "log_every", "an integer >= 1"),
            (self.max_grad_norm >= 0, "max_grad_norm", "a number >= 0"),
        ]
        for ok, key, expected in checks:
            if not ok:
                raise ValueError(f"TrainConfig.{key}={getattr(self, key)!r} is invalid: expected {expected}.")

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        """Fields from a YAML mapping, then ``overrides`` (e.g. CLI flags) on top."""
        with open(path, encoding="utf-8") as f:
            values = yaml.safe_load(f) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping of TrainConfig fields, got {type(values).__name__}.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {unknown}; valid keys: {sorted(known)}.")
        return cls(**{**values, **overrides})

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))


@dataclass
class TrainResult:
    output_dir: Path
    steps: int  # optimizer steps completed (in total, including those before a resume)
    train_seconds: float  # wall time of the training steps in this process (no eval, no saving)
    tokens_per_s: float  # real (non-padding) tokens of all processes per training second
    metrics: dict[str, float]  # last lm_loss, blc_loss, loss, lr, eval_loss (when evaluated)
    trainable_params: int
    total_params: int
    model: nn.Module  # the trained model (PeftModel for loramoe/lora), unwrapped
    tokenizer: Any
    resumed_from: int | None = None  # step of the checkpoint this run continued from


class NonFiniteLossError(RuntimeError):
    """Training hit a NaN/inf loss or gradient; the last good checkpoint is left untouched."""


# ---- model -----------------------------------------------------------------------------------------------------


def prepare_model(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """Wrap a base model for ``cfg.method`` (a model that already is a PeftModel is used as it is)."""
    import peft

    from .config import LoraMoeConfig
    from .model import default_target_modules

    if isinstance(model, peft.PeftModel):
        return model
    targets = cfg.target_modules or sorted(default_target_modules(model))  # `lora` adapts the same modules
    if cfg.method == "loramoe":
        config = LoraMoeConfig(
            num_experts=cfg.num_experts,
            r=cfg.r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=list(targets),
            knowledge_experts=cfg.knowledge_experts,
            blc_alpha=cfg.blc_alpha,
            blc_weight=cfg.blc_weight,
            blc_mode=cfg.blc_mode,
            blc_count_padding=cfg.blc_count_padding,
        )
    elif cfg.method == "lora":  # same total rank, same alpha: scale alpha/(N r) = LoRAMoE's at uniform routing
        config = peft.LoraConfig(
            r=cfg.num_experts * cfg.r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=list(targets),
            task_type="CAUSAL_LM",
        )
    else:
        return model.requires_grad_(True)
    wrapped = peft.get_peft_model(model, config)
    wrapped.peft_config["default"].base_model_name_or_path = cfg.model
    return wrapped


# ---- data order ------------------------------------------------------------------------------------------------


class SampleStream:
    """Index ``i`` of an endless stream made of one seeded permutation of the dataset per epoch."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed = size, seed
        self._perms: dict[int, list[int]] = {}

    def __getitem__(self, i: int) -> int:
        epoch, offset = divmod(i, self.size)
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()}
        return self._perms[epoch][offset]

    def micro_batch(self, step: int, micro: int, cfg: TrainConfig, rank: int, world: int) -> list[int]:
        """Dataset indices of micro-batch ``micro`` of optimizer ``step`` on ``rank``."""
        global_micro = step * cfg.grad_accum + micro
        start = (global_micro * world + rank) * cfg.batch_size
        return [self[i] for i in range(start, start + cfg.batch_size)]


# ---- checkpoints -----------------------------------------------------------------------------------------------


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (renamed into place), oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX) :]))


def _full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 shard (a collective: every rank must call it), or ``t`` itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters as full CPU tensors, keyed like ``model.state_dict()``."""
    return {n: _full(p.detach()).to("cpu", copy=True).contiguous() for n, p in model.named_parameters() if p.requires_grad}


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


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    """Writes ``output_dir/checkpoints/checkpoint-<step>`` atomically: rank 0 writes everything (the other ranks
    send it their RNG states and, under FSDP, their shards) into a temporary directory, renames it into place and
    keeps the last ``keep_last``."""

    def __init__(self, accelerator: Any, output_dir: Path, keep_last: int, sharded: bool) -> None:
        self.acc, self.root, self.keep_last, self.sharded = accelerator, output_dir / "checkpoints", keep_last, sharded

    def save(self, step: int, model: nn.Module, optimizer: Any, scheduler: Any, state: dict[str, Any]) -> Path:
        from accelerate.utils import gather_object
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        acc = self.acc
        final = self.root / f"{CHECKPOINT_PREFIX}{step}"
        rng_states = gather_object([_rng_state()])  # one per process, in rank order
        unwrapped = acc.unwrap_model(model)
        weights = _trainable_state(unwrapped) if self.sharded or acc.is_main_process else None
        # keyed by parameter name, gathered to rank 0 under FSDP: loadable whatever the sharding
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        optim_state = get_optimizer_state_dict(model, _raw(optimizer), options=options)
        if acc.is_main_process:
            from safetensors.torch import save_file

            tmp = self.root / f".tmp-{CHECKPOINT_PREFIX}{step}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            save_file(weights, str(tmp / "trainable.safetensors"))
            torch.save(optim_state, tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            for rank, rng in enumerate(rng_states):
                torch.save(rng, tmp / f"rng_state_{rank}.pt")
            _write_json(tmp / "trainer_state.json", state)
            if hasattr(unwrapped, "peft_config"):  # a ready-to-load adapter, for evaluating checkpoints
                _save_model(unwrapped, tmp / "adapter", weights)
            _fsync_dir(tmp)
            os.replace(tmp, final)
            for old in checkpoint_dirs(self.root.parent)[: -self.keep_last]:
                shutil.rmtree(old)
        acc.wait_for_everyone()
        return final

    def load(self, path: Path, model: nn.Module, optimizer: Any, scheduler: Any) -> dict[str, Any]:
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        acc = self.acc
        weights = load_file(str(path / "trainable.safetensors"))
        params = dict(acc.unwrap_model(model).named_parameters())
        expected = {n for n, p in params.items() if p.requires_grad}
        if set(weights) != expected:
            missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
            raise ValueError(f"{path}: checkpoint does not match the model (missing {missing[:3]}, unexpected {extra[:3]}).")
        with torch.no_grad():
            for name, tensor in weights.items():
                param = params[name]
                if hasattr(param, "device_mesh"):  # an FSDP2 shard: keep this rank's slice
                    from torch.distributed.tensor import distribute_tensor

                    tensor = distribute_tensor(tensor.to(param.device), param.device_mesh, param.placements)
                param.copy_(tensor)
        optim_state = torch.load(path / "optimizer.pt", weights_only=True)
        set_optimizer_state_dict(model, _raw(optimizer), optim_state, options=StateDictOptions(full_state_dict=True))
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
        rng_file = path / f"rng_state_{acc.process_index}.pt"
        if rng_file.exists():
            _set_rng_state(torch.load(rng_file, weights_only=True))
        else:
            acc.print(f"warning: {rng_file} missing (different process count?): dropout will not replay exactly")
        return json.loads((path / "trainer_state.json").read_text())


def _raw(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


def _fsync_dir(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


# ---- the loop --------------------------------------------------------------------------------------------------


def _prepare_output_dir(cfg: TrainConfig, out: Path, is_main: bool) -> None:
    earlier = checkpoint_dirs(out) or (out / "metrics.jsonl").exists()
    if earlier and not (cfg.resume or cfg.overwrite):
        raise FileExistsError(
            f"{out} already holds a training run; pass --resume to continue it, --overwrite to discard it, "
            "or choose another --output-dir."
        )
    if is_main:
        if cfg.overwrite and not cfg.resume:
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
            (out / "metrics.jsonl").unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from (the killed run got further than it)."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(ln + "\n" for ln in lines))
    os.replace(tmp, path)


def _evaluate(model: nn.Module, data: InstructionDataset, collate: InstructionCollator, cfg: TrainConfig, acc: Any) -> dict:
    """Token-weighted LM loss over the eval file (sharded over processes), and the mean LBC for loramoe.

    Every rank runs the same number of forwards (FSDP gathers parameters inside them); a rank that has run out
    of samples repeats one and does not count it."""
    was_training = model.training
    model.eval()
    size = cfg.eval_batch_size or cfg.batch_size
    mine = list(range(acc.process_index, len(data), acc.num_processes))
    rounds = math.ceil(math.ceil(len(data) / acc.num_processes) / size)
    sums = torch.zeros(4, dtype=torch.float64, device=acc.device)  # token-summed CE, tokens, summed LBC, batches
    with torch.no_grad():
        for i in range(rounds):
            chunk = mine[i * size : (i + 1) * size]
            counted = float(bool(chunk))
            batch = {k: v.to(acc.device) for k, v in collate([data[j] for j in chunk or [0]]).items()}
            tokens = (batch["labels"][:, 1:] != -100).sum()
            with acc.autocast():
                out = model(**_model_inputs(batch, cfg), num_items_in_batch=tokens)
            sums += counted * torch.stack([_lm_loss(out).double() * tokens, tokens.double(), _blc_loss(out).double(),
                                           torch.ones((), dtype=torch.float64, device=acc.device)])  # fmt: skip
    sums = acc.reduce(sums, reduction="sum")
    model.train(was_training)
    metrics = {"eval_loss": (sums[0] / sums[1]).item()}
    if cfg.method == "loramoe":
        metrics["eval_blc_loss"] = (sums[2] / sums[3]).item()
    return metrics


def _save_model(model: Any, path: Path, weights: dict[str, torch.Tensor]) -> None:
    """``save_pretrained`` with the trainable tensors only. An adapter never resizes the vocabulary, so PEFT
    is told not to look for the base model's config to check that: for a base named by a Hub id (or our
    ``smollm2`` shorthand) its "auto" check is a network request."""
    if hasattr(model, "peft_config"):
        model.save_pretrained(path, state_dict=weights, save_embedding_layers=False)
    else:
        model.save_pretrained(path, state_dict=weights)


def _model_inputs(batch: dict[str, torch.Tensor], cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """Only LoRAMoE takes task types (plain LoRA and full models would not know the keyword)."""
    return batch if cfg.method == "loramoe" else {k: v for k, v in batch.items() if k != "task_types"}


def _lm_loss(out: Any) -> torch.Tensor:
    return out["lm_loss"] if "lm_loss" in out else out["loss"]


def _blc_loss(out: Any) -> torch.Tensor:
    return out["blc_loss"].detach() if "blc_loss" in out else torch.zeros((), device=out["loss"].device)


def _forward_backward(
    model: nn.Module, batches: list[dict[str, torch.Tensor]], params: list[nn.Parameter], cfg: TrainConfig, acc: Any
) -> tuple[float, float, float, int]:
    """Accumulate (and clip) the gradient of one optimizer step; return (lm_loss, blc_loss, grad_norm before
    clipping, real tokens), all processes together.

    LM loss = CE summed over the step's target tokens of all processes / their number: each micro-batch divides
    by that count (times the process count, undoing DDP's / FSDP's mean), so accumulation and the number of
    processes change nothing. The LBC is per micro-batch, averaged."""
    world = acc.num_processes
    local = torch.stack([(b["labels"][:, 1:] != -100).sum() for b in batches]).sum()
    global_tokens = acc.reduce(local.clone(), reduction="sum")
    num_items = global_tokens.double() / (world * cfg.grad_accum)
    sums = torch.zeros(3, dtype=torch.float64, device=acc.device)  # CE sum, LBC sum, real tokens
    for m, batch in enumerate(batches):
        last = m == cfg.grad_accum - 1
        if cfg.fsdp:
            model.set_requires_gradient_sync(last)
        with contextlib.nullcontext() if last or cfg.fsdp else acc.no_sync(model):
            with acc.autocast():
                outputs = model(**_model_inputs(batch, cfg), num_items_in_batch=num_items)
            acc.backward(outputs["loss"] / cfg.grad_accum)
        lm = _lm_loss(outputs).detach().double() * num_items
        sums += torch.stack([lm, _blc_loss(outputs).double(), batch["attention_mask"].sum().double()])
    grad_norm = acc.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))  # inf: measure, do not clip
    sums = acc.reduce(sums, reduction="sum")
    lm_loss = (sums[0] / global_tokens).item()
    blc_loss = (sums[1] / (world * cfg.grad_accum)).item()
    return lm_loss, blc_loss, float(_full(grad_norm)), int(sums[2])


def _distributed_without_accelerator() -> bool:
    """torchrun on a machine without GPUs: accelerate only sets up (gloo) multi-CPU training when told ``cpu``."""
    has_device = getattr(torch, "accelerator", None) and torch.accelerator.is_available()
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not has_device


def _final_weights(acc: Any, model: nn.Module, final: nn.Module, sharded: bool) -> dict[str, torch.Tensor] | None:
    """Trainable weights to save, gathered where they are sharded (``None``: the model's own state dict will do)."""
    from accelerate.utils import DistributedType

    if acc.distributed_type == DistributedType.DEEPSPEED:  # untested; accelerate gathers ZeRO-3 partitions
        full = acc.get_state_dict(model)
        names = {n for n, p in final.named_parameters() if p.requires_grad}
        return {k: v for k, v in full.items() if k in names} if full else None
    return _trainable_state(final) if sharded else None


def _check_engine(cfg: TrainConfig, acc: Any) -> bool:
    """Refuse engine combinations that cannot work; return whether parameters will be sharded (saving must then
    gather them on every rank)."""
    from accelerate.utils import DistributedType

    if acc.distributed_type == DistributedType.DEEPSPEED:  # untested: DeepSpeed cannot run on this project's CI
        if cfg.grad_accum != 1:
            raise ValueError("With DeepSpeed use --grad-accum 1: the DeepSpeed engine applies its own loss scaling.")
        if acc.state.deepspeed_plugin.zero_stage == 3 and cfg.save_every:
            raise ValueError("Checkpoints (--save-every) are not supported under DeepSpeed ZeRO-3; use ZeRO-2 or --fsdp.")
        acc.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = cfg.batch_size
    if cfg.fsdp and acc.num_processes < 2:
        raise ValueError("--fsdp shards over processes: launch with torchrun --nproc_per_node N (N >= 2).")
    if cfg.fsdp and acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise ValueError(f"--fsdp and accelerate's {acc.distributed_type.value} plugin both shard: use one of them.")
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and acc.distributed_type != DistributedType.FSDP:
        acc.print(
            f"warning: accelerate's FSDP plugin is not applied here (accelerate runs {acc.distributed_type.value}: it "
            "enables FSDP only for GPU-like devices); training is replicated. Use --fsdp for torch FSDP2 on CPU."
        )
    return cfg.fsdp or acc.distributed_type == DistributedType.FSDP


def train(cfg: TrainConfig, model: nn.Module | None = None, tokenizer: Any = None) -> TrainResult:
    """Run (or resume) a training run; see the module docstring. ``model``/``tokenizer`` may be given in memory
    (a base model, or a ready PeftModel); then ``cfg.model`` is only recorded."""
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed

    from .loading import load_base_model, load_tokenizer

    if not cfg.data:
        raise ValueError("TrainConfig.data is empty: give at least one instruction file (--data FILE).")
    acc = Accelerator(
        cpu=_distributed_without_accelerator(),
        mixed_precision="bf16" if cfg.bf16 else "no",
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
    )
    try:
        out = Path(cfg.output_dir)
        _prepare_output_dir(cfg, out, acc.is_main_process)
        set_seed(cfg.seed)
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.model)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        load = dict(tokenizer=tokenizer, max_seq_len=cfg.max_seq_len, task_type_names=cfg.task_type_names,
                    skip_bad=cfg.skip_bad, seed=cfg.seed)  # fmt: skip
        data = load_instruction_data(cfg.data, split=cfg.data_split, **load)
        eval_data = (load_instruction_data([cfg.eval_file], split=cfg.eval_split, default_split=None, **load)
                     if cfg.eval_file else None)  # fmt: skip
        acc.print(f"data: {data.report.summary()}")
        collate = InstructionCollator(tokenizer.pad_token_id)

        model = model if model is not None else load_base_model(cfg.model)
        model = prepare_model(model, cfg)
        if cfg.gradient_checkpointing:  # non-reentrant: reentrant checkpointing would drop the LBC's gradient
            kwargs = {"use_reentrant": False}
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            model.config.use_cache = False
        model.train()
        sharded = _check_engine(cfg, acc)
        if cfg.fsdp:
            model = shard_with_fsdp(model)
        params = [p for p in model.parameters() if p.requires_grad]
        trainable = sum(p.numel() for p in params)
        total_params = sum(p.numel() for p in model.parameters())
        optimizer = torch.optim.AdamW(
            [
                {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
            ],
            lr=cfg.lr,
        )
        world = acc.num_processes
        per_step = cfg.batch_size * cfg.grad_accum * world
        total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(data) / per_step))
        from transformers import get_scheduler

        scheduler = get_scheduler(SCHEDULERS[cfg.scheduler], optimizer, round(cfg.warmup_ratio * total_steps), total_steps)
        if not cfg.fsdp:  # our own FSDP2 sharding is done; accelerate wraps for DDP / its FSDP / DeepSpeed
            model, optimizer = acc.prepare(model, optimizer)
        stream = SampleStream(len(data), cfg.seed)
        ckpt = Checkpointer(acc, out, cfg.keep_last, sharded)
        invariants = {k: v for k, v in cfg.to_dict().items() if k in RESUME_INVARIANTS}
        invariants["global_micro_batch"] = cfg.batch_size * world

        start_step, resumed_from, tokens_seen = 0, None, 0
        if cfg.resume and checkpoint_dirs(out):
            path = checkpoint_dirs(out)[-1]
            state = ckpt.load(path, model, optimizer, scheduler)
            changed = {k: (state["invariants"].get(k), v) for k, v in invariants.items() if state["invariants"].get(k) != v}
            if changed:
                raise ValueError(f"cannot resume {path}: settings changed since it was written (saved, now): {changed}")
            start_step = resumed_from = state["step"]
            tokens_seen = state["tokens_seen"]
            if acc.is_main_process:
                _truncate_metrics(out / "metrics.jsonl", start_step)
            acc.print(f"resumed from {path} (step {start_step} of {total_steps})")
        elif cfg.resume:
            acc.print(f"--resume: no checkpoint in {out / 'checkpoints'}, starting from step 0")
        if acc.is_main_process:
            _write_json(out / "data_report.json", data.report.to_dict())
            (out / "train_config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        acc.print(
            f"training {cfg.method}: {trainable:,} trainable of {total_params:,} parameters; {total_steps} steps x "
            f"{per_step} samples ({world} process(es) x {cfg.batch_size} x {cfg.grad_accum} accumulation)"
        )

        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=start_step, disable=not (cfg.progress and acc.is_main_process),
                   desc=f"loramoe train ({cfg.method})", dynamic_ncols=True)  # fmt: skip
        metrics: dict[str, float] = {}
        last_eval: dict[str, float] = {}
        train_seconds, run_tokens = 0.0, 0
        metrics_log = out / "metrics.jsonl"
        for step in range(start_step, total_steps):
            t0 = time.perf_counter()
            batches = [
                {k: v.to(acc.device) for k, v in collate([data[i] for i in stream.micro_batch(step, m, cfg, acc.process_index, world)]).items()}
                for m in range(cfg.grad_accum)
            ]
            lm_loss, blc_loss, norm, step_tokens = _forward_backward(model, batches, params, cfg, acc)
            if not all(math.isfinite(x) for x in (lm_loss, blc_loss, norm)):
                good = checkpoint_dirs(out)
                message = (
                    f"non-finite loss at step {step + 1}: lm_loss={lm_loss}, blc_loss={blc_loss}, grad_norm={norm}. "
                    f"Training stopped without applying this step; last good checkpoint: "
                    f"{good[-1] if good else 'none written yet'}. Lower --lr, check the data or --bf16, then --resume."
                )
                if acc.is_main_process:
                    with open(metrics_log, "a") as f:
                        f.write(json.dumps({"step": step + 1, "event": "non_finite_loss", "message": message}) + "\n")
                raise NonFiniteLossError(message)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - t0
            train_seconds += elapsed
            run_tokens += step_tokens
            tokens_seen += step_tokens
            lr = scheduler.get_last_lr()[0]
            metrics = {"lm_loss": lm_loss, "loss": lm_loss}
            if cfg.method == "loramoe":
                metrics.update(blc_loss=blc_loss, loss=lm_loss + cfg.blc_weight * blc_loss)
            done = step + 1
            record = {
                "step": done, "epoch": done * per_step / len(data), **metrics, "lr": lr, "grad_norm": norm,
                "tokens": tokens_seen, "tokens_per_s": run_tokens / train_seconds, "step_seconds": elapsed,
            }  # fmt: skip
            bar.update(1)
            shown = {"lm": f"{lm_loss:.3f}", **({"lbc": f"{blc_loss:.4f}"} if cfg.method == "loramoe" else {})}
            bar.set_postfix(**shown, lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
            evaluate = eval_data is not None and ((cfg.eval_every and done % cfg.eval_every == 0) or done == total_steps)
            if evaluate:
                last_eval = _evaluate(acc.unwrap_model(model), eval_data, collate, cfg, acc)
                record.update(last_eval)
            if acc.is_main_process and (done % cfg.log_every == 0 or done == total_steps or evaluate):
                with open(metrics_log, "a") as f:
                    f.write(json.dumps(record) + "\n")
            if cfg.save_every and done % cfg.save_every == 0 and done < total_steps:
                state = {"step": done, "total_steps": total_steps, "tokens_seen": tokens_seen, "invariants": invariants}
                ckpt.save(done, model, optimizer, scheduler, state)
        bar.close()

        final = acc.unwrap_model(model)
        weights = _final_weights(acc, model, final, sharded)
        if acc.is_main_process:
            _save_model(final, out, weights)  # adapter_model.safetensors (+ config) or the full model
            tokenizer.save_pretrained(out)
        acc.wait_for_everyone()
        tokens_per_s = run_tokens / train_seconds if train_seconds else 0.0
        result = TrainResult(
            output_dir=out, steps=total_steps, train_seconds=train_seconds, tokens_per_s=tokens_per_s,
            metrics={**metrics, "lr": scheduler.get_last_lr()[0], **last_eval}, trainable_params=trainable,
            total_params=total_params, model=final, tokenizer=tokenizer, resumed_from=resumed_from,
        )  # fmt: skip
        if acc.is_main_process:
            summary = {f.name: getattr(result, f.name) for f in dataclasses.fields(result) if f.name not in ("model", "tokenizer")}
            _write_json(out / "train_result.json", summary)
        acc.print(f"saved to {out}: {'adapter' if cfg.method != 'full' else 'model'}, metrics.jsonl, train_result.json")
        return result
    finally:
        # Accelerator settings are process-wide; let a later train() in this process choose its own precision.
        AcceleratorState._reset_state()


# ---- command line ----------------------------------------------------------------------------------------------


def _kv_task_type(text: str) -> tuple[str, int]:
    name, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected NAME=TYPE (e.g. cbqa=1), got {text!r}")
    return name, int(value)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (``--num-experts``), plus ``--config FILE.yaml``; flags override the file."""
    parser.add_argument("--config", help="YAML file with TrainConfig fields (flags given here override it)")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        # `--lora-r` as well as `--r`: torchrun's own parser rejects `--r` as an ambiguous abbreviation.
        flags = ["--r", "--lora-r"] if f.name == "r" else ["--" + f.name.replace("_", "-")]
        kind = hints[f.name]
        help_text = f.metadata.get("help", "")
        if f.default is not dataclasses.MISSING:
            help_text += f" (default: {f.default})"
        common = {"help": help_text, "default": argparse.SUPPRESS, "dest": f.name}
        if kind is bool:
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, **common)
        elif f.name == "task_type_names":
            parser.add_argument(*flags, nargs="+", type=_kv_task_type, metavar="NAME=TYPE", **common)
        elif f.name in ("data", "target_modules"):
            parser.add_argument(*flags, nargs="+", metavar="PATH[:WEIGHT]" if f.name == "data" else "NAME", **common)
        else:
            base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
            choices = {"method": METHODS, "scheduler": tuple(SCHEDULERS), "blc_mode": ("own_group", "reference")}
            parser.add_argument(*flags, type=base, choices=choices.get(f.name), **common)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    given = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    if "task_type_names" in given:
        given["task_type_names"] = dict(given["task_type_names"])
    return TrainConfig.from_yaml(args.config, **given) if args.config else TrainConfig(**given)


def run(args: argparse.Namespace) -> int:
    try:
        result = train(config_from_args(args))
    except (DataError, NonFiniteLossError, FileExistsError, ValueError) as e:
        print(f"loramoe train: error: {e}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    print(json.dumps({"output_dir": str(result.output_dir), "steps": result.steps, **result.metrics,
                      "tokens_per_s": round(result.tokens_per_s, 1)}))  # fmt: skip
    return 0
