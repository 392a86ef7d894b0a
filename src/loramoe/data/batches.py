"""Samples out of the token cache, and batches of them: `InstructionDataset` reads each sample from the
memory-mapped arrays when it is asked for (nothing per sample is held in memory, however large the data), and
`InstructionCollator` pads a list of them into a batch."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .cache import CacheEntry
from .encode import IGNORE_INDEX, Sample
from .records import place
from .report import DataReport

FINGERPRINT_VERSION = "v2"  # v1 (before the cache) hashed every sample's JSON


@dataclass(frozen=True)
class Part:
    """The samples one source contributes, in order: indices into its cache entry (repeats and subsets of the
    mixing weight are indices, not copies)."""

    entry: CacheEntry
    path: str  # the source as named by the user, for ``file:line``
    kind: str  # the source's kind (`loramoe.data.records.Source`): how its records are placed
    used: np.ndarray  # int64 indices into the entry


class InstructionDataset(torch.utils.data.Dataset):
    """Tokenised samples; items are ``{"input_ids", "labels", "task_type"}`` for `InstructionCollator`."""

    def __init__(self, parts: list[Part], report: DataReport, keep: Any = None) -> None:
        self.parts, self.report = list(parts), report
        self._keep = keep  # what must live as long as the arrays (a private cache folder)
        self._starts = np.cumsum([0] + [len(p.used) for p in self.parts])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _locate(self, i: int) -> tuple[Part, int]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"sample {i} of {n}")
        i %= n
        k = int(np.searchsorted(self._starts, i, side="right")) - 1
        return self.parts[k], int(self.parts[k].used[i - self._starts[k]])

    def __getitem__(self, i: int) -> dict[str, Any]:
        part, j = self._locate(i)
        input_ids, labels, task_type = part.entry.sample(j)
        return {"input_ids": input_ids, "labels": labels, "task_type": task_type}

    @property
    def samples(self) -> Sequence[Sample]:
        """The samples as `Sample` objects (with ``file:line``), made when read: for small data and tests."""
        return _Samples(self)

    def lengths(self) -> np.ndarray:
        """Tokens of every item, in order (int64): what a packer or a length-grouped sampler needs."""
        return np.concatenate([np.diff(p.entry.offsets)[p.used] for p in self.parts])

    def task_type_counts(self) -> dict[int, int]:
        counts = sum(np.bincount(np.asarray(p.entry.task_type)[p.used] + 1, minlength=3) for p in self.parts)
        return {value: int(counts[value + 1]) for value in (-1, 0, 1) if counts[value + 1]}

    def fingerprint(self) -> str:
        """sha256 of the samples in their order (the digest of each entry's stored arrays and the indices used):
        what a checkpoint's step refers to, whatever produced it. Reads none of the token arrays."""
        h = hashlib.sha256()
        for p in self.parts:
            h.update(p.entry.meta["digest"].encode())
            h.update(np.ascontiguousarray(p.used, dtype=np.int64).tobytes())
        return f"{FINGERPRINT_VERSION}:{h.hexdigest()}"


class _Samples(Sequence):
    def __init__(self, data: InstructionDataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int | slice) -> Any:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        part, j = self.data._locate(i)
        input_ids, labels, task_type = part.entry.sample(j)
        where = place(part.kind, int(part.entry.line[j]), int(part.entry.record[j]))
        return Sample(input_ids, labels, task_type, f"{part.path}:{where}")


@dataclass
class InstructionCollator:
    """Right-pads a list of items to the longest one: ``input_ids`` with ``pad_token_id``, ``labels`` with -100,
    ``attention_mask`` 0 on padding (built from lengths, so a pad id equal to EOS is harmless), and
    ``task_types`` [batch]. Works as a ``transformers.Trainer`` data collator."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __post_init__(self) -> None:
        if self.pad_token_id is None:
            raise ValueError("InstructionCollator needs a pad_token_id (set tokenizer.pad_token, e.g. to the EOS token).")

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        lengths = [len(it["input_ids"]) for it in items]
        width = max(lengths)
        if self.pad_to_multiple_of:
            width = math.ceil(width / self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(items), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, (it, n) in enumerate(zip(items, lengths)):
            input_ids[row, :n] = torch.as_tensor(it["input_ids"], dtype=torch.long)
            labels[row, :n] = torch.as_tensor(it["labels"], dtype=torch.long)
            attention_mask[row, :n] = 1
        task_types = torch.tensor([int(it.get("task_type", it.get("task_types"))) for it in items], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "task_types": task_types}
