"""`loramoe train`: fine-tune a causal LM with LoRAMoE + LBC (or plain LoRA / full fine-tuning for comparison)
on instruction files, with exact resume, on one process or many (accelerate: DDP, FSDP, DeepSpeed).

Python API::

    from loramoe.train import TrainConfig, train
    result = train(TrainConfig(model="smollm2", data=["a.jsonl", ("b.jsonl", 2.0)], output_dir="runs/x"))

Data order is a pure function of the seed and the step: the sample stream is the concatenation of one seeded
permutation per epoch, and optimizer step t on rank p reads a fixed slice of it. That is what makes resuming
exact (no sampler state to save) and makes N processes x batch b equal to 1 process x batch b x N accumulation.
The learning rate is one too (of the schedule settings and the step), so a resume applies the settings given
now, except those that fix what a step means (`loramoe.resume`). Settings: `loramoe.train_config`.

Checkpoints, and which one is "known good", are `loramoe.checkpoint`'s; the output folder rule is
`loramoe.outputs`'s.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import time
import typing
from dataclasses import dataclass
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
    InstructionCollator,
    InstructionDataset,
    default_cache_dir,
    load_instruction_data,
)
from .errors import RunStopped, out_of_space
from .loading import model_folder
from .outputs import OutputDir, write_json, write_text
from .packing import PackingCollator, check_packing_supported, real_tokens
from .quantization import COMPUTE_DTYPES, QUANTIZE, prepare_for_training
from .resume import resume
from .train_config import DTYPES, METHODS, RESUME_INVARIANTS, SCHEDULERS, TrainConfig


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


def _load_data(cfg: TrainConfig, tokenizer: Any, acc: Any) -> tuple[InstructionDataset, InstructionDataset | None]:
    """The training and eval samples, through the shared token cache (`loramoe.data`), each task-type name used."""
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
    return data, eval_data


def _build_model(cfg: TrainConfig, model: nn.Module | None, acc: Any) -> nn.Module:
    """The base (loaded unless given) in the run's dtype or quantization, with its adapters and training switches."""
    from .loading import load_base_model

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
    return model


def train(cfg: TrainConfig, model: nn.Module | None = None, tokenizer: Any = None) -> TrainResult:
    """Run (or resume) a training run; see the module docstring. ``model``/``tokenizer`` may be given in memory
    (a base model, or a ready PeftModel); then ``cfg.model`` is only recorded."""
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed

    from .loading import load_tokenizer

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
        data, eval_data = _load_data(cfg, tokenizer, acc)
        _check_step_size(cfg, len(data), acc)
        pad = tokenizer.pad_token_id
        collate = PackingCollator(pad, cfg.max_seq_len) if cfg.packing else InstructionCollator(pad)

        model = _build_model(cfg, model, acc)
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

        resumed = resume(cfg, out, ckpt, model, optimizer, scheduler, acc, watch, invariants, total_steps, decays)
        start_step, tokens_seen, unconfirmed = resumed.step, resumed.tokens_seen, resumed.unconfirmed
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
            total_params=total_params, model=final, tokenizer=tokenizer, resumed_from=resumed.from_step,
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
