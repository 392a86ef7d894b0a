"""Each optimisation of the fused layer, measured: the layer as it was at successive git revisions, side by side.

Every revision in ``REVISIONS`` changed one thing in ``src/loramoe/layer.py``; its ``Linear`` is loaded from git
history (nothing is copied into the repo) and timed interleaved with the others around one shared base linear.

    python -m benchmarks.ablation           # writes benchmarks/results/ablation.json and prints tables
"""

from __future__ import annotations

import argparse
import json
import subprocess
import types
from pathlib import Path

import torch
from torch import nn

import loramoe
from loramoe import LoraMoeConfig

from .measure import saved_tensor_bytes, time_interleaved

RESULTS = Path(__file__).parent / "results"
REVISIONS = {
    "544ddbd": "before: plain autograd, residual added out of place",
    "14271f4": "custom Function: in-place residual addmm, 1-byte mask, joint router+A product",
    "04f9a06": "separate router and A products; scaling as the output GEMM's alpha",
    "ba24d49": "dropout mask from 16-bit lanes of 64-bit draws",
    "a0a97df": "mask applied as float through uint8",
}


def load_linear(revision: str) -> type:
    """``loramoe.layer.Linear`` as it was at ``revision`` (imports resolve against the installed package)."""
    root = Path(__file__).resolve().parent.parent
    source = subprocess.run(["git", "show", f"{revision}:src/loramoe/layer.py"], cwd=root, check=True,
                            capture_output=True, text=True).stdout
    module = types.ModuleType(f"loramoe._layer_{revision}")
    module.__package__ = loramoe.__name__
    exec(compile(source, f"layer.py@{revision}", "exec"), module.__dict__)
    return module.Linear


def run(revisions: list[str], dropout: float, tokens: int, rounds: int) -> dict:
    torch.manual_seed(0)
    base = nn.Linear(1024, 2752, bias=False).requires_grad_(False)
    config = LoraMoeConfig(num_experts=6, r=4, lora_dropout=dropout, init_weights=False)
    layers = {"base": base} | {rev: load_linear(rev)(base, "default", config).train() for rev in revisions}
    x = torch.randn(1, tokens, 1024, requires_grad=True)
    grad = torch.randn(1, tokens, 2752)

    def train_step(layer: nn.Module):
        def step() -> None:
            x.grad = None
            layer.zero_grad(set_to_none=True)
            layer(x).backward(grad)
        return step

    def decode_step(layer: nn.Module):
        one = x[:, :1].detach()

        def step() -> None:
            with torch.no_grad():
                layer(one)
        return step

    pairs = [(rev, "base") for rev in revisions]
    train = time_interleaved({k: train_step(v) for k, v in layers.items()}, rounds, 0.05, pairs)
    for layer in layers.values():
        layer.eval()
    decode = time_interleaved({k: decode_step(v) for k, v in layers.items()}, rounds, 0.2, pairs)
    for layer in layers.values():
        layer.train()
    saved = {k: saved_tensor_bytes(lambda v=v: v(x), [base.weight, *v.parameters()]) for k, v in layers.items()}
    return {"dropout": dropout, "tokens": tokens, "rounds": rounds, "train_ms": train.ms, "train_ratios": train.ratios,
            "decode_us": {k: v * 1e3 for k, v in decode.ms.items()}, "saved_bytes": saved}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ablation", description=__doc__.splitlines()[0])
    parser.add_argument("--revisions", nargs="+", default=list(REVISIONS))
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "ablation.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = [run(args.revisions, p, 2048, args.rounds) for p in (0.05, 0.0)]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"revisions": {r: REVISIONS.get(r, "") for r in args.revisions},
                                    "threads": args.threads, "results": results}, indent=1))
    for res in results:
        print(f"\ndropout {res['dropout']}, {res['tokens']} tokens, N = 6, 1024 -> 2752, {res['rounds']} rounds")
        print("| revision | change | fwd+bwd ms | / base | saved MB | decode step us (1 token, no grad) |")
        print("| --- | --- | --- | --- | --- | --- |")
        for key in ["base", *args.revisions]:
            ratio = res["train_ratios"].get(f"{key}/base", 1.0)
            print(f"| {key} | {REVISIONS.get(key, 'frozen linear alone')} | {res['train_ms'][key]:.1f} | {ratio:.2f} | "
                  f"{res['saved_bytes'][key] / 2**20:.1f} | {res['decode_us'][key]:.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
