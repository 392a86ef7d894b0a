"""Turn the runs of an experiment into report.json, report.md (the paper's Table 2 in miniature, the knowledge at
equal downstream skill and the paired comparisons), forgetting.png (scores against data scale: the paper's
Figure 1), frontier.png (knowledge against skill, one curve per method) and routing.png (Figure 7), and say
plainly whether the paper's effect showed."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..config import knowledge_group_size
from . import forgetting
from .pipeline import EXTRA_TASK, IN_FORMAT, KNOWLEDGE_IN_FORMAT, METHODS, OUT_OF_POOL, VALID, VALID_TASK
from .stats import Point, knowledge_at, paired_bootstrap, pareto_frontier
from .tasks import KNOWLEDGE_TASK

# what the issue asks LoRAMoE+LBC to reach
TARGETS = {"knowledge_retention": 0.90, "downstream_ratio": 0.95, "routing_gap": 0.20}
# (a, b): the knowledge difference a - b at the decisive setting, with its paired bootstrap interval
PAIRS = (("loramoe_lbc", "lora"), ("loramoe_lbc", "sft"), ("loramoe", "lora"), ("lora", "sft"))


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _downstream(run: dict[str, Any], tasks: list[str]) -> float:
    return _mean([run["scores"][t] for t in tasks])


def _logprob_change(run: dict[str, Any], base: dict[str, Any] | None) -> float | None:
    """Mean over test questions of the gold answer's log-prob (per token) minus the base model's."""
    if base is None or KNOWLEDGE_TASK not in run.get("answer_logprob", {}):
        return None
    own, ref = run["answer_logprob"][KNOWLEDGE_TASK], base["answer_logprob"][KNOWLEDGE_TASK]
    return _mean([a - b for a, b in zip(own, ref)])


def summarise(raw: dict[str, Any]) -> dict[str, Any]:
    """report.json's content from `run_experiment`'s result: per method the decisive setting's means (and standard
    deviations) over seeds, the frontier, the knowledge at equal skill and the paired comparisons."""
    tasks = raw["downstream_tasks"]
    scales = raw["scales"]
    largest = max(scales)
    chosen = raw["decisive"]["lr"]
    base = next((r for r in raw["runs"] if r["method"] == "base"), None)
    methods: dict[str, Any] = {}
    for method in [m for m in METHODS if any(r["method"] == m for r in raw["runs"])]:
        runs = [r for r in raw["runs"] if r["method"] == method and r.get("lr") == chosen.get(method)]

        def at(scale: float, runs=runs) -> list[dict]:
            return [r for r in runs if r["scale"] in (scale, None)]  # base runs hold for every scale

        def stats(rs: list[dict]) -> dict[str, Any]:
            wk = [r["scores"][KNOWLEDGE_TASK] for r in rs]
            inf = [r["scores"][KNOWLEDGE_IN_FORMAT] for r in rs]
            ds = [_downstream(r, tasks) for r in rs]
            change = [c for c in (_logprob_change(r, base) for r in rs) if c is not None]
            ood = [r["scores"][OUT_OF_POOL] for r in rs if OUT_OF_POOL in r["scores"]]
            return {"world_knowledge": _mean(wk), "world_knowledge_std": _std(wk),
                    "out_of_pool": _mean(ood) if ood else None, "out_of_pool_std": _std(ood),
                    "kl_base": _mean([statistics.fmean(r.get("kl_base") or [0.0]) for r in rs]),
                    "world_knowledge_in_format": _mean(inf), "world_knowledge_in_format_std": _std(inf),
                    "world_knowledge_valid": _mean([r["scores"][VALID_TASK] for r in rs]),
                    "knowledge_logprob_change": _mean(change) if change else None,
                    "downstream_mean": _mean(ds), "downstream_mean_std": _std(ds),
                    "downstream_valid_mean": _mean([_downstream(r, [t + VALID for t in tasks]) for r in rs])}  # fmt: skip

        top = at(largest)
        methods[method] = {
            **stats(top),
            "lr": chosen.get(method),
            "seeds": sorted(r["seed"] for r in top if r["seed"] is not None),
            "downstream": {t: _mean([r["scores"][t] for r in top]) for t in tasks},
            "downstream_std": {t: _std([r["scores"][t] for r in top]) for t in tasks},
            "by_scale": [{"scale": s, **stats(at(s))} for s in scales],
            "trainable_params": top[0]["trainable_params"],
            "train_seconds": _mean([r["train_seconds"] for r in top]),
            "steps": top[0]["steps"],
        }
        if EXTRA_TASK in top[0]["scores"]:
            methods[method]["knowledge_test"] = {
                "format_free": _mean([r["scores"][EXTRA_TASK] for r in top]),
                "in_format": _mean([r["scores"][EXTRA_TASK + IN_FORMAT] for r in top]),
            }
    routing, uniform = {}, None
    for method in ("loramoe_lbc", "loramoe"):
        routed = [r for r in raw["runs"] if r["method"] == method and "knowledge_share" in r
                  and r["scale"] == largest and r["lr"] == chosen.get(method)]  # fmt: skip
        if routed:
            routing[method] = {d: _mean([r["knowledge_share"][d] for r in routed]) for d in routed[0]["knowledge_share"]}
            cfg = routed[0]["train_config"]  # K/N: what every expert group would get from a router that ignores input
            uniform = knowledge_group_size(cfg["num_experts"], cfg["knowledge_experts"]) / cfg["num_experts"]
    frontier = frontier_points(raw)
    report = {
        "preset": raw["preset"], "seeds": raw["seeds"], "data_scales": scales, "methods": methods,
        "routing": {"method": "loramoe_lbc", "knowledge_share": routing.get("loramoe_lbc", {}), "by_method": routing,
                    "uniform": uniform},
        "data": raw["data"], "steps_per_scale": raw["steps"], "wall_seconds": raw["wall_seconds"],
        "train_seconds_total": sum(r["train_seconds"] for r in raw["runs"]), "runs": len(raw["runs"]),
        "lr_grid": raw["lr_grid"], "decisive": raw["decisive"], "frontier": frontier,
        "matched_skill": matched_skill(frontier, methods.get("base")),
        "comparisons": comparisons(raw),
        "scale_axis": forgetting.scale_axis(raw, PAIRS), "kl": forgetting.kl_points(raw),
        "mastery": forgetting.mastery(raw, PAIRS),
    }  # fmt: skip
    report["verdict"] = verdict(report, tasks)
    return report


def frontier_points(raw: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Per trained method, one point per (lr, scale) of the grid: test scores averaged over its seeds."""
    tasks = raw["downstream_tasks"]
    groups: dict[str, dict[tuple[float, float], list[dict]]] = {}
    for r in raw["runs"]:
        if r["method"] != "base":
            groups.setdefault(r["method"], {}).setdefault((r["lr"], r["scale"]), []).append(r)
    out = {}
    for method in [m for m in METHODS if m in groups]:
        out[method] = [
            {"lr": lr, "scale": scale, "seeds": len(rs),
             "world_knowledge": _mean([r["scores"][KNOWLEDGE_TASK] for r in rs]),
             "world_knowledge_in_format": _mean([r["scores"][KNOWLEDGE_IN_FORMAT] for r in rs]),
             "downstream_mean": _mean([_downstream(r, tasks) for r in rs])}
            for (lr, scale), rs in sorted(groups[method].items())
        ]  # fmt: skip
    return out


