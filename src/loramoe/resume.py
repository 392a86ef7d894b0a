"""Resuming a `loramoe train` run: which checkpoint it continues from, what may and may not have changed since,
and putting the optimizer, schedule and metrics log where a run started with today's settings would be.

Settings in `RESUME_INVARIANTS` (and the training samples' fingerprint) fix what a checkpoint's step means, so a
resume with any of them changed is refused, listing each. Every other setting applies from the resume step on;
what changed is printed and logged as a ``resume`` event in metrics.jsonl (see `loramoe.train`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .checkpoint import Checkpointer, StabilityWatch
from .data import FINGERPRINT_VERSION
from .outputs import write_text
from .train_config import RUN_CONTROLS, TrainConfig


@dataclass
class Resumed:
    """Where the loop starts: ``step`` 0 and nothing else for a new run."""

    step: int = 0
    from_step: int | None = None  # the checkpoint's step, None when not resumed
    tokens_seen: int = 0
    unconfirmed: Path | None = None  # the checkpoint resumed from, which the first step confirms (loramoe.checkpoint)


def resume(cfg: TrainConfig, out: Path, ckpt: Checkpointer, model: nn.Module, optimizer: Any, scheduler: Any, acc: Any,
           watch: StabilityWatch, invariants: dict[str, Any], total_steps: int, decays: list[bool]) -> Resumed:  # fmt: skip
    """With ``cfg.resume``: load the newest usable checkpoint of ``out`` into model, optimizer and ``watch`` (after
    a non-finite loss: the known-good one the run named), check ``invariants`` against it, apply today's schedule
    settings and cut metrics.jsonl back to its step. Without: a new run."""
    if not cfg.resume:
        return Resumed()
    metrics_log = out / "metrics.jsonl"
    found = ckpt.resume(model, optimizer, _checker(invariants, total_steps), upto=stopped_at(metrics_log))
    if found is None:
        acc.print(f"--resume: no checkpoint in {out / 'checkpoints'}, starting from step 0")
        if acc.is_main_process:
            truncate_metrics(metrics_log, 0)
        return Resumed()
    path, state = found
    step = state["step"]
    if "stability" in state:
        watch.load_state_dict(state["stability"])
    apply_schedule(optimizer, scheduler, cfg, step, decays)
    changed = changed_settings(state.get("config", {}), cfg.to_dict())
    if acc.is_main_process:
        truncate_metrics(metrics_log, step)
        if changed:
            event = {"step": step, "event": "resume", "checkpoint": str(path),
                     "changed": {k: list(v) for k, v in changed.items()}}  # fmt: skip
            with open(metrics_log, "a") as f:
                f.write(json.dumps(event) + "\n")
    acc.print(f"resumed from {path} (step {step} of {total_steps})")
    if changed:
        acc.print(f"resume: settings changed since {path.name}, applied from step {step + 1}: "
                  f"{describe_changes(changed)}")  # fmt: skip
    unrecorded = sorted(set(invariants) - set(state.get("invariants", {})))
    if unrecorded:  # written by an older loramoe: resumable, but these cannot be checked
        acc.print(f"warning: {path} does not record {', '.join(unrecorded)} (written by an older loramoe), so "
                  "they were not checked: the run continues as if they were the settings given now")  # fmt: skip
    # if it was written just before the run stopped, the next step confirms it
    return Resumed(step=step, from_step=step, tokens_seen=state["tokens_seen"], unconfirmed=path)


def _checker(invariants: dict[str, Any], total_steps: int):
    """The check `Checkpointer.resume` runs on a candidate checkpoint before loading it."""

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
                f"{describe_changes(changed)}{note} (expected the saved values, or --overwrite to start again)"
            )
        if state["step"] >= total_steps:
            raise ValueError(f"max_steps: the run would end at step {total_steps}, but {path} is at step "
                             f"{state['step']} (expected more steps than the checkpoint's; its adapter/ folder "
                             "holds the weights of that step)")  # fmt: skip

    return check


def stopped_at(metrics: Path) -> int | None:
    """After a non-finite loss: the step of the known-good checkpoint the run named (0: none), else None."""
    if not metrics.exists():
        return None
    lines = [ln for ln in metrics.read_text().splitlines() if ln.strip()]
    last = _record(lines[-1]) if lines else {}
    return last.get("resume_from_step") if last.get("event") == "non_finite_loss" else None


def changed_settings(saved: dict[str, Any], now: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    return {k: (saved[k], v) for k, v in now.items() if k in saved and k not in RUN_CONTROLS and saved[k] != v}


def describe_changes(changed: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items())


def apply_schedule(optimizer: Any, scheduler: Any, cfg: TrainConfig, step: int, decays: list[bool]) -> None:
    """Put the configured lr and weight decay into the optimizer (a loaded optimizer state brings the saved
    ones) and move the schedule to ``step``: the lr is then what a run started with these settings has there.
    ``decays``: whether each group takes weight decay (see `optimizer_groups`)."""
    groups = getattr(optimizer, "optimizer", optimizer).param_groups
    for group, decay in zip(groups, decays, strict=True):
        group["initial_lr"], group["weight_decay"] = cfg.lr, cfg.weight_decay if decay else 0.0
    scheduler.base_lrs = [cfg.lr for _ in groups]
    scheduler.last_epoch = step - 1
    scheduler.step()


def truncate_metrics(path: Path, step: int) -> None:
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
