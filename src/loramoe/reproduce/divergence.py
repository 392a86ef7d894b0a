"""How far fine-tuning moved a model, without decoding: the forward KL(base || tuned) of the next-token
distributions on prompts that no training data contains.

Exact match flips only when an answer changes; the KL sees every shift of the distribution the base model had on
text it read before fine-tuning. RL's Razor (arXiv 2509.04259) found this KL, measured on the original task's
inputs, predicts how much a fine-tuned model forgets: the study records it per run beside the knowledge scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..evaluate import batched, model_device, pad_sequences, pad_token_id


def kl_divergence(base_logits: torch.Tensor, tuned_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_base || p_tuned) in nats over the last dimension: one value per position."""
    base_logp = base_logits.float().log_softmax(dim=-1)
    tuned_logp = tuned_logits.float().log_softmax(dim=-1)
    return (base_logp.exp() * (base_logp - tuned_logp)).sum(dim=-1)


@torch.no_grad()
def next_token_kl(base: nn.Module, tuned: nn.Module, tokenizer: Any, prompts: Sequence[str],
                  batch_size: int) -> list[float]:  # fmt: skip
    """Per prompt, the mean over its positions of KL(base || tuned) of the next-token distribution (nats).

    Right padding, so each row's real tokens sit at positions 0.. as they would alone; padded positions are
    left out of the mean."""
    pad = pad_token_id(tokenizer)
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    states = (base.training, tuned.training)
    base.eval()
    tuned.eval()
    out: list[float] = []
    try:
        for chunk in batched(ids, batch_size):
            batch, mask = pad_sequences(chunk, pad, left=False)
            kl = kl_divergence(_logits(base, batch, mask), _logits(tuned, batch, mask)).cpu()
            out += [kl[i, : len(row)].mean().item() for i, row in enumerate(chunk)]
    finally:
        base.train(states[0])
        tuned.train(states[1])
    return out


def _logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    device = model_device(model)
    return model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
