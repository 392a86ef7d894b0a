"""Packed batches: the samples of a micro-batch in rows of up to ``max_seq_len`` tokens, exact to the padded batch.

A padded batch of M samples costs M x (its longest sample) positions of compute; on instruction data most of them
are padding. `PackingCollator` puts the same M samples into as few rows as first-fit decreasing finds (a sample is
never split across rows) and keeps what padding gave for free:

- attention never crosses samples: positions restart at 0 with each sample and the batch has no 2-D attention
  mask, so transformers (``masking_utils.find_packed_sequence_indices``) reads the sample boundaries from
  ``position_ids`` and builds a block-diagonal causal mask. The padding at a row's end gets positions of its own
  (0, 1, ...): a block that no real token sees. Which models and attention implementations do this is checked
  (`check_packing_supported`): the ones the tests prove exact, nothing else.
- no sample is predicted from another: the label of each sample's first token is masked (in a padded batch
  position 0 is never a target), so the LM loss averages over the same tokens.
- the LBC stays per sample: ``sample_index`` [rows, T] names the sample of each token (-1 on padding) and
  ``task_types`` stays one entry per sample [M], so Q[m, n] sums sample m's own tokens wherever they sit
  (`loramoe.balance.packed_importance`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

IGNORE_INDEX = -100
# (model_type, attention implementation) pairs whose packed forward equals the padded one (tests/test_packing.py
# checks every pair listed here): they build their mask with transformers' create_causal_mask from position_ids.
PACKING_EXACT = {"llama": ("sdpa", "eager"), "qwen2": ("sdpa", "eager"), "gpt2": ("sdpa", "eager")}


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: sample indices per row, each row's lengths summing to at most ``capacity``."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"max_seq_len: a sample has {n} tokens, more than the packed row's {capacity} (expected "
                             "samples fitted to max_seq_len, as loramoe.data does)")  # fmt: skip
        row = next((r for r, free in enumerate(room) if free >= n), None)
        if row is None:
            rows.append([])
            room.append(capacity)
            row = len(rows) - 1
        rows[row].append(i)
        room[row] -= n
    return rows


@dataclass
class PackingCollator:
    """Packs a list of items (``input_ids``, ``labels``, ``task_type``) into rows of up to ``max_seq_len`` tokens,
    padded to the fullest row: ``input_ids``, ``labels`` (-100 on padding and at each sample's start),
    ``position_ids`` (restarting per sample), ``sample_index`` (-1 on padding) and ``task_types`` [samples]."""

    pad_token_id: int
    max_seq_len: int

    def __post_init__(self) -> None:
        if self.pad_token_id is None:
            raise ValueError("PackingCollator needs a pad_token_id (set tokenizer.pad_token, e.g. to the EOS token).")

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        lengths = [len(it["input_ids"]) for it in items]
        rows = pack_rows(lengths, self.max_seq_len)
        width = max(sum(lengths[i] for i in row) for row in rows)
        shape = (len(rows), width)
        input_ids = torch.full(shape, self.pad_token_id, dtype=torch.long)
        labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros(shape, dtype=torch.long)
        sample_index = torch.full(shape, -1, dtype=torch.long)
        for r, row in enumerate(rows):
            at = 0
            for m in row:
                span = slice(at, at + lengths[m])
                input_ids[r, span] = torch.as_tensor(items[m]["input_ids"], dtype=torch.long)
                labels[r, span] = torch.as_tensor(items[m]["labels"], dtype=torch.long)
                labels[r, at] = IGNORE_INDEX  # never predicted from the previous sample's last token
                position_ids[r, span] = torch.arange(lengths[m])
                sample_index[r, span] = m
                at += lengths[m]
            position_ids[r, at:] = torch.arange(width - at)  # padding: a block of its own
        task_types = torch.tensor([int(it.get("task_type", it.get("task_types"))) for it in items], dtype=torch.long)
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "sample_index": sample_index,
                "task_types": task_types}  # fmt: skip


def real_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Number of non-padding positions of a padded (``attention_mask``) or packed (``sample_index``) batch."""
    if "sample_index" in batch:
        return (batch["sample_index"] >= 0).sum()
    return batch["attention_mask"].sum()


def check_packing_supported(model: nn.Module) -> None:
    """Refuse packing for a model whose packed forward is not proven equal to its padded one."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    attention = getattr(config, "_attn_implementation", None)
    if attention not in PACKING_EXACT.get(model_type, ()):
        verified = ", ".join(f"{m} ({'/'.join(a)})" for m, a in PACKING_EXACT.items())
        raise ValueError(
            f"packing: model type {model_type!r} with attention {attention!r} is not verified to keep packed samples "
            f"apart (expected one of: {verified}; or train without --packing)"
        )