def _points(rows: list[dict[str, Any]], base: dict[str, Any] | None) -> list[Point]:
    """A method's frontier points; the base model is every method's point at lr -> 0."""
    points = [Point(p["downstream_mean"], p["world_knowledge"]) for p in rows]
    return points + ([Point(base["downstream_mean"], base["world_knowledge"])] if base else [])


def matched_skill(frontier: dict[str, list[dict[str, Any]]], base: dict[str, Any] | None) -> dict[str, Any]:
    """Format-free knowledge of each method at named downstream levels, interpolated along its frontier.

    Levels: the highest downstream mean every method reaches, and halfway to it from the base model's."""
    if not frontier:
        return {"levels": [], "knowledge": {}}
    top = min(max(p["downstream_mean"] for p in rows) for rows in frontier.values())
    levels = [top] if base is None or base["downstream_mean"] >= top else [(base["downstream_mean"] + top) / 2, top]
    return {"levels": levels, "knowledge": {m: [knowledge_at(_points(rows, base), x) for x in levels]
                                            for m, rows in frontier.items()}}  # fmt: skip


def comparisons(raw: dict[str, Any]) -> dict[str, Any]:
    """For each pair (a, b) of `PAIRS` that ran: the format-free knowledge difference a - b at the decisive setting
    (largest scale, each method's chosen lr), over the seeds both have, with a paired bootstrap 95 % interval over
    (seed, question); the downstream difference beside it, since knowledge is only comparable at similar skill."""
    d = raw["decisive"]
    tasks = raw["downstream_tasks"]

    def decisive_runs(method: str) -> dict[int, dict]:
        return {r["seed"]: r for r in raw["runs"]
                if r["method"] == method and r["scale"] == d["scale"] and r["lr"] == d["lr"].get(method)}  # fmt: skip

    out = {}
    for a, b in PAIRS:
        ra, rb = decisive_runs(a), decisive_runs(b)
        seeds = sorted(set(ra) & set(rb))
        if not seeds:
            continue
        def diff(task: str, ra=ra, rb=rb, seeds=seeds) -> tuple[float, list[float], bool]:
            value, (lo, hi) = paired_bootstrap([ra[s]["per_question"][task] for s in seeds],
                                               [rb[s]["per_question"][task] for s in seeds])  # fmt: skip
            return value, [lo, hi], lo <= 0.0 <= hi

        entry: dict[str, Any] = {"seeds": seeds, "questions": len(ra[seeds[0]]["per_question"][KNOWLEDGE_TASK])}
        entry["knowledge_diff"], entry["ci95"], entry["knowledge_ci_contains_zero"] = diff(KNOWLEDGE_TASK)
        if EXTRA_TASK in ra[seeds[0]]["per_question"]:
            entry["knowledge_test_diff"], entry["knowledge_test_ci95"], entry["knowledge_test_ci_contains_zero"] = diff(EXTRA_TASK)
        entry["downstream_diff"] = _mean([_downstream(ra[s], tasks) - _downstream(rb[s], tasks) for s in seeds])
        out[f"{a}-{b}"] = entry
    return out


