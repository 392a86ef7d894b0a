"""Turn a results dict into the targets check, markdown tables (``latest.md``) and the time-vs-N plot.

    python -m benchmarks.report benchmarks/results/latest.json     # rewrite latest.md and the plot from the JSON
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

from .methods import METHODS

MB = 2**20


def main_case(results: dict) -> dict:
    """The layer case the targets refer to: N = 6, 2048 tokens, 1024 -> 2752, dropout 0.05 when it was run,
    else the first case with N = 6 (quick and tiny plans), else the first case."""
    layers = results["layer"]
    exact = [c for c in layers if (c["n_experts"], c["tokens"], c["d_in"], c["d_out"], c["dropout"])
             == (6, 2048, 1024, 2752, 0.05)]
    return (exact or [c for c in layers if c["n_experts"] == 6] or layers)[0]


def targets(results: dict) -> list[dict]:
    """The issue's targets with the measured values: ``met`` is ``value <= limit`` (or ``>=`` for ``min``)."""
    case, model = main_case(results), results["model"]
    sweep = model["n_sweep"]
    lo, hi = sweep["n_experts"][0], sweep["n_experts"][-1]
    where = f"layer N={case['n_experts']}, {case['tokens']} tokens, {case['d_in']}->{case['d_out']}, fwd+bwd"
    rows = [
        ("loramoe / loop time", case["ratios"]["loramoe/loop"], 0.40, "max", where),
        ("loramoe / lora (rank N*r) time", case["ratios"]["loramoe/lora"], 1.05, "max", where),
        ("loramoe / base time", case["ratios"]["loramoe/base"], 1.25, "max", where),
        ("loramoe / loop saved-for-backward bytes", case["saved_bytes"]["loramoe"] / case["saved_bytes"]["loop"],
         0.5, "max", where),
        ("model: loramoe / lora training step", model["train_ratios"]["loramoe/lora"], 1.10, "max",
         f"AdamW step, N={model['n_experts']}"),
        ("model: loramoe / base generate() tokens/s", model["generate_ratios"]["loramoe/base"], 0.85, "min",
         "greedy, batch 1"),
        (f"model: loramoe N={hi} / N={lo} training step", sweep["ratios"][f"loramoe@{hi}/loramoe@{lo}"], 1.3, "max",
         "AdamW step"),
    ]
    return [{"target": name, "value": value, "limit": limit, "kind": kind, "case": case_,
             "met": value <= limit if kind == "max" else value >= limit} for name, value, limit, kind, case_ in rows]


def _row(cells: list) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _table(header: list[str], rows: list[list]) -> list[str]:
    return [_row(header), _row(["---"] * len(header)), *(_row(r) for r in rows)]


