"""`loramoe train`'s settings: `TrainConfig` (field names are the YAML keys, CLI flags the same with dashes),
checked when built, and read from YAML as users write it (a wrong value names the file and key)."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from .data import check_task_type_names
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
