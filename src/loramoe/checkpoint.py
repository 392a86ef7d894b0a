"""Training checkpoints: what one holds, how it is written (atomically, with checksums), which one a resume
loads, and which one is *known good*.

A checkpoint ``output_dir/checkpoints/checkpoint-<step>`` holds the trainable weights, the optimizer state,
every process's RNG state, ``trainer_state.json`` (step, settings, the stability record below) and a
loadable ``adapter/``. The learning-rate schedule is not saved: like the data order it is a function of the
settings and the step, which is what lets a resume apply changed schedule settings (see `loramoe.train`).

- Written atomically: rank 0 writes into a temporary folder, lists the sha256 of every file in
  ``checksums.json`` (written last), syncs and renames it into place.
- Verified on load: a checkpoint whose files do not match its checksums (or do not load) is *corrupt*; a resume
  warns, names it, moves it to ``checkpoints/set-aside/`` and falls back to the next older one.
- Known good: `StabilityWatch` marks each step stable or not (rule in its docstring). A checkpoint is known good
  only once its weights were seen to work: the step after it runs with exactly the weights it holds, and when
  that step is stable (a finite loss and gradient norm, in line with the steps before), the run writes
  ``confirmed.json`` into the checkpoint (outside its checksums: written later, by design). A checkpoint the next
  step never confirmed (that step diverged, or the run stopped first; a resume from it confirms it then) is not
  known good; one written before known-good existed (no ``known_good`` in ``trainer_state.json``) counts as
  known good, and one written under the first rule (a ``known_good`` true or false, judged by the loss *before*
  its step's update) keeps that verdict. Rotation (``keep_last``) never deletes the newest known-good
  checkpoint, and after a non-finite loss the run names it as the one to resume from.
- A write that fails (e.g. a full disk) removes the half-written temporary folder and raises an ``OSError``
  naming the file.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import random
import shutil
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import zero
from .outputs import respect_umask, write_json

CHECKPOINT_PREFIX = "checkpoint-"
CHECKSUMS = "checksums.json"
CONFIRMED = "confirmed.json"  # written into a checkpoint when the step after it proved its weights (see above)
SET_ASIDE = "set-aside"


def checkpoint_dirs(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (renamed into place), oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX)
             and p.name[len(CHECKPOINT_PREFIX):].isdigit()]  # fmt: skip
    return sorted(found, key=checkpoint_step)


def checkpoint_step(path: Path) -> int:
    return int(path.name[len(CHECKPOINT_PREFIX) :])


def read_state(path: Path) -> dict[str, Any]:
    return json.loads((path / "trainer_state.json").read_text())


class CheckpointMismatch(ValueError):
    """An intact checkpoint that does not fit the model being trained (not corruption: nothing to fall back to)."""


# ---- tensors and RNG ------------------------------------------------------------------------------------------


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 shard (a collective: every rank must call it), or ``t`` itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters as full CPU tensors, keyed like ``model.state_dict()``."""
    return {n: full_tensor(p.detach()).to("cpu", copy=True).contiguous()
            for n, p in model.named_parameters() if p.requires_grad}  # fmt: skip


def save_model(model: Any, path: Path, weights: dict[str, torch.Tensor] | None) -> None:
    """``save_pretrained`` with the trainable tensors only. An adapter never resizes the vocabulary, so PEFT
    is told not to look for the base model's config to check that: for a base named by a Hub id (or our
    ``smollm2`` shorthand) its "auto" check is a network request."""
    if hasattr(model, "peft_config"):
        model.save_pretrained(path, state_dict=weights, save_embedding_layers=False)
    else:
        model.save_pretrained(path, state_dict=weights)


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


def _raw(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's wrapper."""
    return getattr(optimizer, "optimizer", optimizer)


# ---- checksums -------------------------------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(root: Path) -> list[str]:
    """The files a checkpoint's checksums cover: all but the listing itself and the later confirmation."""
    unlisted = (CHECKSUMS, CONFIRMED, CONFIRMED + ".tmp")
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name not in unlisted)


def write_checksums(root: Path) -> None:
    write_json(root / CHECKSUMS, {"sha256": {name: _sha256(root / name) for name in _files(root)}})


def verify(root: Path) -> str | None:
    """What is wrong with checkpoint ``root`` (``None``: every file matches its checksum). A checkpoint written
    before checksums existed has no ``checksums.json``: it passes here and is judged by whether it loads."""
    listing = root / CHECKSUMS
    if not listing.is_file():
        return None
    try:
        expected = json.loads(listing.read_text())["sha256"]
    except (ValueError, KeyError) as e:
        return f"{listing}: unreadable ({e})"
    for name, digest in expected.items():
        if not (root / name).is_file():
            return f"{root / name}: missing"
        if _sha256(root / name) != digest:
            return f"{root / name}: sha256 differs from the one written at save time (truncated or changed)"
    extra = sorted(set(_files(root)) - set(expected))
    return f"{root / extra[0]}: not written at save time" if extra else None


def _torch_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _write(path: Path, data: bytes) -> None:
    """Write ``data`` with Python's own I/O, whose failure is an ``OSError`` naming the file (torch.save's,
    on a full disk, is "unexpected pos 39936 vs 39824")."""
    try:
        path.write_bytes(data)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(path)) from None