def verdict(report: dict[str, Any], tasks: list[str]) -> dict[str, Any]:
    """The measured answer to the paper's claims, as numbers against the targets (None where a method is missing)."""
    m = report["methods"]
    out: dict[str, Any] = {"targets": TARGETS}
    if "sft" in m:
        curve = [row["world_knowledge"] for row in m["sft"]["by_scale"]]
        out["sft_world_knowledge_by_scale"] = curve
        out["sft_forgets_more_with_more_data"] = len(curve) > 1 and curve[-1] < curve[0]
        if "base" in m:
            out["sft_forgetting"] = m["base"]["world_knowledge"] - m["sft"]["world_knowledge"]
            largest = max(report["data_scales"])
            worst = min((p for p in report["frontier"].get("sft", []) if p["scale"] == largest),
                        key=lambda p: p["world_knowledge"], default=None)  # fmt: skip
            if worst is not None:  # the grid's most forgetful SFT run: how far forgetting went at all
                out["sft_most_forgetting"] = {"lr": worst["lr"], "points": m["base"]["world_knowledge"] - worst["world_knowledge"]}
    if "base" in m and "loramoe_lbc" in m and m["base"]["world_knowledge"] > 0:
        out["knowledge_retention"] = m["loramoe_lbc"]["world_knowledge"] / m["base"]["world_knowledge"]
    if "sft" in m and "loramoe_lbc" in m and m["sft"]["downstream_mean"] > 0:
        out["downstream_ratio"] = m["loramoe_lbc"]["downstream_mean"] / m["sft"]["downstream_mean"]
    shares = report["routing"]["knowledge_share"]
    if shares:
        out["routing_gap"] = shares[KNOWLEDGE_IN_FORMAT] - _mean([shares[t] for t in tasks if t in shares])
    out["met"] = {k: out[k] >= v for k, v in TARGETS.items() if k in out}
    return out


