"""`loramoe train`: fine-tune a causal LM with LoRAMoE + LBC (or plain LoRA / full fine-tuning for comparison)
on instruction files, with exact resume, on one process or many (accelerate: DDP, FSDP, DeepSpeed).

Python API::

    from loramoe.train import TrainConfig, train
    result = train(TrainConfig(model="smollm2", data=["a.jsonl", ("b.jsonl", 2.0)], output_dir="runs/x"))

Data order is a pure function of the seed and the step: the sample stream is the concatenation of one seeded
permutation per epoch, and optimizer step t on rank p reads a fixed slice of it. That is what makes resuming
exact (no sampler state to save) and makes N processes x batch b equal to 1 process x batch b x N accumulation.
The learning rate is one too (of the schedule settings and the step), so a resume applies the settings given now:

- settings in `RESUME_INVARIANTS` (and the training samples themselves) fix what a checkpoint's step means; a
  resume with any of them changed is refused, listing each;
- every other setting (lr, weight decay, schedule, warm-up, max_steps / epochs, LBC weight, clipping, saving,
  evaluation...) applies from the resume step on: step t then runs as it would in a run started with the new
  settings; what changed is printed and logged as a ``resume`` event in metrics.jsonl.

Checkpoints, and which one is "known good", are `loramoe.checkpoint`'s; the output folder rule is
`loramoe.outputs`'s.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import re
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from . import engines
from .checkpoint import (
    Checkpointer,
    StabilityWatch,
    checkpoint_dirs,
    checkpoint_step,
    newest_known_good,
    save_model,
)
from .data import (
    FINGERPRINT_VERSION,
    InstructionCollator,
    InstructionDataset,
    check_task_type_names,
    default_cache_dir,
    load_instruction_data,
)
from .errors import RunStopped, out_of_space
from .loading import model_folder
from .outputs import OutputDir, write_json, write_text
from .packing import PackingCollator, check_packing_supported, real_tokens
from .quantization import COMPUTE_DTYPES, QUANTIZE, prepare_for_training
from .quantization import check_options as check_quantization

METHODS = ("loramoe", "lora", "full")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}
# Settings that fix what a checkpoint's step means (with the training samples' fingerprint, the batch layout
# and the adapter's shape and scale); resuming with other values would not continue the same run.
RESUME_INVARIANTS = (
    "method", "data", "data_split", "seed", "max_seq_len", "grad_accum", "num_experts", "r", "lora_alpha",
    "knowledge_experts", "target_modules", "quantize", "bnb_compute_dtype",
)  # fmt: skip
# How to run, not what to train: never compared on resume.
RUN_CONTROLS = ("resume", "overwrite", "progress", "cache_dir", "num_proc")


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
    max_seq_len: int = field(default=1024, metadata={"help": "longest sample, in tokens"})
    packing: bool = field(default=False, metadata={"help": "pack each micro-batch's samples into rows of up to "
                          "max_seq_len tokens (attention and LBC stay per sample; same result as padding)"})  # fmt: skip
    fit_prompt: bool = field(default=True, metadata={"help": "cut an over-long prompt in its middle so the "
                             "response fits (--no-fit-prompt: cut the sample's end and refuse a record whose "
                             "response is cut away entirely)"})  # fmt: skip
    skip_bad: bool = field(default=False, metadata={"help": "skip bad records (reported) instead of failing"})
    cache_dir: str | None = field(default=None, metadata={"help": "token cache folder (None: $LORAMOE_CACHE, "
                                  "else $XDG_CACHE_HOME/loramoe/data, else ~/.cache/loramoe/data)"})  # fmt: skip
    num_proc: int = field(default=1, metadata={"help": "worker processes that tokenise data not yet in the cache"})
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
    dtype: str = field(default="float32", metadata={"help": "dtype of the frozen base's weights (adapters and "
                       "optimizer states stay fp32; the experts compute in the base's dtype)"})  # fmt: skip
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute activations (non-reentrant)"})
    compile: bool = field(default=False, metadata={
        "help": "torch.compile the model's forward and backward (the first steps, and the first of each new "
                "sequence length, wait for compilation)"})  # fmt: skip
    fsdp: bool = field(default=False, metadata={"help": "shard with torch FSDP2 (per decoder block); multi-process"})
    deepspeed: str | None = field(default=None, metadata={
        "help": "DeepSpeed ZeRO-2/3 config JSON (e.g. examples/deepspeed/zero2.json); launch with torchrun"})
    quantize: str | None = field(default=None, metadata={"help": "frozen base in nf4 | fp4 | int8 (bitsandbytes, QLoRA)"})
    bnb_compute_dtype: str | None = field(default=None, metadata={"help": "dtype of 4-bit matmuls (default: float32)"})
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
        for f in dataclasses.fields(self):
            expected = _expected_type(f.name, getattr(self, f.name))
            if expected:
                raise ConfigError(f.name, getattr(self, f.name), expected)
        checks = [
            (self.method in METHODS, "method", f"one of {METHODS}"),
            (self.scheduler in SCHEDULERS, "scheduler", f"one of {tuple(SCHEDULERS)}"),
            (self.blc_mode in ("own_group", "reference"), "blc_mode", "'own_group' or 'reference'"),
            (self.batch_size >= 1, "batch_size", "an integer >= 1"),
            (self.grad_accum >= 1, "grad_accum", "an integer >= 1"),
            (self.max_steps is None or self.max_steps >= 1, "max_steps", "an integer >= 1 or None"),
            (math.isfinite(self.epochs) and self.epochs > 0, "epochs", "a finite number > 0"),
            (math.isfinite(self.lr) and self.lr > 0, "lr", "a finite number > 0"),
            (0 <= self.warmup_ratio < 1, "warmup_ratio", "a number in [0, 1)"),
            (self.max_seq_len >= 2, "max_seq_len", "an integer >= 2"),
            (self.num_proc >= 1, "num_proc", "an integer >= 1"),
            (self.save_every >= 0, "save_every", "an integer >= 0"),
            (self.keep_last >= 1, "keep_last", "an integer >= 1"),
            (self.eval_every >= 0, "eval_every", "an integer >= 0"),
            (self.log_every >= 1, "log_every", "an integer >= 1"),
            (self.max_grad_norm >= 0, "max_grad_norm", "a number >= 0"),
            (self.dtype in DTYPES, "dtype", f"one of {tuple(DTYPES)}"),
        ]
        for ok, key, expected in checks:
            if not ok:
                raise ConfigError(key, getattr(self, key), expected)
        check_task_type_names(self.task_type_names)
        check_quantization(self.quantize, self.bnb_compute_dtype)
        if self.compile and (self.fsdp or self.deepspeed):
            raise ValueError(f"compile: not supported with {'--fsdp' if self.fsdp else '--deepspeed'} (expected one "
                             "of them; torch.compile of a sharded model is untested here)")
        if self.quantize and (self.method == "full" or self.fsdp or self.deepspeed):
            other = "--fsdp" if self.fsdp else "--deepspeed" if self.deepspeed else "method full"
            raise ValueError(f"quantize: {self.quantize!r} with {other} (expected method loramoe or lora without "
                             "--fsdp or --deepspeed: a quantized base is frozen and not sharded here)")
        if self.fsdp and self.deepspeed:
            raise ValueError("fsdp: --fsdp and --deepspeed both shard (expected one of them)")
        if self.packing and self.blc_count_padding:
            raise ValueError("packing: set together with blc_count_padding (expected one of them: the reference "
                             "formula counts each sample's padding positions, which a packed row does not have)")
        self._check_dtype()

    def _check_dtype(self) -> None:
        if self.dtype == "float32":
            return
        if self.method == "full":
            raise ValueError(f"dtype: {self.dtype!r} with method full (expected float32: full fine-tuning updates the "
                             "base's own weights, and AdamW steps on half-precision weights round small updates "
                             "away; use --bf16 autocast)")  # fmt: skip
        if self.quantize:
            raise ValueError(f"dtype: {self.dtype!r} with quantize {self.quantize!r} (expected float32: a quantized "
                             "base keeps its unquantized parts in fp32; set the 4-bit matmuls' precision with "
                             "--bnb-compute-dtype)")  # fmt: skip
        if self.deepspeed:
            raise ValueError(f"dtype: {self.dtype!r} with --deepspeed (expected float32: DeepSpeed sets the weights' "
                             "dtype itself, ZeRO-3 already while the model loads; --bf16 gives bf16 weights with fp32 "
                             "master copies of the trained ones)")  # fmt: skip
        if self.dtype == "float16" and self.bf16:
            raise ValueError("dtype: 'float16' with --bf16 (expected one of them: bf16 autocast would run a float16 "
                             "base in bfloat16)")

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        """Fields from a YAML mapping, then ``overrides`` (e.g. CLI flags) on top. A number is read as users write
        it (``lr: 5e-3`` is 5e-3, though YAML 1.1 makes it a string); a wrong value names the file and key."""
        try:
            with open(path, encoding="utf-8") as f:
                values = yaml.load(f, Loader=_ConfigLoader) or {}
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}; expected a YAML file)") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            reason = " ".join(str(getattr(e, "problem", None) or e).split())
            raise ValueError(f"{where}: not valid YAML ({reason}; expected a mapping of TrainConfig fields)") from None
        if not isinstance(values, dict):
            raise ValueError(f"{path}: expected a mapping of TrainConfig fields, got {type(values).__name__}.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known, key=str)
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {unknown}; valid keys: {sorted(known)}.")
        try:
            return cls(**{**values, **overrides})
        except ConfigError as e:
            if e.key in values and e.key not in overrides:  # the file's value: name the file and its key
                raise ConfigError(e.key, e.value, e.expected, path) from None
            raise

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))


class ConfigError(ValueError):
    """A TrainConfig field with a value it cannot have; given ``path``, a value read from that YAML file."""

    def __init__(self, key: str, value: Any, expected: str, path: str | Path | None = None) -> None:
        self.key, self.value, self.expected = key, value, expected
        if path is None:
            super().__init__(f"TrainConfig.{key}={value!r} is invalid: expected {expected}.")
            return
        quoted = isinstance(value, str) and not expected.startswith(("a string", "one of", "'"))
        unquote = quoted and re.fullmatch(r"[-+]?[0-9._]+([eE][-+]?[0-9]+)?", value.strip())
        super().__init__(f"{path}: {key}: {value!r} is {'a string' if quoted else 'invalid'} (expected {expected}"
                         f"{'; write it without quotes' if unquote else ''})")  # fmt: skip


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but ``5e-3`` and ``1e-5`` are numbers (YAML 1.2): YAML 1.1, which PyYAML follows,
    reads a number without a dot as a string, and this is how learning rates are written."""


_ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                                    list("-+0123456789"))  # fmt: skip
_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number such as 5e-3", str: "a string",
               list: "a list", dict: "a mapping (NAME: VALUE)"}  # fmt: skip


@functools.cache
def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _expected_type(name: str, value: Any) -> str | None:
    """What field ``name`` takes, when ``value`` is not of that type (``None``: it is). An int is a float here,
    a bool is neither, a path is a string; ``data`` takes one spec or a list (see `loramoe.data.parse_data_spec`)."""
    hint = _field_types()[name]
    kinds = [typing.get_origin(t) or t for t in (typing.get_args(hint) if typing.get_origin(hint) in (typing.Union,
             types.UnionType) else (hint,))]  # fmt: skip
    if name == "data" or (value is None and type(None) in kinds) or Any in kinds:
        return None
    for kind in kinds:
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return None
        if kind is str and isinstance(value, os.PathLike):
            return None
        if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
            return None
    return " or ".join([_TYPE_NAMES.get(k, getattr(k, "__name__", str(k))) for k in kinds if k is not type(None)]
                       + (["null"] if type(None) in kinds else []))  # fmt: skip


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


class NonFiniteLossError(RunStopped):
    """Training hit a NaN/inf loss or gradient at ``step``; the known-good checkpoint it names is kept for
    ``--resume``."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


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
        self._perms: dict[int, torch.Tensor] = {}

    def __getitem__(self, i: int) -> int:
        epoch, offset = divmod(i, self.size)
        if epoch not in self._perms:  # a tensor, not a list: 8 bytes per sample, not a Python int each
            self._perms = {epoch: torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + epoch))}
        return int(self._perms[epoch][offset])

    def micro_batch(self, step: int, micro: int, cfg: TrainConfig, rank: int, world: int) -> list[int]:
        """Dataset indices of micro-batch ``micro`` of optimizer ``step`` on ``rank``."""
        global_micro = step * cfg.grad_accum + micro
        start = (global_micro * world + rank) * cfg.batch_size
        return [self[i] for i in range(start, start + cfg.batch_size)]


# ---- the loop --------------------------------------------------------------------------------------------------


def _check_output_dir(cfg: TrainConfig, out: Path, lock: bool) -> OutputDir:
    """Refuse an output folder that may not be written (see `loramoe.outputs`), that another run is using
    (``lock``: take it now if the folder exists, else `_open_output_dir` does) or whose run would be lost."""
    outdir = OutputDir(out, "--output-dir", {"--model": model_folder(cfg.model)}, owner="train")
    if lock and out.is_dir():
        outdir.lock("train")
    try:
        _check_earlier_run(cfg, out)
    except BaseException:
        outdir.unlock()
        raise
    return outdir


def _check_earlier_run(cfg: TrainConfig, out: Path) -> None:
    earlier = checkpoint_dirs(out) or (out / "metrics.jsonl").exists()
    if earlier and not (cfg.resume or cfg.overwrite):
        raise FileExistsError(
            f"{out}: already holds a training run (expected --resume to continue it, --overwrite to replace it, "
            "or another --output-dir)"
        )
    if cfg.resume and not cfg.overwrite and not checkpoint_dirs(out) and (out / "train_result.json").exists():
        raise FileExistsError(
            f"{out}: --resume: this run finished and kept no checkpoint to continue from; resuming would retrain "
            "it from step 0 and replace its outputs (expected --overwrite to retrain, or another --output-dir)"
        )


def _open_output_dir(outdir: OutputDir, cfg: TrainConfig, acc: Any) -> None:
    """On rank 0: create the folder and, with ``overwrite``, delete the earlier run's files (only those)."""
    acc.wait_for_everyone()  # every rank has checked its inputs before rank 0 changes anything
    if acc.is_main_process:
        outdir.create()
        if not outdir.locked:  # a new folder: taken now, and the check made before it was taken is redone
            outdir.lock("train")
            _check_earlier_run(cfg, outdir.path)
        if cfg.overwrite and not cfg.resume:
            kept = outdir.remove_owned()
            if kept:
                owners = outdir.owners()
                acc.print(f"--overwrite: kept {', '.join(f'{n} (written by loramoe {owners[n]})' for n in kept)}: "
                          "only what train wrote is replaced")  # fmt: skip
        outdir.record(["metrics.jsonl", "data_report.json", "train_config.yaml", "train_result.json", "checkpoints"])
    acc.wait_for_everyone()


