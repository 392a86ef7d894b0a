"""Serving throughput: vLLM base, vLLM + the LoRAMoE plugin, and transformers + PEFT + LoRAMoE on the same prompts.

    .venv-vllm/bin/python -m benchmarks.vllm_serving --base BASE_FOLDER --adapter ADAPTER [--threads 1]

Run in the vLLM venv (README "Serve it"). Each engine runs in a process of its own, one at a time (an engine
takes GiBs), in the order base, loramoe, peft, ``--runs`` times (with 2 and more, a change of load on a shared
machine shows as a spread rather than as a ratio). In each process: one warm-up generation, then
``--repeats`` timed generations of every prompt at once (greedy, exactly ``--tokens`` new tokens each); tokens/s
is the best repeat's. Memory: the resident set of the engine's processes (vLLM: the front end, the engine core
and its worker) after the timing. Also printed: how many prompts vLLM + LoRAMoE continues token for token as
PEFT does (the compiled path's parity; the tests check the eager one).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

TOPICS = ["the sea", "a lighthouse keeper", "volcanoes", "a robot learning to paint", "bread", "the moon", "winter",
          "an old library", "trains", "a lost cat", "mathematics", "the desert", "bees", "a violin", "rain",
          "a mountain village", "chess", "the first computer", "coffee", "a storm", "friendship", "maps", "clocks",
          "a garden", "whales", "the city at night", "an inventor", "snow", "a market", "birds", "a bridge",
          "the stars"]  # fmt: skip


def _prompts(base: str, n: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    return [tok(f"Write a short story about {TOPICS[i % len(TOPICS)]}.").input_ids for i in range(n)]


def _tree_rss(pid: int) -> int:
    import psutil

    proc = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)])


def _measure(kind: str, args) -> dict:
    """One engine in this process: warm-up, timed repeats, memory."""
    prompts = _prompts(args.base, args.prompts)
    if kind == "peft":
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        import loramoe  # noqa: F401  (registers the PEFT method)

        torch.set_num_threads(args.threads)
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(args.base, dtype=torch.float32),
                                          args.adapter).eval()  # fmt: skip
        width = max(map(len, prompts))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])  # left-padded batch
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

        def run() -> list[list[int]]:
            with torch.no_grad():
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.tokens,
                                     min_new_tokens=args.tokens, do_sample=False, pad_token_id=0)  # fmt: skip
            return out[:, width:].tolist()
    else:
        from vllm import LLM, SamplingParams

        from loramoe.vllm.adapter import ADAPTER_KEY

        overrides = {"architectures": ["LoraMoeLlamaForCausalLM"], ADAPTER_KEY: args.adapter} if kind == "loramoe" else None
        llm = LLM(model=args.base, dtype="float32", max_model_len=512, seed=0, hf_overrides=overrides)
        params = SamplingParams(temperature=0, max_tokens=args.tokens, min_tokens=args.tokens)

        def run() -> list[list[int]]:
            outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
            return [list(o.outputs[0].token_ids) for o in outs]

    tokens = run()  # warm-up
    seconds = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    total = sum(map(len, tokens))
    return {"kind": kind, "tokens_per_s": [total / s for s in seconds], "rss_gib": _tree_rss(os.getpid()) / 2**30,
            "tokens": tokens}  # fmt: skip


def _child_argv(kind: str, args, out: str) -> list[str]:
    return [sys.executable, "-m", "benchmarks.vllm_serving", "--child", kind, "--child-out", out, "--base", args.base,
            "--adapter", args.adapter, "--prompts", str(args.prompts), "--tokens", str(args.tokens), "--repeats",
            str(args.repeats), "--threads", str(args.threads)]  # fmt: skip


def _run_child(kind: str, args) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
           "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "0" if args.threads == 1 else f"0-{args.threads - 1}")}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:  # a file, not stdout: vLLM prints there too
        out = os.path.join(tmp, "result.json")
        proc = subprocess.run(_child_argv(kind, args, out), env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{kind} failed:\n{proc.stderr[-4000:]}")
        with open(out) as f:
            return json.load(f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="Hugging Face model folder (Llama architecture)")
    parser.add_argument("--adapter", required=True, help="LoRAMoE adapter folder")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per prompt")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of each engine (vLLM: cores 0..n-1)")
    parser.add_argument("--runs", type=int, default=1, help="processes per engine (order: base, loramoe, peft)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        with open(args.child_out, "w") as f:
            json.dump(_measure(args.child, args), f)
        return

    load = os.getloadavg()[0]
    results: dict[str, list[dict]] = {"base": [], "loramoe": [], "peft": []}
    for kind in ("base", "loramoe", "peft") * args.runs:
        results[kind].append(_run_child(kind, args))
        print(f"{kind}: {[round(x, 1) for x in results[kind][-1]['tokens_per_s']]} tokens/s", flush=True)
    best = {kind: max(max(r["tokens_per_s"]) for r in runs) for kind, runs in results.items()}
    same = sum(a == b for a, b in zip(results["loramoe"][0]["tokens"], results["peft"][0]["tokens"]))
    print(f"\n{args.prompts} prompts x {args.tokens} new tokens, greedy, fp32, {args.threads} thread(s) per engine; "
          f"load average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end\n")  # fmt: skip
    print("| engine | tokens/s (best of each run) | vs vLLM base | memory (GiB, resident) |")
    print("|---|---|---|---|")
    names = {"base": "vLLM, base model", "loramoe": "vLLM + LoRAMoE plugin", "peft": "transformers + PEFT + LoRAMoE"}
    for kind, runs in results.items():
        per_run = ", ".join(f"{max(r['tokens_per_s']):.1f}" for r in runs)
        rss = ", ".join(f"{r['rss_gib']:.2f}" for r in runs)
        print(f"| {names[kind]} | {per_run} | {best[kind] / best['base']:.3f}x | {rss} |")
    print(f"\nvLLM + LoRAMoE continues {same}/{args.prompts} prompts token for token as PEFT does")


if __name__ == "__main__":
    main()
