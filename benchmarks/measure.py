"""How the benchmarks measure: interleaved timing with medians, bytes saved for backward, and peak tensor memory.

Timings on a shared CPU are noisy, so every method of a case is timed once per round, in an order that rotates
from round to round, and the report uses medians over rounds plus the median of the per-round ratios (a round's
methods ran seconds apart, under roughly the same load). Memory figures are deterministic.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


@dataclass
class Timing:
    """Per-method median milliseconds, and medians of per-round ratios ``"a/b"`` between methods."""

    ms: dict[str, float]
    ratios: dict[str, float]
    rounds: int


def _calls_for(fn: Callable[[], object], min_seconds: float) -> int:
    """How many calls make one sample last at least ``min_seconds`` (one call is timed to decide)."""
    start = time.perf_counter()
    fn()
    elapsed = time.perf_counter() - start
    return max(1, round(min_seconds / max(elapsed, 1e-6)))


def time_interleaved(
    fns: dict[str, Callable[[], object]], rounds: int, min_seconds: float = 0.05, pairs: list[tuple[str, str]] = ()
) -> Timing:
    """Median time of each function, measured in ``rounds`` interleaved rounds (after one warm-up call each)."""
    calls = {name: _calls_for(fn, min_seconds) for name, fn in fns.items()}  # doubles as the warm-up
    names = list(fns)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for k in range(rounds):
        for name in names[k % len(names):] + names[: k % len(names)]:
            fn, n = fns[name], calls[name]
            start = time.perf_counter()
            for _ in range(n):
                fn()
            samples[name].append((time.perf_counter() - start) / n * 1e3)
    ratios = {
        f"{a}/{b}": statistics.median(x / y for x, y in zip(samples[a], samples[b])) for a, b in pairs
    }
    return Timing({n: statistics.median(s) for n, s in samples.items()}, ratios, rounds)


def saved_tensor_bytes(fn: Callable[[], object], exclude: list[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages autograd keeps for backward while ``fn`` runs its forward.

    Storages are deduplicated (a tensor and its views count once) and those of ``exclude`` (the parameters and
    frozen weights, which exist anyway) are left out, so the figure is the activation memory a method adds.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


class _LiveStorages(TorchDispatchMode):
    """Tracks the bytes of tensor storages created under the mode and still alive, and their peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            self.current -= self.live.pop(key)[1]
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key and key not in self.live and key not in inputs:  # a view or in-place result is not new memory
                self.live[key] = (StorageWeakRef(storage), storage.nbytes())
                self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out


def peak_bytes(fn: Callable[[], object]) -> int:
    """Peak bytes of tensors allocated by ``fn`` (on CUDA: ``max_memory_allocated`` above the start).

    On CPU, torch has no allocator statistics (and tracemalloc does not see its allocations), so every op's
    outputs are tracked through a dispatch mode until their storages die; this counts tensors, not allocator
    caching or library workspaces, which is the part that differs between methods.
    """
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    with _LiveStorages() as mode:
        fn()
    return mode.peak