def _check_step_size(cfg: TrainConfig, samples: int, acc: Any) -> None:
    """A step larger than the data repeats samples within the step. Asked for epochs, that is not what was asked
    (one step of 1000 from 32 samples is 31.25 epochs): refused. Asked for steps: done, with a warning."""
    per_step = cfg.batch_size * cfg.grad_accum * acc.num_processes
    if per_step <= samples:
        return
    what = (f"{per_step} samples a step ({acc.num_processes} process(es) x batch_size {cfg.batch_size} x grad_accum "
            f"{cfg.grad_accum}) from {samples} training samples: each step sees every sample about "
            f"{per_step / samples:.3g} times")  # fmt: skip
    if cfg.max_steps is None:
        epochs = max(1, math.ceil(cfg.epochs * samples / per_step)) * per_step / samples
        raise ValueError(f"batch_size: {what}, so the run would be {epochs:.4g} epochs, not the {cfg.epochs:g} asked "
                         f"for (expected batch_size x grad_accum x processes <= {samples}, or --max-steps to train "
                         "on repeats on purpose)")  # fmt: skip
    acc.print(f"warning: batch_size: {what} (max_steps {cfg.max_steps}: {cfg.max_steps * per_step / samples:.3g} epochs)")


def _stopped_at(metrics: Path) -> int | None:
    """After a non-finite loss: the step of the known-good checkpoint the run named (0: none), else None."""
    if not metrics.exists():
        return None
    lines = [ln for ln in metrics.read_text().splitlines() if ln.strip()]
    last = _record(lines[-1]) if lines else {}
    return last.get("resume_from_step") if last.get("event") == "non_finite_loss" else None


