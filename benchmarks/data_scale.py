"""The data path at scale: `loramoe train` on a million generated reference-format records.

    python -m benchmarks.data_scale generate runs/scale/data.jsonl --records 1000000
    python -m benchmarks.data_scale run runs/scale --data runs/scale/data.jsonl
    python -m benchmarks.data_scale run runs/scale-old --data runs/scale/data200k.jsonl --phases cold1 \\
        --src /path/to/an/older/checkout/src          # the same measurement of another version of loramoe

``generate`` writes records whose lengths, in tokens of the tiny model's byte tokenizer (one token per byte,
``examples/make_tiny_model.py``), follow the reference data's (SmolLM2 tokenizer: median 97, p90 519, max 1,899):
a log-normal with that median and p90, cut at 1,899. ``run`` trains the tiny model (hidden 64, 2 layers) for one
step, ``--max-seq-len 1024``, batch 8, in fresh processes, each phase with its own command line:

- ``cold1``: 1 process, empty cache, ``--num-proc 1``: the build by one worker, and the peak memory of a run that
  builds;
- ``warm1``: 1 process, the cache of ``cold1``: time to the first step when nothing is tokenised;
- ``cold2``: ``torchrun --nproc_per_node 2``, empty cache, ``--num-proc 2``: the build by two workers (one rank
  builds, the other waits and maps it);
- ``warm2``: ``torchrun --nproc_per_node 2``, the cache of ``cold2``.

Per process it reports the peak resident memory (VmHWM) after the first step, the seconds from the process's
start to the end of the first step, the seconds spent in `load_instruction_data` (the data path: hashing the
file, building or mapping the cache, mixing), and the peak of its children (the build's workers, from getrusage); the
build's own time comes from the cache's log line. The table goes to stdout and ``<out>/results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
MEDIAN, P90, LONGEST = 97, 519, 1899  # reference data, SmolLM2 tokens
PHASES = {"cold1": (1, 1, "one"), "warm1": (1, 1, "one"), "cold2": (2, 2, "two"), "warm2": (2, 2, "two")}


# ---- generate -------------------------------------------------------------------------------------------------


def sample_lengths(n: int, seed: int) -> np.ndarray:
    """Token counts of a log-normal with the reference median and p90, cut to [8, LONGEST]."""
    rng = np.random.default_rng(seed)
    sigma = (np.log(P90) - np.log(MEDIAN)) / 1.2815515655446004  # z of the 90th percentile
    return np.clip(np.round(rng.lognormal(np.log(MEDIAN), sigma, n)), 8, LONGEST).astype(int)


def generate(path: Path, records: int, seed: int) -> None:
    """Reference-format records ({"instruction", "input", "output", "task_type"}) of those lengths in byte tokens:
    prompt (instruction [+ "\\n" + input]) + EOS + output + EOS."""
    lengths = sample_lengths(records, seed)
    rng = random.Random(seed)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(5000)]
    pool = " ".join(rng.choice(words) for _ in range(1_000_000))
    with open(path, "w") as f:
        for total in lengths.tolist():
            text = total - 2  # two EOS
            output = max(1, round(text * rng.uniform(0.1, 0.9)))
            prompt = max(1, text - output)
            with_input = prompt > 3 and rng.random() < 0.5
            instruction = prompt - (prompt // 2 if with_input else 0)
            extra = prompt - instruction - 1 if with_input else 0  # "\n" joins them

            def piece(n: int) -> str:
                start = rng.randrange(len(pool) - n)
                return pool[start : start + n]

            record = {"instruction": piece(instruction), "input": piece(extra) if extra > 0 else "",
                      "output": piece(output), "task_type": rng.choice(("knowledge", "downstream", "downstream"))}  # fmt: skip
            f.write(json.dumps(record) + "\n")
    q = np.percentile(lengths, [50, 90, 100])
    print(f"{path}: {records} records, {path.stat().st_size / 2**20:.0f} MiB; byte tokens: median {q[0]:.0f}, "
          f"p90 {q[1]:.0f}, max {q[2]:.0f}, total {lengths.sum():,}")  # fmt: skip


# ---- one training process (run by `run`, under torchrun or not) ------------------------------------------------


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])  # kB
    raise KeyError(key)


def _age() -> float:
    """Seconds since this process started (Linux /proc)."""
    start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return uptime - start_ticks / os.sysconf("SC_CLK_TCK")


def driver(argv: list[str], results: Path) -> int:
    """``loramoe train`` with the first step timed and the peak memory read at its end."""
    import loramoe.train as train
    from loramoe import cli

    seen: dict[str, float] = {}
    inner = train._forward_backward

    def first_step(*args, **kwargs):
        out = inner(*args, **kwargs)
        if "first_step_s" not in seen:
            seen.update(first_step_s=_age(), vmhwm_first_step_kb=_status("VmHWM"))
        return out

    train._forward_backward = first_step
    load = train.load_instruction_data

    def timed_load(*args, **kwargs):
        start = time.perf_counter()
        data = load(*args, **kwargs)
        seen.setdefault("data_s", 0.0)
        seen["data_s"] += time.perf_counter() - start  # --data (and --eval-file): to the dataset, cache included
        return data

    train.load_instruction_data = timed_load
    code = cli.main(["train", *argv])
    rank = int(os.environ.get("RANK", "0"))
    seen.update(rank=rank, exit_code=code, vmhwm_exit_kb=_status("VmHWM"),
                children_maxrss_kb=resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)  # fmt: skip
    (results / f"rank{rank}.json").write_text(json.dumps(seen))
    return code


# ---- run ----------------------------------------------------------------------------------------------------------


def run(out: Path, data: Path, phases: list[str], src: Path, batch_size: int, max_seq_len: int) -> None:
    sys.path.insert(0, str(REPO / "examples"))
    from make_tiny_model import make_tiny_llama

    out.mkdir(parents=True, exist_ok=True)
    model = out / "tiny-llama"
    if not (model / "config.json").is_file():
        make_tiny_llama(model, hidden=64, layers=2)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": f"{src}{os.pathsep}{REPO}"}
    table = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else {}
    for phase in phases:
        nproc, num_proc, cache = PHASES[phase]
        results = out / "results" / phase
        results.mkdir(parents=True, exist_ok=True)
        for old in results.glob("rank*.json"):
            old.unlink()
        train_args = ["--model", str(model), "--data", str(data), "--output-dir", str(out / "runs" / phase),
                      "--overwrite", "--max-steps", "1", "--batch-size", str(batch_size), "--max-seq-len",
                      str(max_seq_len), "--num-experts", "2", "--r", "2", "--no-progress", "--num-proc", str(num_proc),
                      "--cache-dir", str(out / f"cache-{cache}")]  # fmt: skip
        if not (src / "loramoe" / "data" / "cache.py").is_file():  # a loramoe from before the cache
            train_args = train_args[: train_args.index("--num-proc")]
        me = [sys.executable, "-m", "benchmarks.data_scale", "driver", str(results), "--"]
        if nproc > 1:
            me = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m",
                  "benchmarks.data_scale", "driver", str(results), "--"]  # fmt: skip
        start = time.perf_counter()
        proc = subprocess.run(me + train_args, env=env, cwd=REPO, capture_output=True, text=True)
        wall = time.perf_counter() - start
        (results / "stdout.txt").write_text(proc.stdout)
        (results / "stderr.txt").write_text(proc.stderr)
        if proc.returncode != 0:
            raise SystemExit(f"{phase}: exit {proc.returncode}; see {results}/stderr.txt\n{proc.stderr[-2000:]}")
        built = re.findall(r"built \S+ in ([0-9.]+) s", proc.stdout)
        ranks = [json.loads(p.read_text()) for p in sorted(results.glob("rank*.json"))]
        table[phase] = {"processes": nproc, "num_proc": num_proc, "wall_s": round(wall, 1),
                        "builds": len(built), "build_s": float(built[0]) if built else None,
                        "reused": proc.stdout.count(": reusing "), "ranks": ranks,
                        "load_average": os.getloadavg()}  # fmt: skip
        (out / "results.json").write_text(json.dumps(table, indent=2))
        print(row(phase, table[phase]), flush=True)


def row(phase: str, r: dict) -> str:
    ranks = "; ".join(
        f"rank {x['rank']}: data path {x.get('data_s', float('nan')):.1f} s, first step at {x['first_step_s']:.1f} s, VmHWM {x['vmhwm_first_step_kb'] / 2**20:.2f} GiB "
        f"(exit {x['vmhwm_exit_kb'] / 2**20:.2f}), children peak {x['children_maxrss_kb'] / 2**20:.2f} GiB"
        for x in r["ranks"]
    )
    build = f"built once in {r['build_s']:.1f} s" if r["builds"] == 1 else f"{r['builds']} builds, {r['reused']} reused"
    return f"{phase}: {r['processes']} process(es), --num-proc {r['num_proc']}: {build}; {ranks}; wall {r['wall_s']} s"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="write generated reference-format records")
    g.add_argument("path", type=Path)
    g.add_argument("--records", type=int, default=1_000_000)
    g.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("run", help="the measurement")
    r.add_argument("out", type=Path)
    r.add_argument("--data", type=Path, required=True)
    r.add_argument("--phases", nargs="+", choices=list(PHASES), default=list(PHASES))
    r.add_argument("--src", type=Path, default=REPO / "src", help="the loramoe source tree to measure")
    r.add_argument("--batch-size", type=int, default=8)
    r.add_argument("--max-seq-len", type=int, default=1024)
    d = sub.add_parser("driver", help="(internal) one training process")
    d.add_argument("results", type=Path)
    d.add_argument("train_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    if args.command == "generate":
        generate(args.path, args.records, args.seed)
    elif args.command == "run":
        run(args.out, args.data.resolve(), args.phases, args.src.resolve(), args.batch_size, args.max_seq_len)
    else:
        sys.exit(driver([a for a in args.train_args if a != "--"], args.results))


if __name__ == "__main__":
    main()