def markdown(results: dict) -> str:
    m = results["machine"]
    load = results["load_average_1min"]
    lines = [
        f"Command: `{results['command']}` ({results['seconds']:.0f} s). Machine: {m['cpu']}, {m['cpu_count']} cores, "
        f"torch {m['torch']}, {m['torch_threads']} thread(s); 1-min load average {load['start']:.1f} at the start, "
        f"{load['end']:.1f} at the end.",
        "",
        "### Targets",
        "",
        *_table(["target", "measured", "limit", "met", "case"],
                [[t["target"], f"{t['value']:.3f}", ("<= " if t["kind"] == "max" else ">= ") + f"{t['limit']}",
                  "yes" if t["met"] else "**no**", t["case"]] for t in results["targets"]]),
        "",
        "### Layer, forward + backward (training mode)",
        "",
        "Median ms over interleaved rounds; ratios are medians of per-round ratios. Saved = bytes autograd keeps "
        "for backward (parameters excluded); peak = peak bytes of tensors allocated during the step.",
        "",
    ]
    rows = []
    for c in results["layer"]:
        ms, r, s, p = c["ms"], c["ratios"], c["saved_bytes"], c["peak_bytes"]
        rows.append([f"{c['d_in']}->{c['d_out']}", c["tokens"], c["n_experts"], c["dropout"], c["rounds"],
                     *(f"{ms[k]:.1f}" for k in METHODS),
                     *(f"{r[k]:.2f}" for k in ("loramoe/base", "loramoe/lora", "loramoe/loop")),
                     " / ".join(f"{s[k] / MB:.1f}" for k in METHODS), " / ".join(f"{p[k] / MB:.0f}" for k in METHODS)])
    lines += _table(["in->out", "tokens", "N", "dropout", "rounds", *(f"{k} ms" for k in METHODS), "loramoe/base",
                     "loramoe/lora", "loramoe/loop", "saved MB (b/l/m/loop)", "peak MB (b/l/m/loop)"], rows)
    lines += ["", "### Layer, forward only (eval, no_grad)", ""]
    rows = [[f"{c['d_in']}->{c['d_out']}", c["tokens"], c["n_experts"], c["dropout"],
             *(f"{c['ms_forward'][k]:.1f}" for k in METHODS),
             *(f"{c['ratios_forward'][k]:.2f}" for k in ("loramoe/base", "loramoe/lora", "loramoe/loop"))]
            for c in results["layer"]]
    lines += _table(["in->out", "tokens", "N", "dropout (off in eval)", *(f"{k} ms" for k in METHODS),
                     "loramoe/base", "loramoe/lora", "loramoe/loop"], rows)

    model = results["model"]
    cfg = model["config"]
    lines += [
        "",
        f"### Model: LLaMA hidden {cfg['hidden']}, FFN {cfg['intermediate']}, {cfg['layers']} layers, vocab "
        f"{cfg['vocab']}; N = {model['n_experts']}, r = {cfg['r']}, dropout {cfg['dropout']}",
        "",
        f"Training step: batch {cfg['batch']} x {cfg['seq']} tokens, forward + backward + AdamW (base: forward + "
        f"backward to the input embeddings, no optimizer). generate(): greedy, prompt {cfg['prompt']}, "
        f"{cfg['new_tokens']} new tokens, KV cache (tokens/s = new tokens / time of the whole call, prefill "
        f"included). {model['rounds']} rounds of training steps, {model['generate_rounds']} of generate().",
        "",
    ]
    tr, gr = model["train_ratios"], model["generate_ratios"]
    rows = []
    for k in METHODS:
        rows.append([k, f"{model['train_step_ms'][k]:.1f}", f"{tr.get(f'{k}/base', 1.0):.2f}",
                     f"{model['generate_tokens_per_s'][k]:.1f}", f"{gr.get(f'{k}/base', 1.0):.2f}",
                     f"{model['saved_bytes'][k] / MB:.1f}", f"{model['peak_bytes'][k] / MB:.1f}"])
    lines += _table(["method", "train step ms", "x base", "generate tok/s", "x base", "saved MB", "peak MB"], rows)
    lines.append("")
    lines.append(f"loramoe / lora training step: {tr['loramoe/lora']:.2f}; loramoe / loop: {tr['loramoe/loop']:.2f}; "
                 f"generate loramoe / lora: {gr['loramoe/lora']:.2f}.")
    sweep = model["n_sweep"]
    lines += ["", f"Training step across N (LoRAMoE and the loop, interleaved, {sweep['rounds']} rounds):", ""]
    lines += _table(["N", "loramoe ms", "loop ms"],
                    [[n, f"{sweep['train_step_ms']['loramoe'][i]:.1f}", f"{sweep['train_step_ms']['loop'][i]:.1f}"]
                     for i, n in enumerate(sweep["n_experts"])])
    lines += ["", ", ".join(f"{k}: {v:.2f}" for k, v in sweep["ratios"].items()), ""]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    """Time vs N at the shape with the most expert counts, as a multiple of the frozen base layer's time (the
    median of per-round ratios, which cancels most of the shared machine's drifting load); two panels:
    forward+backward and forward only."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[tuple, list[dict]] = defaultdict(list)
    for c in results["layer"]:
        groups[(c["d_in"], c["d_out"], c["tokens"], c["dropout"])].append(c)
    (d_in, d_out, tokens, dropout), cases = max(groups.items(), key=lambda kv: len(kv[1]))
    cases.sort(key=lambda c: c["n_experts"])
    ns = [c["n_experts"] for c in cases]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"base": ("k", "--"), "lora": ("tab:blue", "-."), "loramoe": ("tab:green", "-"), "loop": ("tab:red", ":")}
    panels = (("ms", "ratios", "forward + backward (training)"), ("ms_forward", "ratios_forward", "forward only (eval)"))
    for ax, (ms_key, ratio_key, title) in zip(axes, panels):
        for m in METHODS:
            color, ls = styles[m]
            ys = [1.0 if m == "base" else c[ratio_key][f"{m}/base"] for c in cases]
            ax.plot(ns, ys, color=color, linestyle=ls, marker="o", label="lora (rank N*r)" if m == "lora" else m)
        base_ms = [c[ms_key]["base"] for c in cases]
        ax.set_xlabel("experts N (r = 4 each)")
        ax.set_ylabel(f"time / base time (base: {min(base_ms):.0f}-{max(base_ms):.0f} ms)")
        ax.set_xticks(ns)
        ax.set_ylim(bottom=0)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    threads = results["machine"]["torch_threads"]
    fig.suptitle(f"One linear {d_in}->{d_out}, {tokens} tokens, dropout {dropout}; CPU, {threads} thread(s); "
                 "medians of interleaved rounds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(results: dict, md_path: Path, png_path: Path) -> None:
    md_path.write_text(markdown(results))
    plot(results, png_path)


if __name__ == "__main__":
    source = Path(sys.argv[1])
    write_report(json.loads(source.read_text()), source.with_suffix(".md"), source.parent / "time_vs_n.png")