def _changed(saved: dict[str, Any], now: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    return {k: (saved[k], v) for k, v in now.items() if k in saved and k not in RUN_CONTROLS and saved[k] != v}


def _describe_changes(changed: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items())


def _apply_schedule(optimizer: Any, scheduler: Any, cfg: TrainConfig, step: int, decays: list[bool]) -> None:
    """Put the configured lr and weight decay into the optimizer (a loaded optimizer state brings the saved
    ones) and move the schedule to ``step``: the lr is then what a run started with these settings has there.
    ``decays``: whether each group takes weight decay (see `optimizer_groups`)."""
    groups = getattr(optimizer, "optimizer", optimizer).param_groups
    for group, decay in zip(groups, decays, strict=True):
        group["initial_lr"], group["weight_decay"] = cfg.lr, cfg.weight_decay if decay else 0.0
    scheduler.base_lrs = [cfg.lr for _ in groups]
    scheduler.last_epoch = step - 1
    scheduler.step()


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop log lines written after the checkpoint we resume from (the killed run got further than it), and a
    line cut short."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if (record := _record(ln)) and record.get("step", 0) <= step]
    write_text(path, "".join(ln + "\n" for ln in lines))


def _record(line: str) -> dict[str, Any]:
    """A line of metrics.jsonl; ``{}`` for one cut short (a write that failed, e.g. on a full disk)."""
    try:
        record = json.loads(line)
    except ValueError:
        return {}
    return record if isinstance(record, dict) else {}


def _evaluate(model: nn.Module, data: InstructionDataset, collate: InstructionCollator | PackingCollator, cfg: TrainConfig,
              acc: Any) -> dict:
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


def _model_inputs(batch: dict[str, torch.Tensor], cfg: TrainConfig) -> dict[str, torch.Tensor]:
    """Only LoRAMoE takes task types (plain LoRA and full models would not know the keyword)."""
    return batch if cfg.method == "loramoe" else {k: v for k, v in batch.items() if k not in ("task_types", "sample_index")}


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
        with engines.micro_batch(acc, model, cfg, last=m == cfg.grad_accum - 1):
            with acc.autocast():
                outputs = model(**_model_inputs(batch, cfg), num_items_in_batch=num_items)
            engines.backward(acc, model, outputs["loss"] / cfg.grad_accum)
        lm = _lm_loss(outputs).detach().double() * num_items
        sums += torch.stack([lm, _blc_loss(outputs).double(), real_tokens(batch).double()])
    sums = acc.reduce(sums, reduction="sum")
    lm_loss = (sums[0] / global_tokens).item()
    blc_loss = (sums[1] / (world * cfg.grad_accum)).item()
    grad_norm = engines.finish_step(acc, model, params, cfg.max_grad_norm, math.isfinite(lm_loss + blc_loss))
    return lm_loss, blc_loss, grad_norm, int(sums[2])


def _check_base_dtype(model: nn.Module, cfg: TrainConfig) -> None:
    """A model given in memory must be in the run's --dtype (the run would otherwise record a dtype it did not use)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    have = getattr(base, "dtype", None)  # transformers: the dtype of the first floating-point weight (embeddings)
    if not cfg.quantize and have is not None and have != DTYPES[cfg.dtype]:
        raise ValueError(f"dtype: the run says {cfg.dtype!r} but the model given is {str(have).removeprefix('torch.')} "
                         "(expected a base loaded in that dtype, or a matching --dtype)")  # fmt: skip


def compile_model(model: nn.Module, acc: Any, checkpointing: bool = False) -> None:
    """torch.compile, in place, the causal LM inside ``model`` (the PEFT wrapper's LBC bookkeeping stays eager):
    its forward, loss and backward. In place keeps parameter names, so saving and resuming do not change. The
    LoRAMoE layers compile without graph breaks (see `loramoe.layer`).

    With gradient checkpointing, dynamo would not trace a checkpointed block whose forward has a side effect, and
    each LoRAMoE layer hands its router weights to the LBC by one (appending to a list). Letting the recompute in
    backward skip it is what eager does as well: the lists are gone by then (see `LoraMoeModel.forward`)."""
    import torch._dynamo
    from accelerate.utils import DistributedType

    if acc.distributed_type == DistributedType.DEEPSPEED:
        raise ValueError("compile: not supported under DeepSpeed (expected no --compile with a DeepSpeed launch)")
    if checkpointing and hasattr(torch._dynamo.config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        torch._dynamo.config.skip_fwd_side_effects_in_bwd_under_checkpoint = True
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner.compile()


def train(cfg: TrainConfig, model: nn.Module | None = None, tokenizer: Any = None) -> TrainResult:
    """Run (or resume) a training run; see the module docstring. ``model``/``tokenizer`` may be given in memory
    (a base model, or a ready PeftModel); then ``cfg.model`` is only recorded."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed

    from .loading import load_base_model, load_tokenizer

    if not cfg.data:
        raise ValueError("TrainConfig.data is empty: give at least one instruction file (--data FILE).")
    acc = engines.make_accelerator(cfg)
    out, outdir = Path(cfg.output_dir), None
    try:
        outdir = _check_output_dir(cfg, out, lock=acc.is_main_process)
        set_seed(cfg.seed)
        tokenizer = tokenizer if tokenizer is not None else load_tokenizer(cfg.model)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        rank = f"[rank {acc.process_index}] " if acc.num_processes > 1 else ""
        load = dict(tokenizer=tokenizer, max_seq_len=cfg.max_seq_len, task_type_names=cfg.task_type_names,
                    skip_bad=cfg.skip_bad, seed=cfg.seed, fit_prompt=cfg.fit_prompt, num_proc=cfg.num_proc,
                    cache_dir=cfg.cache_dir or default_cache_dir(), log=lambda line: print(rank + line))  # fmt: skip
        data = load_instruction_data(cfg.data, split=cfg.data_split, **load)
        eval_data = (load_instruction_data([cfg.eval_file], split=cfg.eval_split, default_split=None, **load)
                     if cfg.eval_file else None)  # fmt: skip
        acc.print(f"data: {data.report.summary()}")
        if eval_data is not None:
            acc.print(f"eval data: {eval_data.report.summary()}")
        unused = sorted(set(cfg.task_type_names) - data.report.names_used
                        - (eval_data.report.names_used if eval_data else set()))  # fmt: skip
        if unused:
            raise ValueError(f"task_type_names: {unused} name(s) no record's task_type (expected names that "
                             "appear as 'task_type' in the --data or --eval-file records)")  # fmt: skip
        _check_step_size(cfg, len(data), acc)
        pad = tokenizer.pad_token_id
        collate = PackingCollator(pad, cfg.max_seq_len) if cfg.packing else InstructionCollator(pad)

        if model is None:
            model = load_base_model(cfg.model, dtype=DTYPES[cfg.dtype], quantize=cfg.quantize,
                                    bnb_compute_dtype=cfg.bnb_compute_dtype, device=acc.device if cfg.quantize else None)  # fmt: skip
        _check_base_dtype(model, cfg)
        if cfg.packing:  # transformers reads the samples of a packed row from position_ids only without a KV cache
            check_packing_supported(model)
            model.config.use_cache = False
        model = prepare_model(prepare_for_training(model, cfg.method, cfg.quantize, cfg.bnb_compute_dtype), cfg)
        if cfg.gradient_checkpointing:  # non-reentrant: reentrant checkpointing would drop the LBC's gradient
            kwargs = {"use_reentrant": False}
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            model.config.use_cache = False
        model.train()
        sharded = engines.check_engine(cfg, acc)
        if cfg.compile:
            compile_model(model, acc, cfg.gradient_checkpointing)
        if cfg.fsdp:
            model = engines.shard_with_fsdp(model)
        params = [p for p in model.parameters() if p.requires_grad]
        trainable = sum(p.numel() for p in params)
        total_params = sum(p.numel() for p in model.parameters())
        groups = engines.optimizer_groups(params, cfg.weight_decay)
        decays = [g["params"][0].dim() >= 2 for g in groups]  # matrices take weight decay
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr)
        world = acc.num_processes
        per_step = cfg.batch_size * cfg.grad_accum * world
        total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(data) / per_step))
        from transformers import get_scheduler

        scheduler = get_scheduler(SCHEDULERS[cfg.scheduler], optimizer, round(cfg.warmup_ratio * total_steps), total_steps)
        if not cfg.fsdp:  # our own FSDP2 sharding is done; accelerate wraps for DDP / its FSDP / DeepSpeed
            model, optimizer = acc.prepare(model, optimizer)
        stream = SampleStream(len(data), cfg.seed)
        _open_output_dir(outdir, cfg, acc)
        ckpt = Checkpointer(acc, out, cfg.keep_last, sharded)
        watch = StabilityWatch()
        invariants = {k: v for k, v in cfg.to_dict().items() if k in RESUME_INVARIANTS}
        # the samples' sha256 (tokens, labels, task types, order) from the cache: whatever produced them
        invariants.update(global_micro_batch=cfg.batch_size * world, data_fingerprint=data.fingerprint())

        def check(path: Path, state: dict[str, Any]) -> None:
            saved = state.setdefault("invariants", {})
            if not str(saved.get("data_fingerprint", f"{FINGERPRINT_VERSION}:")).startswith(f"{FINGERPRINT_VERSION}:"):
                del saved["data_fingerprint"]  # hashed otherwise before the token cache: not comparable, unrecorded
            changed = {k: (saved[k], v) for k, v in invariants.items() if k in saved and saved[k] != v}
            if changed:
                note = (" (data_fingerprint: the training samples differ: a --data file changed, or a setting that "
                        "shapes them: --max-seq-len, --fit-prompt, --task-type-names, --skip-bad)"
                        if "data_fingerprint" in changed else "")  # fmt: skip
                raise ValueError(
                    f"{path}: cannot resume: settings changed since it was written that fix what its step means: "
                    f"{_describe_changes(changed)}{note} (expected the saved values, or --overwrite to start again)"
                )
            if state["step"] >= total_steps:
                raise ValueError(f"max_steps: the run would end at step {total_steps}, but {path} is at step "
                                 f"{state['step']} (expected more steps than the checkpoint's; its adapter/ folder "
                                 "holds the weights of that step)")  # fmt: skip

        start_step, resumed_from, tokens_seen, unconfirmed = 0, None, 0, None
        metrics_log = out / "metrics.jsonl"
        found = ckpt.resume(model, optimizer, check, upto=_stopped_at(metrics_log)) if cfg.resume else None
        if found is not None:
            path, state = found
            unconfirmed = path  # if it was written just before the run stopped, the next step confirms it
            start_step = resumed_from = state["step"]
            tokens_seen = state["tokens_seen"]
            if "stability" in state:
                watch.load_state_dict(state["stability"])
            _apply_schedule(optimizer, scheduler, cfg, start_step, decays)
            changed = _changed(state.get("config", {}), cfg.to_dict())
            if acc.is_main_process:
                _truncate_metrics(metrics_log, start_step)
                if changed:
                    event = {"step": start_step, "event": "resume", "checkpoint": str(path),
                             "changed": {k: list(v) for k, v in changed.items()}}  # fmt: skip
                    with open(metrics_log, "a") as f:
                        f.write(json.dumps(event) + "\n")
            acc.print(f"resumed from {path} (step {start_step} of {total_steps})")
            if changed:
                acc.print(f"resume: settings changed since {path.name}, applied from step {start_step + 1}: "
                          f"{_describe_changes(changed)}")  # fmt: skip
            unrecorded = sorted(set(invariants) - set(state.get("invariants", {})))
            if unrecorded:  # written by an older loramoe: resumable, but these cannot be checked
                acc.print(f"warning: {path} does not record {', '.join(unrecorded)} (written by an older loramoe), so "
                          "they were not checked: the run continues as if they were the settings given now")  # fmt: skip
        elif cfg.resume:
            acc.print(f"--resume: no checkpoint in {out / 'checkpoints'}, starting from step 0")
            if acc.is_main_process:
                _truncate_metrics(metrics_log, 0)
        if acc.is_main_process:
            report = data.report.to_dict()
            if eval_data is not None:
                report["eval"] = eval_data.report.to_dict()
            write_json(out / "data_report.json", report)
            write_text(out / "train_config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
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
            # this step's loss and gradient are those of the weights the last checkpoint holds: they confirm it
            stable = watch.observe(lm_loss, norm)
            if stable and unconfirmed is not None:
                ckpt.confirm(unconfirmed, {"step": step + 1, "lm_loss": lm_loss, "grad_norm": norm})
            unconfirmed = None
            if not all(math.isfinite(x) for x in (lm_loss, blc_loss, norm)):
                good = newest_known_good(out)
                message = (
                    f"non-finite loss at step {step + 1}: lm_loss={lm_loss}, blc_loss={blc_loss}, grad_norm={norm}. "
                    f"Training stopped without applying this step; last known-good checkpoint: "
                    f"{good if good else 'none written yet'} (the step after it, run with the weights it holds, had a "
                    f"finite loss and gradient norm in line with the steps before). Lower --lr, check the data or "
                    f"--bf16, then --resume: it continues from {'that checkpoint' if good else 'step 0'} with the lr "
                    "(and any other schedule setting) you give it."
                )
                if acc.is_main_process:
                    event = {"step": step + 1, "event": "non_finite_loss", "message": message,
                             "resume_from_step": checkpoint_step(good) if good else 0}  # fmt: skip
                    with open(metrics_log, "a") as f:
                        f.write(json.dumps(event) + "\n")
                raise NonFiniteLossError(message, step + 1)
            lr = scheduler.get_last_lr()[0]  # the lr this step applies (the scheduler then moves to the next one)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - t0
            train_seconds += elapsed
            run_tokens += step_tokens
            tokens_seen += step_tokens
            metrics = {"lm_loss": lm_loss, "loss": lm_loss}
            if cfg.method == "loramoe":
                metrics.update(blc_loss=blc_loss, loss=lm_loss + cfg.blc_weight * blc_loss)
            metrics["lr"] = lr
            done = step + 1
            record = {
                "step": done, "epoch": done * per_step / len(data), **metrics, "grad_norm": norm,
                "tokens": tokens_seen, "tokens_per_s": run_tokens / train_seconds, "step_seconds": elapsed,
            }  # fmt: skip
            if not stable:
                record["unstable"] = True  # see loramoe.checkpoint.StabilityWatch
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
                # known good once the next step confirms it (loramoe.checkpoint); null until then
                state = {"step": done, "total_steps": total_steps, "tokens_seen": tokens_seen, "invariants": invariants,
                         "config": cfg.to_dict(), "known_good": None, "stability": watch.state_dict()}  # fmt: skip
                unconfirmed = ckpt.save(done, model, optimizer, state)
        bar.close()

        final = acc.unwrap_model(model)
        weights = engines.final_weights(acc, model, final, sharded)
        if acc.is_main_process:  # written beside, then moved in: a file loramoe did not write is never replaced
            staging = outdir.staging()
            save_model(final, staging, weights)  # adapter_model.safetensors (+ config) or the full model
            tokenizer.save_pretrained(staging)
            outdir.publish(staging)
        acc.wait_for_everyone()
        tokens_per_s = run_tokens / train_seconds if train_seconds else 0.0
        result = TrainResult(
            output_dir=out, steps=total_steps, train_seconds=train_seconds, tokens_per_s=tokens_per_s,
            metrics={**metrics, **last_eval}, trainable_params=trainable,
            total_params=total_params, model=final, tokenizer=tokenizer, resumed_from=resumed_from,
        )  # fmt: skip
        if acc.is_main_process:
            summary = {f.name: getattr(result, f.name) for f in dataclasses.fields(result) if f.name not in ("model", "tokenizer")}
            write_json(out / "train_result.json", summary)
        acc.print(f"saved to {out}: {'adapter' if cfg.method != 'full' else 'model'}, metrics.jsonl, train_result.json")
        return result
    except Exception as e:
        if out_of_space(e):  # the failed write removed what it had written; earlier checkpoints are intact
            where = getattr(e, "filename", None) or out
            raise RunStopped(f"{where}: no space left on the device (free some space, then run the same command "
                             "with --resume: it continues from the newest checkpoint)") from e  # fmt: skip
        raise
    finally:
        if outdir is not None:
            outdir.unlock()
        # Accelerator settings are process-wide; let a later train() in this process choose its own precision.
        AcceleratorState._reset_state()


# ---- command line ----------------------------------------------------------------------------------------------


def _kv_task_type(text: str) -> tuple[str, int]:
    name, sep, value = text.partition("=")
    if not sep or value.strip() not in ("1", "0", "-1"):
        raise argparse.ArgumentTypeError(f"expected NAME=TYPE with TYPE 1, 0 or -1 (e.g. cbqa=1), got {text!r}")
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
            choices = {"method": METHODS, "scheduler": tuple(SCHEDULERS), "blc_mode": ("own_group", "reference"),
                       "dtype": tuple(DTYPES), "quantize": QUANTIZE, "bnb_compute_dtype": COMPUTE_DTYPES}  # fmt: skip
            parser.add_argument(*flags, type=base, choices=choices.get(f.name), **common)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    given = {k: v for k, v in vars(args).items() if k not in ("command", "config")}
    if "task_type_names" in given:
        given["task_type_names"] = dict(given["task_type_names"])
    return TrainConfig.from_yaml(args.config, **given) if args.config else TrainConfig(**given)


def run(args: argparse.Namespace) -> int:
    result = train(config_from_args(args))  # a failure is printed as one line by loramoe.cli
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    print(json.dumps({"output_dir": str(result.output_dir), "steps": result.steps, **result.metrics,
                      "tokens_per_s": round(result.tokens_per_s, 1)}))  # fmt: skip
    return 0
