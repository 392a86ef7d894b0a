"""Turn the runs of an experiment into report.json, report.md (the paper's Table 2 in miniature), forgetting.png
(scores against data scale: the paper's Figure 1 view) and routing.png (Figure 7), and say plainly whether the
paper's effect showed."""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .pipeline import METHODS, VALID_TASK
from .tasks import KNOWLEDGE_TASK

# what the issue asks LoRAMoE+LBC to reach
TARGETS = {"knowledge_retention": 0.90, "downstream_ratio": 0.95, "routing_gap": 0.20}


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(raw: dict[str, Any]) -> dict[str, Any]:
    """report.json's content from `run_experiment`'s result: means (and standard deviations) over seeds."""
    tasks = raw["downstream_tasks"]
    scales = raw["scales"]
    largest = max(scales)
    methods: dict[str, Any] = {}
    for method in [m for m in METHODS if any(r["method"] == m for r in raw["runs"])]:
        runs = [r for r in raw["runs"] if r["method"] == method]

        def at(scale: float, runs=runs) -> list[dict]:
            return [r for r in runs if r["scale"] in (scale, None)]  # base runs hold for every scale

        def stats(rs: list[dict]) -> dict[str, float]:
            wk = [r["scores"][KNOWLEDGE_TASK] for r in rs]
            ds = [_mean([r["scores"][t] for t in tasks]) for r in rs]
            return {"world_knowledge": _mean(wk), "world_knowledge_std": _std(wk),
                    "world_knowledge_valid": _mean([r["scores"][VALID_TASK] for r in rs]),
                    "downstream_mean": _mean(ds), "downstream_mean_std": _std(ds)}  # fmt: skip

        top = at(largest)
        methods[method] = {
            **stats(top),
            "downstream": {t: _mean([r["scores"][t] for r in top]) for t in tasks},
            "downstream_std": {t: _std([r["scores"][t] for r in top]) for t in tasks},
            "by_scale": [{"scale": s, **stats(at(s))} for s in scales],
            "trainable_params": top[0]["trainable_params"],
            "train_seconds": _mean([r["train_seconds"] for r in top]),
            "steps": top[0]["steps"],
        }
    routing = {}
    for method in ("loramoe_lbc", "loramoe"):
        shares = [r["knowledge_share"] for r in raw["runs"] if r["method"] == method and "knowledge_share" in r]
        if shares:
            routing[method] = {d: _mean([s[d] for s in shares]) for d in shares[0]}
    report = {
        "preset": raw["preset"], "seeds": raw["seeds"], "data_scales": scales, "methods": methods,
        "routing": {"method": "loramoe_lbc", "knowledge_share": routing.get("loramoe_lbc", {}), "by_method": routing},
        "data": raw["data"], "steps_per_scale": raw["steps"], "wall_seconds": raw["wall_seconds"],
    }  # fmt: skip
    report["verdict"] = verdict(report, tasks)
    return report


def verdict(report: dict[str, Any], tasks: list[str]) -> dict[str, Any]:
    """The measured answer to the paper's claims, as numbers against the targets (None where a method is missing)."""
    m = report["methods"]
    out: dict[str, Any] = {"targets": TARGETS}
    if "sft" in m:
        curve = [row["world_knowledge"] for row in m["sft"]["by_scale"]]
        out["sft_world_knowledge_by_scale"] = curve
        out["sft_forgets_more_with_more_data"] = len(curve) > 1 and curve[-1] < curve[0]
    if "base" in m and "loramoe_lbc" in m and m["base"]["world_knowledge"] > 0:
        out["knowledge_retention"] = m["loramoe_lbc"]["world_knowledge"] / m["base"]["world_knowledge"]
    if "sft" in m and "loramoe_lbc" in m and m["sft"]["downstream_mean"] > 0:
        out["downstream_ratio"] = m["loramoe_lbc"]["downstream_mean"] / m["sft"]["downstream_mean"]
    shares = report["routing"]["knowledge_share"]
    if shares:
        out["routing_gap"] = shares[KNOWLEDGE_TASK] - _mean([shares[t] for t in tasks if t in shares])
    out["met"] = {k: out[k] >= v for k, v in TARGETS.items() if k in out}
    return out


# ---- markdown ----------------------------------------------------------------------------------------------------


def _pct(x: float, std: float | None = None) -> str:
    return f"{100 * x:.1f}" + (f" ± {100 * std:.1f}" if std else "")