def _fsync_dir(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


# ---- known good --------------------------------------------------------------------------------------------------


class StabilityWatch:
    """Marks each optimizer step *stable* or not; a stable step confirms the checkpoint written before it (whose
    weights it ran with) as *known good*.

    Rule: a step is unstable when its LM loss or gradient norm is not finite, when its LM loss is more than
    ``LOSS_JUMP`` (2) times the median LM loss of the last ``WINDOW`` (20) stable steps, or when its gradient
    norm (before clipping) is more than ``NORM_JUMP`` (10) times the median gradient norm of the last ``WINDOW``
    steps. The first ``MIN_HISTORY`` (5) finite steps are stable. Unstable steps do not enter the loss
    window, so a run that diverged to a high but finite loss never becomes its own reference; the gradient-norm
    window takes every step, so a lasting change of scale stops counting as a jump after about ``WINDOW / 2``
    steps.
    """

    WINDOW, MIN_HISTORY, LOSS_JUMP, NORM_JUMP = 20, 5, 2.0, 10.0

    def __init__(self) -> None:
        self.losses: list[float] = []  # LM losses of the last WINDOW stable steps
        self.norms: list[float] = []  # gradient norms of the last WINDOW steps
        self.stable = True  # the verdict on the latest step

    def observe(self, lm_loss: float, grad_norm: float) -> bool:
        finite = math.isfinite(lm_loss) and math.isfinite(grad_norm)
        stable = finite
        if finite and len(self.losses) >= self.MIN_HISTORY:
            stable = lm_loss <= self.LOSS_JUMP * statistics.median(self.losses)
        if finite and len(self.norms) >= self.MIN_HISTORY:
            stable = stable and grad_norm <= self.NORM_JUMP * statistics.median(self.norms)
        if finite:
            self.norms = (self.norms + [grad_norm])[-self.WINDOW :]
        if stable:
            self.losses = (self.losses + [lm_loss])[-self.WINDOW :]
        self.stable = stable
        return stable

    def state_dict(self) -> dict[str, Any]:
        return {"losses": self.losses, "norms": self.norms, "stable": self.stable}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.losses, self.norms, self.stable = list(state["losses"]), list(state["norms"]), bool(state["stable"])


def newest_known_good(output_dir: str | Path) -> Path | None:
    good = [p for p in checkpoint_dirs(output_dir) if _known_good(p)]
    return good[-1] if good else None


def _known_good(path: Path) -> bool:
    try:
        state = read_state(path)
    except (OSError, ValueError):
        return False
    if "known_good" not in state:  # a checkpoint from before the rule: assumed good
        return True
    if state["known_good"] is None:  # judged by the step after it (see the module docstring)
        return (path / CONFIRMED).is_file()
    return bool(state["known_good"])  # the first rule's verdict


# ---- the checkpointer ------------------------------------------------------------------------------------------


class Checkpointer:
    """Writes ``output_dir/checkpoints/checkpoint-<step>`` atomically: rank 0 writes everything (the other ranks
    send it their RNG states and, under FSDP, their shards) into a temporary directory, renames it into place and
    keeps the last ``keep_last`` plus the newest known-good one."""

    def __init__(self, accelerator: Any, output_dir: Path, keep_last: int, sharded: bool) -> None:
        self.acc, self.root, self.keep_last, self.sharded = accelerator, output_dir / "checkpoints", keep_last, sharded

    def save(self, step: int, model: nn.Module, optimizer: Any, state: dict[str, Any]) -> Path:
        """``state`` (step, settings, ``known_good``, ...) becomes ``trainer_state.json``."""
        from accelerate.utils import gather_object
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        acc = self.acc
        final = self.root / f"{CHECKPOINT_PREFIX}{step}"
        rng_states = gather_object([_rng_state()])  # one per process, in rank order
        unwrapped = acc.unwrap_model(model)
        if zero.is_engine(model):  # the same layout, from DeepSpeed's partitions
            weights, optim_state = zero.trainable_state(model), zero.optimizer_state(model)
        else:
            weights = trainable_state(unwrapped) if self.sharded or acc.is_main_process else None
            # keyed by parameter name, gathered to rank 0 under FSDP: loadable whatever the sharding
            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            optim_state = get_optimizer_state_dict(model, _raw(optimizer), options=options)
        if acc.is_main_process:
            from safetensors.torch import save as safetensors_bytes

            tmp = self.root / f".tmp-{CHECKPOINT_PREFIX}{step}"
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                tmp.mkdir(parents=True)
                _write(tmp / "trainable.safetensors", safetensors_bytes(weights))
                _write(tmp / "optimizer.pt", _torch_bytes(optim_state))
                for rank, rng in enumerate(rng_states):
                    _write(tmp / f"rng_state_{rank}.pt", _torch_bytes(rng))
                write_json(tmp / "trainer_state.json", state)
                if hasattr(unwrapped, "peft_config"):  # a ready-to-load adapter, for evaluating checkpoints
                    save_model(unwrapped, tmp / "adapter", weights)
                write_checksums(tmp)
                respect_umask(tmp)
                _fsync_dir(tmp)
            except BaseException:  # e.g. a full disk: the half-written folder would only take space
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            if final.exists():  # a step redone after a resume from an older checkpoint
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._rotate()
        acc.wait_for_everyone()
        return final

    def confirm(self, path: Path, evidence: dict[str, Any]) -> None:
        """Mark checkpoint ``path`` known good: the step after it (``evidence``: its step, loss and gradient
        norm) was stable with the weights it holds. Checkpoints written under an earlier rule keep their verdict."""
        if not (self.acc.is_main_process and path.is_dir()) or (path / CONFIRMED).is_file():
            return
        if read_state(path).get("known_good", True) is None:
            write_json(path / CONFIRMED, evidence)
            self._rotate()

    def _rotate(self) -> None:
        dirs = checkpoint_dirs(self.root.parent)
        keep = set(dirs[-self.keep_last :]) | {newest_known_good(self.root.parent)}
        for old in dirs:
            if old not in keep:
                shutil.rmtree(old)

    def resume(self, model: nn.Module, optimizer: Any, check: Callable[[Path, dict], None],
               upto: int | None = None) -> tuple[Path, dict[str, Any]] | None:  # fmt: skip
        """Load the newest intact checkpoint (of a step <= ``upto``, when given) into ``model`` and ``optimizer``
        and restore this process's RNG state; return its path and ``trainer_state.json`` (``None``: no
        checkpoint). ``check(path, state)`` refuses a checkpoint by raising. Corrupt checkpoints, and those after
        ``upto``, are moved to ``checkpoints/set-aside/`` with a warning that names each."""
        acc = self.acc
        candidates = checkpoint_dirs(self.root.parent)[::-1]
        set_aside: list[tuple[Path, str]] = []
        if upto is not None:
            set_aside = [(p, "unstable") for p in candidates if checkpoint_step(p) > upto]
            candidates = [p for p in candidates if checkpoint_step(p) <= upto]
            for path, _ in set_aside:
                acc.print(f"resume: skipping {path}: written after the last known-good checkpoint the run named")
        found = None
        for path in candidates:
            problem = verify(path)
            if problem is None:
                state = read_state(path)
                check(path, state)  # a refusal (e.g. changed settings) is raised, not fallen back from
                try:
                    self._load(path, model, optimizer)
                    found = (path, state)
                    break
                except CheckpointMismatch:
                    raise
                except Exception as e:  # a file that does not load (a checkpoint written before checksums)
                    problem = f"{path}: does not load ({type(e).__name__}: {e})"
            acc.print(f"warning: checkpoint {path} is corrupt ({problem}); falling back to the next older one")
            set_aside.append((path, "corrupt"))
        acc.wait_for_everyone()
        if acc.is_main_process:
            for path, reason in set_aside:
                target = self.root / SET_ASIDE / f"{path.name}.{reason}"
                shutil.rmtree(target, ignore_errors=True)
                target.parent.mkdir(exist_ok=True)
                os.replace(path, target)
                acc.print(f"resume: moved {path} to {target}")
        acc.wait_for_everyone()
        if found is None and any(reason == "corrupt" for _, reason in set_aside):
            raise ValueError(f"{self.root}: no intact checkpoint to resume from (the corrupt ones are now in "
                             f"{self.root / SET_ASIDE}; expected at least one intact checkpoint, or --overwrite)")  # fmt: skip
        return found

    def _load(self, path: Path, model: nn.Module, optimizer: Any) -> None:
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        acc = self.acc
        weights = load_file(str(path / "trainable.safetensors"))
        params = dict(acc.unwrap_model(model).named_parameters())
        expected = {n for n, p in params.items() if p.requires_grad}
        if set(weights) != expected:
            missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
            raise CheckpointMismatch(f"{path}: checkpoint does not match the model (missing {missing[:3]}, "
                                     f"unexpected {extra[:3]}; expected the model it was trained with)")  # fmt: skip
        optim_state = torch.load(path / "optimizer.pt", weights_only=True)
        rng_file = path / f"rng_state_{acc.process_index}.pt"
        rng = torch.load(rng_file, weights_only=True) if rng_file.exists() else None
        if zero.is_engine(model):
            zero.load_state(model, weights, optim_state)
        else:
            with torch.no_grad():
                for name, tensor in weights.items():
                    param = params[name]
                    if hasattr(param, "device_mesh"):  # an FSDP2 shard: keep this rank's slice
                        from torch.distributed.tensor import distribute_tensor

                        tensor = distribute_tensor(tensor.to(param.device), param.device_mesh, param.placements)
                    param.copy_(tensor)
            # checkpoints written before the empty optimizer group was dropped (see engines.optimizer_groups)
            optim_state["param_groups"] = [g for g in optim_state["param_groups"] if g["params"]]
            set_optimizer_state_dict(model, _raw(optimizer), optim_state, options=StateDictOptions(full_state_dict=True))
        if rng is not None:
            _set_rng_state(rng)
        else:
            acc.print(f"warning: {rng_file} missing (different process count?): dropout will not replay exactly")
