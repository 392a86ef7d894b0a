"""Training throughput of `loramoe train` (LoRAMoE, N experts of rank r, LBC on) against `--method lora` with the
same total rank N*r on the same target modules, same data, same machine, measured side by side.

The two methods alternate for several rounds (so machine load drifts hit both alike); each run skips its first
(warm-up) step and reports real (non-padding) tokens per second over the remaining steps, from metrics.jsonl.

    python benchmarks/train_throughput.py                       # SmolLM2-135M-Instruct (the `smollm2` GGUF)
    python benchmarks/train_throughput.py --model runs/tiny-llama --steps 10 --rounds 5
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from loramoe.loading import load_base_model, load_tokenizer
from loramoe.train import TrainConfig, train

DATA = Path(__file__).resolve().parent.parent / "examples" / "data" / "tiny_instructions.jsonl"


def steady_tokens_per_s(metrics_file: Path) -> float:
    """Tokens/s over steps 2..end (step 1 pays one-off costs)."""
    lines = [json.loads(x) for x in metrics_file.read_text().splitlines()]
    tokens = lines[-1]["tokens"] - lines[0]["tokens"]
    seconds = sum(x["step_seconds"] for x in lines[1:])
    return tokens / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--num-experts", type=int, default=6)
    parser.add_argument("--r", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4, help="steps per run (the first is not timed)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    base, tokenizer = load_base_model(args.model), load_tokenizer(args.model)
    results: dict[str, list[float]] = {"loramoe": [], "lora": []}
    with tempfile.TemporaryDirectory() as tmp:
        warm = TrainConfig(model=args.model, data=[args.data], output_dir=f"{tmp}/warm-up", batch_size=args.batch_size,
                           max_seq_len=args.max_seq_len, max_steps=2, progress=False)  # fmt: skip
        train(warm, model=copy.deepcopy(base), tokenizer=tokenizer)  # untimed: first-use costs of the process
        for round_ in range(args.rounds):
            for method in ("loramoe", "lora") if round_ % 2 == 0 else ("lora", "loramoe"):
                cfg = TrainConfig(
                    model=args.model, data=[args.data], output_dir=f"{tmp}/{method}-{round_}", method=method,
                    num_experts=args.num_experts, r=args.r, batch_size=args.batch_size, max_seq_len=args.max_seq_len,
                    max_steps=args.steps, progress=False, seed=round_,
                )  # fmt: skip
                start = time.perf_counter()
                train(cfg, model=copy.deepcopy(base), tokenizer=tokenizer)
                rate = steady_tokens_per_s(Path(cfg.output_dir) / "metrics.jsonl")
                results[method].append(rate)
                print(f"round {round_} {method:8s} {rate:8.1f} tokens/s  ({time.perf_counter() - start:.1f} s)", flush=True)

    moe, lora = statistics.median(results["loramoe"]), statistics.median(results["lora"])
    print(f"\nmodel {args.model}, batch {args.batch_size} x <= {args.max_seq_len} tokens, torch threads "
          f"{torch.get_num_threads()}, {args.rounds} rounds x {args.steps - 1} timed steps")  # fmt: skip
    print(f"LoRAMoE N={args.num_experts} r={args.r} (+LBC): median {moe:.1f} tokens/s  runs {[round(x) for x in results['loramoe']]}")
    print(f"LoRA r={args.num_experts * args.r}:            median {lora:.1f} tokens/s  runs {[round(x) for x in results['lora']]}")
    print(f"ratio LoRAMoE / LoRA = {moe / lora:.3f}")


if __name__ == "__main__":
    main()
