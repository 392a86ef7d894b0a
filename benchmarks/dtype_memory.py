"""What a base needs per ``--dtype``: bytes per parameter measured on a small random Llama, then the table for
LLaMA-2-7B and Llama-3-8B (their parameter counts from their configs, built on the meta device: nothing is
downloaded or allocated).

    python -m benchmarks.dtype_memory          # a few seconds

For each dtype the small model is loaded as `loramoe train` loads it (``load_base_model(path, dtype)``, then
``prepare_model``: LoRAMoE N = 6, r = 4 on the FFN linears) and takes one training step (forward with task types,
backward, AdamW step). Then the storage of every tensor is counted: frozen weights, adapter weights, their gradients
and AdamW's state, each divided by its parameter count. Activations are not in the table (they depend on batch x
length, gradient checkpointing and the attention kernel), nor the CUDA context and allocator slack.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from loramoe.loading import load_base_model
from loramoe.train import DTYPES, TrainConfig, prepare_model

BIG = {
    "LLaMA-2-7B": LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                              num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False),
    "Llama-3-8B": LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                              num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}  # fmt: skip
ADAPTER = TrainConfig(data=["-"], num_experts=6, r=4)  # the paper's N and r; LBC on


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measure(path: str, dtype: str) -> dict[str, float]:
    """Bytes per parameter after one training step of LoRAMoE on the base at ``path`` loaded in ``dtype``."""
    model = prepare_model(load_base_model(path, dtype=DTYPES[dtype]), ADAPTER).train()
    frozen = [p for p in model.parameters() if not p.requires_grad]
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (2, 32))
    model(input_ids=ids, labels=ids, task_types=torch.tensor([1, 0])).loss.backward()
    optimizer.step()
    adam = [t for state in optimizer.state.values() for t in state.values() if t.numel() > 1]  # not the step count
    n_trained = sum(p.numel() for p in trained)
    return {
        "frozen": _bytes(frozen) / sum(p.numel() for p in frozen),
        "adapter": _bytes(trained) / n_trained,
        "grads": _bytes(p.grad for p in trained) / n_trained,
        "adam": _bytes(adam) / n_trained,
    }


def counts(config: LlamaConfig) -> tuple[int, int]:
    """(frozen base parameters, LoRAMoE adapter parameters) of a model of ``config``, built on the meta device."""
    with torch.device("meta"):
        model = prepare_model(LlamaForCausalLM(config), ADAPTER)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return sum(p.numel() for p in model.parameters()) - trained, trained


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    small = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=1024)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        LlamaForCausalLM(small).save_pretrained(tmp)
        per = {dtype: measure(tmp, dtype) for dtype in DTYPES}
    print("bytes per parameter, measured (small random Llama, one LoRAMoE training step):")
    print("| --dtype | frozen weights | adapter weights | adapter grads | AdamW state |")
    print("| --- | --- | --- | --- | --- |")
    for dtype, b in per.items():
        print(f"| {dtype} | {b['frozen']:g} | {b['adapter']:g} | {b['grads']:g} | {b['adam']:g} |")
    print("\nGB (10^9 bytes) for the big bases, from those bytes per parameter (activations not included):")
    print("| base | --dtype | frozen weights | adapters + grads + AdamW | total |")
    print("| --- | --- | --- | --- | --- |")
    for name, config in BIG.items():
        base, adapter = counts(config)
        for dtype, b in per.items():
            weights = base * b["frozen"] / 1e9
            train_state = adapter * (b["adapter"] + b["grads"] + b["adam"]) / 1e9
            label = f"{name} ({base / 1e9:.2f}B + {adapter / 1e6:.1f}M adapter)"
            print(f"| {label} | {dtype} | {weights:.1f} | {train_state:.2f} | {weights + train_state:.1f} |")


if __name__ == "__main__":
    main()
