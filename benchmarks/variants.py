"""bf16 autocast and torch.compile variants of the targets' layer case, side by side (not part of ``make bench``:
compiling takes a minute or more on this machine).

    python -m benchmarks.variants            # writes benchmarks/results/variants.json and prints a table
"""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import torch
from torch import nn

from .layer_bench import LayerCase
from .measure import time_interleaved
from .methods import build_layer

RESULTS = Path(__file__).parent / "results"


def run(case: LayerCase, rounds: int) -> dict:
    torch.manual_seed(0)
    base = nn.Linear(case.d_in, case.d_out, bias=False).requires_grad_(False)
    x = torch.randn(1, case.tokens, case.d_in, requires_grad=True)
    grad = torch.randn(1, case.tokens, case.d_out)
    layers = {m: build_layer(m, base, case.n_experts, case.r, case.dropout).train() for m in ("lora", "loramoe")}
    layers["base"] = base

    def step(layer: nn.Module, bf16: bool):
        def run_step() -> None:
            x.grad = None
            layer.zero_grad(set_to_none=True)
            ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
            with ctx:
                y = layer(x)
            y.backward(grad.to(y.dtype))

        return run_step

    fns = {f"{m} fp32": step(layer, False) for m, layer in layers.items()}
    fns |= {f"{m} bf16": step(layer, True) for m, layer in layers.items()}
    for m in ("base", "loramoe"):
        fns[f"{m} compiled"] = step(torch.compile(layers[m]), False)
    pairs = [("loramoe fp32", "base fp32"), ("loramoe bf16", "base bf16"), ("lora bf16", "base bf16"),
             ("loramoe bf16", "loramoe fp32"), ("loramoe compiled", "base compiled"),
             ("loramoe compiled", "loramoe fp32"), ("base compiled", "base fp32")]
    timing = time_interleaved(fns, rounds, 0.05, pairs)
    return {"case": case.__dict__, "ms": timing.ms, "ratios": timing.ratios, "rounds": rounds,
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.variants", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "variants.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = run(LayerCase(6, 2048, 1024, 2752), args.rounds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print("| variant | ms |\n| --- | --- |")
    for name, ms in result["ms"].items():
        print(f"| {name} | {ms:.1f} |")
    print("\n" + ", ".join(f"{k}: {v:.2f}" for k, v in result["ratios"].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
