"""Packed vs padded training steps, side by side: real (non-padding) tokens per second of LoRAMoE training steps on
the same micro-batches, once padded to their longest sample (`InstructionCollator`) and once packed into rows of up
to max_seq_len tokens (`PackingCollator`, `--packing`).

    nice -n 19 python -m benchmarks.packing_throughput                 # ~10 minutes on 2 loaded CPU cores
    python -m benchmarks.packing_throughput --batches 2 --rounds 1     # a quick look

Sample lengths are drawn like the reference code's training data (SmolLM2 tokenizer: median 97, p90 519, max
1,899 tokens): a log-normal through the median and p90, redrawn above the max, then fitted to max_seq_len as
`loramoe.data` fits an over-long sample. The model is a random Llama (sdpa attention) with LoRAMoE (N = 6, r = 4,
dropout 0.05, LBC on) on its FFN linears; a step is forward + backward + AdamW on the adapters, as in `loramoe
train`. Each round times every micro-batch once per layout, in an order that alternates between rounds, so
machine load drifts hit both alike; the ratio is the median of per-round ratios.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import peft
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from loramoe import LoraMoeConfig
from loramoe.data import InstructionCollator
from loramoe.packing import PackingCollator, real_tokens

MEDIAN, P90, MAX = 97, 519, 1899  # reference data, SmolLM2 tokenizer (issue 20)
Z90 = 1.2815515655446004  # standard normal quantile at 0.9


def reference_lengths(count: int, max_seq_len: int, seed: int) -> list[int]:
    """Sample lengths distributed like the reference data's, fitted to ``max_seq_len``."""
    g = torch.Generator().manual_seed(seed)
    mu, sigma = math.log(MEDIAN), (math.log(P90) - math.log(MEDIAN)) / Z90
    lengths: list[int] = []
    while len(lengths) < count:
        n = round(math.exp(mu + sigma * torch.randn((), generator=g).item()))
        if 2 <= n <= MAX:
            lengths.append(min(n, max_seq_len))
    return lengths


def make_items(lengths: list[int], vocab: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    items = []
    for i, n in enumerate(lengths):
        ids = torch.randint(3, vocab, (n,), generator=g).tolist()
        prompt = n // 3
        items.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:], "task_type": i % 2})
    return items


def build_model(args: argparse.Namespace) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                         num_attention_heads=args.heads, num_key_value_heads=args.heads // 2, vocab_size=args.vocab,
                         max_position_embeddings=args.max_seq_len, attn_implementation="sdpa", use_cache=False)  # fmt: skip
    adapter = LoraMoeConfig(num_experts=6, r=4, lora_dropout=0.05, blc_weight=0.1)
    return peft.get_peft_model(LlamaForCausalLM(config), adapter).train()


def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor]) -> float:
    start = time.perf_counter()
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-seq-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=8, help="micro-batches per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=688)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    lengths = reference_lengths(args.batches * args.batch_size, args.max_seq_len, args.seed)
    items = make_items(lengths, args.vocab, args.seed)
    groups = [items[i : i + args.batch_size] for i in range(0, len(items), args.batch_size)]
    layouts = {"padded": InstructionCollator(pad_token_id=0), "packed": PackingCollator(0, args.max_seq_len)}
    batches = {name: [collate(g) for g in groups] for name, collate in layouts.items()}
    real = sum(int(real_tokens(b)) for b in batches["padded"])
    assert real == sum(int(real_tokens(b)) for b in batches["packed"]) == sum(lengths)
    q = statistics.quantiles(lengths, n=10)
    print(f"{len(lengths)} samples: median {statistics.median(lengths):.0f}, p90 {q[8]:.0f}, max {max(lengths)} tokens "
          f"(after fitting to {args.max_seq_len}); {args.batches} micro-batches of {args.batch_size}")  # fmt: skip
    for name, bs in batches.items():
        positions = sum(b["input_ids"].numel() for b in bs)
        rows = [tuple(b["input_ids"].shape) for b in bs]
        print(f"  {name}: {positions:,} positions for {real:,} real tokens ({real / positions:.0%} real); rows x width {rows}")

    model = build_model(args)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    print(f"model: random Llama {args.hidden}/{args.intermediate} x {args.layers} layers, vocab {args.vocab}, sdpa; "
          f"LoRAMoE N=6 r=4; torch threads {args.threads}")  # fmt: skip
    step(model, optimizer, batches["packed"][0])  # warm-up (one-off allocations)
    step(model, optimizer, batches["padded"][0])
    seconds = {name: [] for name in layouts}
    for r in range(args.rounds):
        order = list(layouts) if r % 2 == 0 else list(reversed(layouts))
        for i in range(args.batches):
            for name in order:
                seconds[name].append(step(model, optimizer, batches[name][i]))
        per_round = {n: real / sum(s[-args.batches :]) for n, s in seconds.items()}
        print(f"round {r + 1}: padded {per_round['padded']:.0f} tok/s, packed {per_round['packed']:.0f} tok/s, "
              f"ratio {per_round['packed'] / per_round['padded']:.2f}", flush=True)  # fmt: skip
    rounds = [
        sum(seconds["padded"][r * args.batches : (r + 1) * args.batches])
        / sum(seconds["packed"][r * args.batches : (r + 1) * args.batches])
        for r in range(args.rounds)
    ]
    total = {n: real * args.rounds / sum(s) for n, s in seconds.items()}
    print(f"real tokens/s: padded {total['padded']:.0f}, packed {total['packed']:.0f}; packed / padded = "
          f"{statistics.median(rounds):.2f}x (median of {args.rounds} rounds: {', '.join(f'{x:.2f}' for x in rounds)})")


if __name__ == "__main__":
    main()
