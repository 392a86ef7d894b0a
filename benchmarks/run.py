"""Run the benchmarks and write ``benchmarks/results/latest.json`` (+ ``latest.md`` tables and ``time_vs_n.png``).

    python -m benchmarks.run            # full run, ~6-8 minutes on 2 shared CPU cores (also: make bench)
    python -m benchmarks.run --quick    # a smaller plan, under a minute
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .layer_bench import LayerCase, run_layer_case
from .model_bench import ModelCase, run_model_case
from .report import targets, write_report

RESULTS = Path(__file__).parent / "results"
MAIN = (1024, 2752)  # LLaMA-like FFN in/out (hidden 1024, intermediate 2752)
BIG = (2048, 5504)


@dataclass
class Plan:
    """What to run: layer cases with their number of rounds, the model case, its N sweep."""

    layer_cases: list[tuple[LayerCase, int]]
    model_case: ModelCase
    model_rounds: int
    generate_rounds: int  # decoding at batch 1 is the noisiest measurement: more rounds
    n_sweep: tuple[int, ...]
    sweep_rounds: int
    min_seconds: float  # one timed sample repeats a call until it lasts this long


def full_plan() -> Plan:
    """~6 minutes: the targets' case gets the most rounds; the sweeps around it fewer."""
    cases = [(LayerCase(n, 2048, *MAIN), 7 if n == 6 else 3) for n in (2, 4, 6, 8, 16)]
    cases.append((LayerCase(6, 2048, *MAIN, dropout=0.0), 3))
    cases += [(LayerCase(6, t, *MAIN), 3) for t in (512, 8192)]
    cases += [(LayerCase(6, t, *BIG), 3) for t in (512, 2048)]
    return Plan(cases, ModelCase(), model_rounds=5, generate_rounds=9, n_sweep=(2, 16), sweep_rounds=3,
                min_seconds=0.05)


def quick_plan() -> Plan:
    cases = [(LayerCase(n, 512, *MAIN), 3) for n in (2, 6, 16)]
    model = ModelCase(hidden=256, intermediate=688, layers=2, heads=4, vocab=4096, batch=2, seq=64, new_tokens=16)
    return Plan(cases, model, model_rounds=3, generate_rounds=3, n_sweep=(2, 16), sweep_rounds=3,
                min_seconds=0.02)


def tiny_plan() -> Plan:
    """Minuscule shapes: checks that everything runs and the output schema, in a few seconds (tests)."""
    cases = [(LayerCase(n, 16, 32, 48), 2) for n in (2, 4)]
    model = ModelCase(hidden=32, intermediate=48, layers=1, heads=4, vocab=64, batch=2, seq=8, prompt=4,
                      new_tokens=2)
    return Plan(cases, model, model_rounds=2, generate_rounds=2, n_sweep=(2, 4), sweep_rounds=2,
                min_seconds=0.0)


def machine() -> dict:
    cpu = platform.processor()
    if Path("/proc/cpuinfo").exists():
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def run(plan: Plan, out: Path, command: str) -> dict:
    started = time.time()
    load_before = os.getloadavg()
    results: dict = {"command": command, "machine": machine(), "layer": []}
    for case, rounds in plan.layer_cases:
        print(f"layer {case}, {rounds} rounds", flush=True)
        results["layer"].append(run_layer_case(case, rounds, plan.min_seconds))
    print(f"model {plan.model_case}, {plan.model_rounds} rounds", flush=True)
    results["model"] = run_model_case(plan.model_case, plan.model_rounds, plan.generate_rounds, plan.min_seconds,
                                      plan.n_sweep, plan.sweep_rounds)
    results["load_average_1min"] = {"start": load_before[0], "end": os.getloadavg()[0]}
    results["seconds"] = time.time() - started
    results["targets"] = targets(results)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(out)
    write_report(results, out.with_suffix(".md"), out.parent / "time_vs_n.png")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a smaller plan that runs in under a minute")
    size.add_argument("--tiny", action="store_true", help="minuscule shapes, for smoke tests (numbers meaningless)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared 2-core machine a second thread mostly waits)")
    parser.add_argument("--out", type=Path, default=RESULTS / "latest.json", help="the JSON to write")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    plan = tiny_plan() if args.tiny else quick_plan() if args.quick else full_plan()
    command = "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:])
    results = run(plan, args.out, command.strip())
    print(f"wrote {args.out} in {results['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
