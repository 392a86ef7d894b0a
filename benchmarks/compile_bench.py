"""torch.compile against eager, side by side in one run: the layer (forward + backward, training mode) and a
training step of the small LLaMA, each method eager and compiled. Compiling is timed separately (first call).

    python -m benchmarks.compile_bench            # ~10-15 min on 2 shared CPU cores; writes results/compile.json
    python -m benchmarks.compile_bench --quick    # smaller shapes (numbers indicative only)

Compiled as `loramoe train --compile` does it: the layer with ``fullgraph=True``, the model's causal LM in place
(`loramoe.train.compile_model`), the PEFT wrapper and its LBC eager.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .layer_bench import LayerCase
from .measure import saved_tensor_bytes, time_interleaved
from .methods import build_layer
from .model_bench import ModelCase, Runner, _base_model
from .run import machine

RESULTS = Path(__file__).parent / "results"
LAYER_METHODS = ("base", "lora", "loramoe")
MODEL_METHODS = ("lora", "loramoe")


def _pairs(methods: tuple[str, ...]) -> list[tuple[str, str]]:
    pairs = [(f"{m} compiled", f"{m} eager") for m in methods]
    pairs += [(f"loramoe {mode}", f"{m} {mode}") for mode in ("eager", "compiled") for m in methods if m != "loramoe"]
    return pairs


def _first_call_seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_layer(case: LayerCase, rounds: int) -> dict:
    torch.manual_seed(0)
    base = nn.Linear(case.d_in, case.d_out, bias=False).requires_grad_(False)
    layers = {m: build_layer(m, base, case.n_experts, case.r, case.dropout).train() for m in LAYER_METHODS}
    x = torch.randn(1, case.tokens, case.d_in, requires_grad=True)
    grad = torch.randn(1, case.tokens, case.d_out)

    def step(module: nn.Module, owner: nn.Module) -> Callable[[], None]:
        def run() -> None:
            x.grad = None
            owner.zero_grad(set_to_none=True)
            module(x).backward(grad)

        return run

    fns, compile_s = {}, {}
    for m, layer in layers.items():
        fns[f"{m} eager"] = step(layer, layer)
        fns[f"{m} compiled"] = step(torch.compile(layer, fullgraph=m != "lora"), layer)  # PEFT's LoRA may break
        compile_s[m] = _first_call_seconds(fns[f"{m} compiled"])
    timing = time_interleaved(fns, rounds, 0.05, _pairs(LAYER_METHODS))
    frozen = [base.weight, *layers["loramoe"].parameters()]
    compiled = torch.compile(layers["loramoe"], fullgraph=True)
    saved = {"loramoe eager": saved_tensor_bytes(lambda: layers["loramoe"](x), frozen),
             "loramoe compiled": saved_tensor_bytes(lambda: compiled(x), frozen)}  # fmt: skip
    return {"case": case.__dict__, "ms": timing.ms, "ratios": timing.ratios, "compile_s": compile_s,
            "saved_bytes": saved, "rounds": rounds}  # fmt: skip


def run_model(case: ModelCase, rounds: int) -> dict:
    base = _base_model(case)
    fns, compile_s = {}, {}
    for m in MODEL_METHODS:
        eager, compiled = Runner(m, base, case, case.n_experts), Runner(m, base, case, case.n_experts)
        compiled.model.get_base_model().compile()  # what loramoe.train.compile_model does
        fns[f"{m} eager"], fns[f"{m} compiled"] = eager.train_step, compiled.train_step
        compile_s[m] = _first_call_seconds(compiled.train_step)
    timing = time_interleaved(fns, rounds, 0.05, _pairs(MODEL_METHODS))
    tokens = case.batch * case.seq
    return {"case": case.__dict__, "ms": timing.ms, "ratios": timing.ratios, "compile_s": compile_s,
            "tokens_per_s": {k: tokens / (ms / 1e3) for k, ms in timing.ms.items()}, "rounds": rounds}  # fmt: skip


def _table(title: str, result: dict) -> str:
    lines = [f"{title}: {result['case']}", "| variant | ms | compile s |", "| --- | --- | --- |"]
    for name, ms in result["ms"].items():
        method, mode = name.split(" ")
        compile_s = f"{result['compile_s'][method]:.1f}" if mode == "compiled" else ""
        lines.append(f"| {name} | {ms:.1f} | {compile_s} |")
    lines.append(", ".join(f"{k}: {v:.3f}" for k, v in result["ratios"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compile_bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller shapes, fewer rounds")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "compile.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        layer_case = LayerCase(6, 512, 1024, 2752)
        model_case = ModelCase(hidden=256, intermediate=688, layers=2, heads=4, vocab=4096, batch=2, seq=64)
    else:
        layer_case, model_case = LayerCase(6, 2048, 1024, 2752), ModelCase()
    start = time.perf_counter()
    result = {"layer": run_layer(layer_case, args.rounds), "model": run_model(model_case, args.rounds),
              "machine": machine(), "command": "python -m benchmarks.compile_bench" + (" --quick" if args.quick else "")}
    result["seconds"] = time.perf_counter() - start
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(_table("layer, forward + backward", result["layer"]))
    print(f"saved for backward (bytes): {result['layer']['saved_bytes']}")
    print(_table("\nmodel training step", result["model"]))
    print(f"\n{result['seconds']:.0f} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