# ---- markdown ----------------------------------------------------------------------------------------------------


def _pct(x: float | None, std: float | None = None) -> str:
    if x is None:
        return "n/a"
    return f"{100 * x:.1f}" + (f" ± {100 * std:.1f}" if std else "")


def to_markdown(report: dict[str, Any]) -> str:
    m = report["methods"]
    tasks = list(next(iter(m.values()))["downstream"])
    largest = max(report["data_scales"])
    decisive = report["decisive"]
    lines = [
        f"# LoRAMoE reproduction, preset `{report['preset']}`",
        "",
        f"Data scales {report['data_scales']} (downstream data x scale; knowledge QA fixed); grid seeds "
        f"{report['seeds']}; the decisive setting (x{largest:g}, each method's lr {forgetting.lr_basis(report['lr_grid'])}: "
        f"{_lrs(decisive['lr'])}) has seeds {decisive['seeds']}. Scores in % at the decisive setting, mean ± std over "
        "seeds. World knowledge = exact match on closed-book questions about facts seen in pre-training and never in "
        "fine-tuning, asked as a plain completion (format-free, the headline) and as the fine-tuning data asks "
        "(in-format). Log-prob change = mean change, against the base model, of the gold answer's log-probability "
        "per token after the format-free prompt. "
        f"Wall time of this invocation: {report['wall_seconds'] / 60:.1f} min (runs finished earlier are reused); "
        f"training time of all {report['runs']} runs: {report['train_seconds_total'] / 60:.1f} min; 'train s' is one "
        "run's training time at the largest scale.",
        "",
        "| method | lr | trainable params | world knowledge | in-format | out-of-pool | log-prob change | KL | "
        + " | ".join(tasks) + " | downstream mean | train s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(tasks) + "---:|---:|",
    ]  # fmt: skip
    for name, r in m.items():
        cells = [_pct(r["downstream"][t], r["downstream_std"][t]) for t in tasks]
        change = r["knowledge_logprob_change"]
        lines.append(
            f"| {name} | {r['lr'] if r['lr'] is not None else '-'} | {r['trainable_params']:,} | "
            f"{_pct(r['world_knowledge'], r['world_knowledge_std'])} | "
            f"{_pct(r['world_knowledge_in_format'], r['world_knowledge_in_format_std'])} | "
            f"{_pct(r.get('out_of_pool'), r.get('out_of_pool_std'))} | "
            f"{'-' if change is None else f'{change:+.3f}'} | {r.get('kl_base', 0.0):.4f} | " + " | ".join(cells)
            + f" | {_pct(r['downstream_mean'], r['downstream_mean_std'])} | {r['train_seconds']:.0f} |"
        )  # fmt: skip
    if any("knowledge_test" in r for r in m.values()):
        lines += ["", f"Extra knowledge test (`--knowledge-test`, {report['data'].get('knowledge_test_file', '?')} questions "
                  "never trained on), %:", "", "| method | format-free | in-format |", "|---|---:|---:|"]  # fmt: skip
        lines += [f"| {name} | {_pct(r['knowledge_test']['format_free'])} | {_pct(r['knowledge_test']['in_format'])} |"
                  for name, r in m.items() if "knowledge_test" in r]  # fmt: skip
    lines += ["", "World knowledge, format-free (and downstream mean) by data scale, at the decisive lr:", "",
              "| method | " + " | ".join(f"x{s:g}" for s in report["data_scales"]) + " |",
              "|---|" + "---:|" * len(report["data_scales"])]  # fmt: skip
    for name, r in m.items():
        cells = [f"{_pct(row['world_knowledge'])} ({_pct(row['downstream_mean'])})" for row in r["by_scale"]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", *frontier_lines(report)]
    shares = report["routing"]["by_method"]
    if shares:
        datasets = list(next(iter(shares.values())))
        lines += ["", "Router weight on the knowledge experts, per dataset, at the decisive setting (uniform routing = "
                  f"{report['routing']['uniform']:.2f}):",
                  "", "| method | " + " | ".join(datasets) + " |", "|---|" + "---:|" * len(datasets)]  # fmt: skip
        for name, s in shares.items():
            lines.append(f"| {name} | " + " | ".join(f"{s[d]:.3f}" for d in datasets) + " |")
    lines += ["", *forgetting.markdown(report)]
    lines += ["", "## Verdict", "", *verdict_lines(report), *forgetting.verdict_lines(report), ""]
    return "\n".join(lines)


def _lrs(lrs: dict[str, float]) -> str:
    return ", ".join(f"{m} {lr:g}" for m, lr in lrs.items()) or "none"


def frontier_lines(report: dict[str, Any]) -> list[str]:
    """The grid's points, the knowledge at equal skill and the paired comparisons, as markdown."""
    lines = ["## Knowledge at equal downstream skill", "",
             "Every grid point (lr x data scale; test scores, mean over its seeds), format-free world knowledge / "
             "in-format / downstream mean, %:", "", "| method | lr | scale | seeds | world knowledge | in-format | "
             "downstream mean |", "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, rows in report["frontier"].items():
        lines += [f"| {name} | {p['lr']:g} | x{p['scale']:g} | {p['seeds']} | {_pct(p['world_knowledge'])} | "
                  f"{_pct(p['world_knowledge_in_format'])} | {_pct(p['downstream_mean'])} |" for p in rows]  # fmt: skip
    matched = report["matched_skill"]
    if matched["levels"]:
        lines += ["", "Format-free world knowledge read off each method's frontier (its Pareto-best points, the base "
                  "model as the lr -> 0 end, linear in between; n/a: the method never reached that skill), %:", "",
                  "| method | " + " | ".join(f"at downstream {_pct(x)}" for x in matched["levels"]) + " |",
                  "|---|" + "---:|" * len(matched["levels"])]  # fmt: skip
        lines += [f"| {name} | " + " | ".join(_pct(v) for v in values) + " |" for name, values in matched["knowledge"].items()]
    if report["comparisons"]:
        lines += ["", "Paired differences at the decisive setting (a - b, percentage points; 95 % interval from a paired "
                  "bootstrap over seeds and questions):", "",
                  "| a - b | seeds | world knowledge | 95 % interval | contains 0 | downstream mean |",
                  "|---|---:|---:|---:|---|---:|"]  # fmt: skip
        for pair, c in report["comparisons"].items():
            lo, hi = c["ci95"]
            lines.append(f"| {pair} | {len(c['seeds'])} | {100 * c['knowledge_diff']:+.1f} | [{100 * lo:+.1f}, {100 * hi:+.1f}] | "
                         f"{'yes' if c['knowledge_ci_contains_zero'] else 'no'} | {100 * c['downstream_diff']:+.1f} |")  # fmt: skip
    return lines


def verdict_lines(report: dict[str, Any]) -> list[str]:
    v, m = report["verdict"], report["methods"]
    lines = []
    if "sft_world_knowledge_by_scale" in v:
        curve = ", ".join(_pct(x) for x in v["sft_world_knowledge_by_scale"])
        word = "falls" if v["sft_forgets_more_with_more_data"] else "does NOT fall"
        base = ""
        if "sft_forgetting" in v:  # positive: SFT lost knowledge; negative: it gained some (knowledge QA in the mix)
            side = "below" if v["sft_forgetting"] >= 0 else "above"
            base = f" (base {_pct(m['base']['world_knowledge'])}; {abs(100 * v['sft_forgetting']):.1f} points {side} it " \
                   "at the largest scale)"
        lines.append(f"- Full fine-tuning's format-free world knowledge at its decisive lr {word} as data grows: "
                     f"{curve}{base}.")  # fmt: skip
        if "sft_most_forgetting" in v:
            worst = v["sft_most_forgetting"]
            if worst["points"] > 0:
                lines.append(f"- The most any SFT run of the grid forgot at the largest scale: {100 * worst['points']:.1f} "
                             f"points below the base (lr {worst['lr']:g}).")  # fmt: skip
            else:  # every SFT run ended at or above the base: say so, not "forgot -4.4 points below"
                lines.append(f"- No SFT run of the grid fell below the base at the largest scale: the lowest is "
                             f"{abs(100 * worst['points']):.1f} points above it (lr {worst['lr']:g}).")  # fmt: skip
    for name in ("lora", "loramoe", "loramoe_lbc"):
        if name in m and "base" in m and "sft" in m:
            r = m[name]
            lines.append(
                f"- {name}: world knowledge {_pct(r['world_knowledge'])} ({_ratio(r['world_knowledge'], m['base']['world_knowledge'])} "
                f"of base), downstream mean {_pct(r['downstream_mean'])} ({_ratio(r['downstream_mean'], m['sft']['downstream_mean'])} of full SFT)."
            )
    matched = report["matched_skill"]
    if matched["levels"]:
        top = matched["levels"][-1]
        values = ", ".join(f"{name} {_pct(vals[-1])}" for name, vals in matched["knowledge"].items())
        lines.append(f"- At equal downstream skill ({_pct(top)}, the highest every method reached), format-free "
                     f"world knowledge: {values}.")  # fmt: skip
    for pair, c in report["comparisons"].items():
        lo, hi = c["ci95"]
        sign = "contains 0: no measurable difference" if c["knowledge_ci_contains_zero"] else (
            "above 0" if lo > 0 else "below 0")
        lines.append(f"- {pair}: world knowledge {100 * c['knowledge_diff']:+.1f} points, 95 % interval "
                     f"[{100 * lo:+.1f}, {100 * hi:+.1f}] ({sign}); downstream {100 * c['downstream_diff']:+.1f} points "
                     f"({len(c['seeds'])} seeds x {c['questions']} questions).")  # fmt: skip
    names = {"knowledge_retention": "LoRAMoE+LBC world knowledge / base", "downstream_ratio":
             "LoRAMoE+LBC downstream mean / full SFT", "routing_gap":
             "knowledge-expert share on world-knowledge questions (in-format) minus that on downstream tasks"}  # fmt: skip
    for key, target in TARGETS.items():
        if key in v:
            status = "met" if v["met"][key] else "NOT met"
            lines.append(f"- {names[key]}: {v[key]:.3f} (target >= {target}): **{status}**.")
    return lines


def _ratio(x: float, ref: float) -> str:
    return f"{100 * x / ref:.0f}%" if ref > 0 else "n/a"


# ---- figures -----------------------------------------------------------------------------------------------------


def plot_forgetting(report: dict[str, Any], path: Path) -> Path:
    """World knowledge (both formats) and downstream mean against data scale, one line per method, at each method's
    decisive lr (error bars: std over seeds)."""
    fig = Figure(figsize=(15, 4), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    scales = report["data_scales"]
    panels = (("world_knowledge", "World knowledge, format-free (test facts)"),
              ("world_knowledge_in_format", "World knowledge, in-format (test facts)"),
              ("downstream_mean", "Downstream tasks (mean)"))  # fmt: skip
    for ax, (key, title) in zip(axes, panels):
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


def plot_frontier(report: dict[str, Any], path: Path) -> Path:
    """Knowledge against downstream skill: every grid point (label: lr, scale), each method's Pareto frontier as a
    line from the base model, the levels of the equal-skill table as vertical lines; format-free and in-format."""
    fig = Figure(figsize=(13, 5), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    base = report["methods"].get("base")
    for ax, key, title in ((axes[0], "world_knowledge", "format-free"), (axes[1], "world_knowledge_in_format", "in-format")):
        for i, (name, rows) in enumerate(report["frontier"].items()):
            color = f"C{i}"
            points = [Point(p["downstream_mean"], p[key]) for p in rows]
            front = pareto_frontier(points + ([Point(base["downstream_mean"], base[key])] if base else []))
            ax.plot([100 * p.downstream for p in front], [100 * p.knowledge for p in front], color=color, label=name)
            ax.scatter([100 * p.downstream for p in points], [100 * p.knowledge for p in points], color=color, s=18)
            for p, row in zip(points, rows):
                ax.annotate(f"{row['lr']:g}, x{row['scale']:g}", (100 * p.downstream, 100 * p.knowledge), fontsize=6,
                            xytext=(3, 2), textcoords="offset points", color=color)  # fmt: skip
        if base:
            ax.scatter([100 * base["downstream_mean"]], [100 * base[key]], marker="*", s=120, color="black", label="base", zorder=3)
        if key == "world_knowledge":
            for level in report["matched_skill"]["levels"]:
                ax.axvline(100 * level, color="gray", linestyle=":", linewidth=1)
        ax.set_xlabel("downstream mean (%, test)")
        ax.set_ylabel(f"world knowledge, {title} (%, test facts)")
        ax.set_title(f"Knowledge vs skill ({title}): points = lr x data scale")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.savefig(path)
    return path


def plot_routing(report: dict[str, Any], path: Path) -> Path:
    """The paper's Figure 7 view from the report itself: per dataset, the router weight on the knowledge experts,
    one bar per routed method, mean over the decisive seeds. Drawn from the stored shares, so a study resumed from
    `results/` alone has it too (the per-layer profiles are in `routing/` when the adapters were routed here)."""
    shares = report["routing"]["by_method"]
    datasets = list(next(iter(shares.values())))
    fig = Figure(figsize=(max(7.0, 1.2 * len(datasets) + 2.5), 4.5), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / len(shares)
    colors = {name: f"C{i}" for i, name in enumerate(report["frontier"])}  # as in frontier.png
    for i, name in enumerate(sorted(shares, key=list(colors).index)):
        s = shares[name]
        xs = [j + (i - (len(shares) - 1) / 2) * width for j in range(len(datasets))]
        ax.bar(xs, [s[d] for d in datasets], width=width, label=name, color=colors[name])
        for x, d in zip(xs, datasets):
            ax.text(x, s[d] + 0.01, f"{s[d]:.2f}", ha="center", fontsize=7)
    uniform = report["routing"]["uniform"]
    ax.axhline(uniform, color="black", linestyle="--", linewidth=1, label=f"uniform routing ({uniform:.2f})")
    ax.set_xticks(range(len(datasets)), datasets, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel("router weight on the knowledge experts")
    ax.set_title(f"Knowledge-expert share per dataset, at the decisive setting (mean over seeds {report['decisive']['seeds']})")
    ax.legend(fontsize=8)
    fig.savefig(path)
    return path


def write_report(report: dict[str, Any], out: Path) -> dict[str, Path]:
    """report.json, report.md, forgetting.png, frontier.png and (when LoRAMoE or LoRAMoE+LBC ran) routing.png in
    ``out``."""
    out = Path(out)
    paths = {"json": out / "report.json", "markdown": out / "report.md", "forgetting": out / "forgetting.png",
             "frontier": out / "frontier.png"}  # fmt: skip
    paths["json"].write_text(json.dumps(report, indent=2) + "\n")
    paths["markdown"].write_text(to_markdown(report))
    plot_forgetting(report, paths["forgetting"])
    plot_frontier(report, paths["frontier"])
    if report["routing"]["by_method"]:
        paths["routing"] = plot_routing(report, out / "routing.png")
    if report.get("scale_axis"):
        paths["scaling"] = forgetting.plot_scaling(report, out / "scaling.png")
    if (report.get("kl") or {}).get("points"):
        paths["kl"] = forgetting.plot_kl(report, out / "kl.png")
    return paths