def to_markdown(report: dict[str, Any]) -> str:
    m = report["methods"]
    tasks = list(next(iter(m.values()))["downstream"])
    largest = max(report["data_scales"])
    lines = [
        f"# LoRAMoE reproduction, preset `{report['preset']}`",
        "",
        f"Seeds {report['seeds']}; data scales {report['data_scales']} (downstream data x scale; knowledge QA fixed); "
        f"scores in % at the largest scale (x{largest:g}), mean ± std over seeds. World knowledge = exact match on "
        "closed-book questions about facts seen in pre-training and never in fine-tuning. "
        f"Wall time of the whole experiment: {report['wall_seconds'] / 60:.1f} min; 'train s' is one run's training "
        "time at the largest scale.",
        "",
        "| method | trainable params | world knowledge | " + " | ".join(tasks) + " | downstream mean | train s |",
        "|---|---:|---:|" + "---:|" * len(tasks) + "---:|---:|",
    ]
    for name, r in m.items():
        cells = [_pct(r["downstream"][t], r["downstream_std"][t]) for t in tasks]
        lines.append(
            f"| {name} | {r['trainable_params']:,} | {_pct(r['world_knowledge'], r['world_knowledge_std'])} | "
            + " | ".join(cells) + f" | {_pct(r['downstream_mean'], r['downstream_mean_std'])} | {r['train_seconds']:.0f} |"
        )
    lines += ["", "World knowledge (and downstream mean) by data scale:", "",
              "| method | " + " | ".join(f"x{s:g}" for s in report["data_scales"]) + " |",
              "|---|" + "---:|" * len(report["data_scales"])]  # fmt: skip
    for name, r in m.items():
        cells = [f"{_pct(row['world_knowledge'])} ({_pct(row['downstream_mean'])})" for row in r["by_scale"]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    shares = report["routing"]["by_method"]
    if shares:
        datasets = list(next(iter(shares.values())))
        lines += ["", "Router weight on the knowledge experts, per dataset (uniform routing = 0.50):", "",
                  "| method | " + " | ".join(datasets) + " |", "|---|" + "---:|" * len(datasets)]  # fmt: skip
        for name, s in shares.items():
            lines.append(f"| {name} | " + " | ".join(f"{s[d]:.3f}" for d in datasets) + " |")
    lines += ["", "## Verdict", "", *verdict_lines(report), ""]
    return "\n".join(lines)


def verdict_lines(report: dict[str, Any]) -> list[str]:
    v, m = report["verdict"], report["methods"]
    lines = []
    if "sft_world_knowledge_by_scale" in v:
        curve = ", ".join(_pct(x) for x in v["sft_world_knowledge_by_scale"])
        word = "falls" if v["sft_forgets_more_with_more_data"] else "does NOT fall"
        lines.append(f"- Full fine-tuning's world knowledge {word} as data grows: {curve} (base {_pct(m['base']['world_knowledge'])})."
                     if "base" in m else f"- Full fine-tuning's world knowledge {word} as data grows: {curve}.")  # fmt: skip
    for name in ("lora", "loramoe", "loramoe_lbc"):
        if name in m and "base" in m and "sft" in m:
            r = m[name]
            lines.append(
                f"- {name}: world knowledge {_pct(r['world_knowledge'])} ({_ratio(r['world_knowledge'], m['base']['world_knowledge'])} "
                f"of base), downstream mean {_pct(r['downstream_mean'])} ({_ratio(r['downstream_mean'], m['sft']['downstream_mean'])} of full SFT)."
            )
    names = {"knowledge_retention": "LoRAMoE+LBC world knowledge / base", "downstream_ratio":
             "LoRAMoE+LBC downstream mean / full SFT", "routing_gap":
             "knowledge-expert share on world-knowledge questions minus that on downstream tasks"}  # fmt: skip
    for key, target in TARGETS.items():
        if key in v:
            status = "met" if v["met"][key] else "NOT met"
            lines.append(f"- {names[key]}: {v[key]:.3f} (target >= {target}): **{status}**.")
    return lines


def _ratio(x: float, ref: float) -> str:
    return f"{100 * x / ref:.0f}%" if ref > 0 else "n/a"


# ---- figures -----------------------------------------------------------------------------------------------------


def plot_forgetting(report: dict[str, Any], path: Path) -> Path:
    """World knowledge and downstream mean against data scale, one line per method (error bars: std over seeds)."""
    fig = Figure(figsize=(10, 4), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    scales = report["data_scales"]
    for ax, key, title in ((axes[0], "world_knowledge", "World knowledge (closed-book QA, test facts)"),
                           (axes[1], "downstream_mean", "Downstream tasks (mean)")):  # fmt: skip
        for name, r in report["methods"].items():
            ys = [100 * row[key] for row in r["by_scale"]]
            errs = [100 * row[key + "_std"] for row in r["by_scale"]]
            style = {"linestyle": "--", "color": "gray"} if name == "base" else {"marker": "o"}
            ax.errorbar(scales, ys, yerr=errs, label=name, capsize=3, **style)
        ax.set_xscale("log", base=2)
        ax.set_xticks(scales, [f"x{s:g}" for s in scales])
        ax.set_xlabel("instruction data scale (downstream data multiplied)")
        ax.set_ylabel("score (%)")
        ax.set_ylim(0, 102)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.savefig(path)
    return path


def write_report(report: dict[str, Any], out: Path) -> dict[str, Path]:
    """report.json, report.md, forgetting.png and (when LoRAMoE+LBC ran) routing.png in ``out``."""
    out = Path(out)
    paths = {"json": out / "report.json", "markdown": out / "report.md", "forgetting": out / "forgetting.png"}
    paths["json"].write_text(json.dumps(report, indent=2) + "\n")
    paths["markdown"].write_text(to_markdown(report))
    plot_forgetting(report, paths["forgetting"])
    bars = out / "routing" / "loramoe_lbc" / "routing_bars.png"
    if bars.exists():
        paths["routing"] = out / "routing.png"
        shutil.copyfile(bars, paths["routing"])
    return paths
