"""Where forgetting starts: the report's three views of it beyond the decisive setting.

- **The scale axis** (the paper's Figure 1 at fair lrs): at every data scale each method at its own lr chosen on
  validation data at that scale, with a 95 % bootstrap interval over (seed, question) on its knowledge and the
  paired differences between methods. A curve at one lr would compare methods trained too hot or too cold.
- **KL against knowledge change**: per run, the forward KL(base || tuned) on held-out prompts beside how much
  knowledge it lost or gained, and their rank correlation: whether a measure that needs no decoding tracks it.
- **The mastery arm**: knowledge QA drawn only from facts the base knew, or only from facts it did not, scored on
  the test facts the base knew and those it did not, kept apart.

Knowledge is always reported per fact set: the test split of the knowledge QA's own pool, and the out-of-pool set
from another source, never pooled.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .mastery import MASTERY_ARMS
from .pipeline import OUT_OF_POOL
from .stats import paired_bootstrap
from .tasks import KNOWLEDGE_TASK

KL_FLOOR = 1e-6  # kl.png's log axis starts here: float32 rounding leaves a barely trained run's KL near 0, even < 0
FACT_SETS = {KNOWLEDGE_TASK: "test facts (the knowledge QA's pool)", OUT_OF_POOL: "out-of-pool facts"}


def _mean(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _std(values: Sequence[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def mean_interval(rows: Sequence[Sequence[float]]) -> dict[str, Any]:
    """Mean of ``rows[seed][question]`` with its 95 % bootstrap interval over seeds and questions."""
    value, (lo, hi) = paired_bootstrap(rows, [[0.0] * len(r) for r in rows])
    return {"mean": value, "ci95": [lo, hi]}


def paired(ra: dict[int, dict], rb: dict[int, dict], task: str, keep: Sequence[int] | None = None) -> dict[str, Any] | None:
    """a - b on ``task`` over the seeds both have, paired by (seed, question); ``keep``: only these questions."""
    seeds = sorted(set(ra) & set(rb))
    if not seeds or task not in ra[seeds[0]]["per_question"]:
        return None

    def table(runs: dict[int, dict]) -> list[list[float]]:
        rows = [runs[s]["per_question"][task] for s in seeds]
        return [[row[q] for q in keep] for row in rows] if keep is not None else rows

    if keep is not None and not keep:
        return None
    value, (lo, hi) = paired_bootstrap(table(ra), table(rb))
    return {"diff": value, "ci95": [lo, hi], "contains_zero": lo <= 0.0 <= hi, "seeds": seeds,
            "questions": len(table(ra)[0])}  # fmt: skip


def _downstream(run: dict[str, Any], tasks: list[str]) -> float:
    return statistics.fmean(run["scores"][t] for t in tasks)


def _kl(run: dict[str, Any]) -> float:
    """The run's mean KL(base || run) over the held-out prompts; 0 for the base itself."""
    return statistics.fmean(run["kl_base"]) if run.get("kl_base") else 0.0


def summary(runs: list[dict[str, Any]], tasks: list[str]) -> dict[str, Any]:
    """One setting's runs (its seeds): knowledge per fact set with intervals, downstream mean, KL."""
    out: dict[str, Any] = {"seeds": sorted(r["seed"] for r in runs if r["seed"] is not None)}
    for task in FACT_SETS:
        if task in runs[0]["per_question"]:
            out[task] = {**mean_interval([r["per_question"][task] for r in runs]),
                         "std": _std([r["scores"][task] for r in runs])}  # fmt: skip
    ds = [_downstream(r, tasks) for r in runs]
    out.update(downstream_mean=statistics.fmean(ds), downstream_std=_std(ds), kl=statistics.fmean(_kl(r) for r in runs))
    return out


def by_seed(raw: dict[str, Any], method: str, scale: float, lr: float, arm: str | None = None) -> dict[int, dict]:
    source = raw.get("mastery_runs", []) if arm else raw["runs"]
    return {r["seed"]: r for r in source
            if r["method"] == method and r["scale"] == scale and r["lr"] == lr and r.get("arm") == arm}  # fmt: skip


def scale_axis(raw: dict[str, Any], pairs: Sequence[tuple[str, str]]) -> list[dict[str, Any]]:
    """Per finished data scale: its decisive lrs (chosen on validation data at that scale), each method's summary
    there and the paired differences of ``pairs`` on both fact sets."""
    tasks = raw["downstream_tasks"]
    base = [r for r in raw["runs"] if r["method"] == "base"]
    out = []
    for key, choice in sorted(raw.get("decisive_by_scale", {}).items(), key=lambda kv: float(kv[0])):
        scale = float(key)
        methods = {"base": summary(base, tasks)} if base else {}
        runs = {m: by_seed(raw, m, scale, lr) for m, lr in choice["lr"].items()}
        methods.update({m: {"lr": choice["lr"][m], **summary(list(rs.values()), tasks)} for m, rs in runs.items()})
        comparisons = {}
        for a, b in pairs:
            if a in runs and b in runs:
                comparisons[f"{a}-{b}"] = {task: paired(runs[a], runs[b], task) for task in FACT_SETS}
        out.append({"scale": scale, "level": choice["level"], "methods": methods, "comparisons": comparisons})
    return out


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation (ties get their mean rank); None with fewer than 3 points or a constant side."""
    if len(x) < 3:
        return None
    rx, ry = _ranks(x), _ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def _ranks(values: Sequence[float]) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    order = np.argsort(v, kind="stable")
    ranks = np.empty(len(v))
    ranks[order] = np.arange(len(v), dtype=np.float64)
    for value in np.unique(v):  # ties: the mean of their ranks
        ranks[v == value] = ranks[v == value].mean()
    return ranks


def kl_points(raw: dict[str, Any]) -> dict[str, Any]:
    """Every trained run of the study (grid and seeds): its KL(base || run) beside its knowledge change against the
    base on each fact set, and the rank correlation of KL with each change over all runs."""
    base = next((r for r in raw["runs"] if r["method"] == "base"), None)
    runs = [r for r in raw["runs"] if r["method"] != "base" and r.get("kl_base")]
    if base is None or not runs:
        return {"points": [], "spearman": {}}
    points = [{"method": r["method"], "scale": r["scale"], "lr": r["lr"], "seed": r["seed"], "kl": _kl(r),
               **{f"{t}_change": r["scores"][t] - base["scores"][t] for t in FACT_SETS if t in r["scores"]}}
              for r in runs]  # fmt: skip
    rho = {t: spearman([p["kl"] for p in points], [p[f"{t}_change"] for p in points])
           for t in FACT_SETS if f"{t}_change" in points[0]}  # fmt: skip
    return {"points": points, "spearman": rho}


def mastery(raw: dict[str, Any], pairs: Sequence[tuple[str, str]]) -> dict[str, Any] | None:
    """The mastery arm: per method and arm (knowledge data from known / unknown facts only), knowledge on the test
    facts the base knew and on those it did not, the out-of-pool facts, downstream and KL (mean ± std over
    seeds); the paired differences unknown - known arm per method, and ``pairs`` within the unknown arm."""
    runs = raw.get("mastery_runs") or []
    base = next((r for r in raw["runs"] if r["method"] == "base"), None)
    if not runs or base is None:
        return None
    tasks = raw["downstream_tasks"]
    answered = base["per_question"][KNOWLEDGE_TASK]
    subsets = {"known": [i for i, c in enumerate(answered) if c >= 1.0],
               "unknown": [i for i, c in enumerate(answered) if c < 1.0]}  # fmt: skip
    scale = raw["mastery_scale"]
    lrs = {r["method"]: r["lr"] for r in runs}
    arms = {(m, arm): by_seed(raw, m, scale, lr, arm) for m, lr in lrs.items() for arm in MASTERY_ARMS}
    table = []
    for (m, arm), rs in arms.items():
        if not rs:
            continue
        row: dict[str, Any] = {"method": m, "arm": arm, "lr": lrs[m], "seeds": sorted(rs)}
        for name, keep in subsets.items():
            values = [statistics.fmean(r["per_question"][KNOWLEDGE_TASK][i] for i in keep) for r in rs.values()] if keep else []
            row[f"test_{name}"], row[f"test_{name}_std"] = _mean(values), _std(values)
        ood = [r["scores"][OUT_OF_POOL] for r in rs.values() if OUT_OF_POOL in r["scores"]]
        row["out_of_pool"], row["out_of_pool_std"] = _mean(ood), _std(ood)
        ds = [_downstream(r, tasks) for r in rs.values()]
        row["downstream_mean"], row["downstream_std"] = _mean(ds), _std(ds)
        row["kl"] = _mean([_kl(r) for r in rs.values()])
        table.append(row)
    diffs = {}
    for m in lrs:
        for name, keep in subsets.items():
            diffs[f"{m}: unknown-known arm, {name} test facts"] = paired(arms[(m, "unknown")], arms[(m, "known")],
                                                                        KNOWLEDGE_TASK, keep)  # fmt: skip
    for a, b in pairs:
        if a in lrs and b in lrs:
            diffs[f"{a}-{b}: unknown arm, known test facts"] = paired(arms[(a, "unknown")], arms[(b, "unknown")],
                                                                      KNOWLEDGE_TASK, subsets["known"])  # fmt: skip
    return {"scale": scale, "facts_per_arm": raw["data"].get("knowledge_known"),
            "test_known": len(subsets["known"]), "test_unknown": len(subsets["unknown"]),
            "base": {"test_known": 1.0 if subsets["known"] else None, "test_unknown": 0.0 if subsets["unknown"] else None,
                     "out_of_pool": base["scores"].get(OUT_OF_POOL)},
            "table": table, "comparisons": {k: v for k, v in diffs.items() if v is not None}}  # fmt: skip


# ---- markdown ----------------------------------------------------------------------------------------------------


def lr_basis(lr_grid: dict[str, Sequence[float]]) -> str:
    """How each method's lr was set, for the report's text. A method with one lr in its grid (``--lr-grid sft=2e-5``)
    had nothing to choose from, so its lr was given, not validated at that scale, and the report must say so."""
    given = [m for m, lrs in lr_grid.items() if len(lrs) == 1]
    if not given:
        return "chosen on validation data"
    if len(given) == len(lr_grid):
        return "given by a one-lr grid, not chosen on validation data"
    return f"chosen on validation data (given by a one-lr grid, not chosen, for {', '.join(given)})"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}"


def _ci(entry: dict[str, Any] | None) -> str:
    if not entry:
        return "n/a"
    lo, hi = entry["ci95"]
    return f"{100 * entry['mean']:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def _diff(c: dict[str, Any] | None) -> str:
    if not c:
        return "n/a"
    lo, hi = c["ci95"]
    return f"{100 * c['diff']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]" + (" (contains 0)" if c["contains_zero"] else "")


def markdown(report: dict[str, Any]) -> list[str]:
    """The scale axis, the KL correlation and the mastery table, as markdown sections."""
    lines: list[str] = []
    axis = report.get("scale_axis") or []
    if axis:
        lines += ["## Knowledge against data scale, each scale at its own decisive lrs", "",
                  f"At every data scale each method's lr is {lr_basis(report['lr_grid'])} at that scale (the rule of "
                  "the decisive setting). Knowledge: format-free exact match, % with a 95 % bootstrap interval over (seed, "
                  "question), on the knowledge QA pool's test facts and, apart, on the out-of-pool facts; KL: mean "
                  "KL(base || tuned) per token on the format-free test prompts (nats).", "",
                  "| scale | method | lr | seeds | test facts | out-of-pool facts | downstream mean | KL |",
                  "|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        for row in axis:
            for m, s in row["methods"].items():
                lines.append(f"| x{row['scale']:g} | {m} | {s.get('lr', '-') if m != 'base' else '-'} | {len(s['seeds'])} | "
                             f"{_ci(s.get(KNOWLEDGE_TASK))} | {_ci(s.get(OUT_OF_POOL))} | "
                             f"{_pct(s['downstream_mean'])} | {s['kl']:.4f} |")  # fmt: skip
        lines += ["", "Paired differences per scale (a - b, points, 95 % interval over seeds and questions):", "",
                  "| scale | a - b | seeds | test facts | out-of-pool facts |", "|---|---|---:|---:|---:|"]  # fmt: skip
        for row in axis:
            for pair, c in row["comparisons"].items():
                seeds = len((c[KNOWLEDGE_TASK] or {}).get("seeds", []))
                lines.append(f"| x{row['scale']:g} | {pair} | {seeds} | {_diff(c[KNOWLEDGE_TASK])} | {_diff(c[OUT_OF_POOL])} |")
    kl = report.get("kl") or {}
    if kl.get("points"):
        rho = ", ".join(f"{FACT_SETS[t]} {v:+.2f}" if v is not None else f"{FACT_SETS[t]} n/a" for t, v in kl["spearman"].items())
        lines += ["", "## KL(base || tuned) against knowledge change", "",
                  f"Over the {len(kl['points'])} trained runs (every lr, scale and seed; `kl.png`), Spearman's rank "
                  f"correlation of the KL with the knowledge change against the base: {rho} (negative: more KL, "
                  "more forgetting)."]  # fmt: skip
    mt = report.get("mastery")
    if mt:
        lines += ["", f"## The mastery arm (x{mt['scale']:g}, each method at that scale's decisive lr)", "",
                  f"Knowledge QA drawn only from training facts the untouched base answers (known) or only from those "
                  f"it does not (unknown), {mt['facts_per_arm']} facts each, the same downstream data. Test facts "
                  f"split the same way by the base's stored answers: {mt['test_known']} known, {mt['test_unknown']} "
                  "unknown. Format-free %, mean ± std over seeds:", "",
                  "| method | arm | lr | seeds | known test facts | unknown test facts | out-of-pool | downstream mean | KL |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|",
                  f"| base | - | - | - | {_pct(mt['base']['test_known'])} | {_pct(mt['base']['test_unknown'])} | "
                  f"{_pct(mt['base']['out_of_pool'])} | - | 0 |"]  # fmt: skip
        for r in mt["table"]:
            lines.append(f"| {r['method']} | {r['arm']} | {r['lr']:g} | {len(r['seeds'])} | "
                         f"{_pct(r['test_known'])} ± {_pct(r['test_known_std'])} | {_pct(r['test_unknown'])} ± "
                         f"{_pct(r['test_unknown_std'])} | {_pct(r['out_of_pool'])} | {_pct(r['downstream_mean'])} | "
                         f"{r['kl']:.4f} |")  # fmt: skip
        lines += ["", "Paired differences (points, 95 % interval over seeds and questions):", "",
                  "| comparison | seeds x questions | difference |", "|---|---:|---:|"]  # fmt: skip
        lines += [f"| {name} | {len(c['seeds'])} x {c['questions']} | {_diff(c)} |" for name, c in mt["comparisons"].items()]
    return lines


def verdict_lines(report: dict[str, Any]) -> list[str]:
    """What the scale axis, the KL and the mastery arm show, in numbers."""
    lines = []
    axis = report.get("scale_axis") or []
    if len(axis) > 1:
        first, last = axis[0], axis[-1]
        for m in last["methods"]:
            if m == "base" or m not in first["methods"]:
                continue
            a, b = first["methods"][m], last["methods"][m]
            oop = ""
            if OUT_OF_POOL in a and OUT_OF_POOL in b:
                oop = f"; out-of-pool {_ci(a[OUT_OF_POOL])} -> {_ci(b[OUT_OF_POOL])}"
            lines.append(f"- {m} at its decisive lr per scale (x{first['scale']:g} lr {a['lr']:g} -> x{last['scale']:g} "
                         f"lr {b['lr']:g}): test facts {_ci(a.get(KNOWLEDGE_TASK))} -> {_ci(b.get(KNOWLEDGE_TASK))}{oop}; "
                         f"downstream {_pct(a['downstream_mean'])} -> {_pct(b['downstream_mean'])}.")  # fmt: skip
    if axis:
        last = axis[-1]
        for pair, c in last["comparisons"].items():
            lines.append(f"- x{last['scale']:g} (the largest scale finished), {pair}: test facts {_diff(c[KNOWLEDGE_TASK])}, "
                         f"out-of-pool {_diff(c[OUT_OF_POOL])} points.")  # fmt: skip
    kl = report.get("kl") or {}
    for task, rho in (kl.get("spearman") or {}).items():
        if rho is not None:
            lines.append(f"- KL(base || tuned) vs knowledge change on the {FACT_SETS[task]}: Spearman {rho:+.2f} over "
                         f"{len(kl['points'])} runs.")  # fmt: skip
    mt = report.get("mastery")
    if mt:
        for name, c in mt["comparisons"].items():
            lines.append(f"- Mastery arm, {name}: {_diff(c)} points.")
    return lines


# ---- figures -----------------------------------------------------------------------------------------------------


def plot_scaling(report: dict[str, Any], path: Path) -> Path:
    """The paper's Figure 1 at validated lrs: knowledge (test facts, out-of-pool facts; 95 % intervals), downstream
    mean and KL against data scale, one line per method, each point at its scale's own decisive lr."""
    axis = report["scale_axis"]
    fig = Figure(figsize=(17, 4.2), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 4)
    scales = [row["scale"] for row in axis]
    methods = list(axis[-1]["methods"])
    panels = [(KNOWLEDGE_TASK, "World knowledge: test facts (%)"), (OUT_OF_POOL, "World knowledge: out-of-pool (%)"),
              ("downstream_mean", "Downstream mean (%)"), ("kl", "KL(base || tuned), nats/token")]  # fmt: skip
    for ax, (key, title) in zip(axes, panels):
        for i, m in enumerate(methods):
            rows = [(row["scale"], row["methods"][m]) for row in axis if m in row["methods"]]
            if key in (KNOWLEDGE_TASK, OUT_OF_POOL):
                rows = [(s, r[key]) for s, r in rows if key in r]
                if not rows:
                    continue
                ys = [100 * r["mean"] for _, r in rows]
                err = [[y - 100 * r["ci95"][0] for y, (_, r) in zip(ys, rows)],
                       [100 * r["ci95"][1] - y for y, (_, r) in zip(ys, rows)]]  # fmt: skip
            else:
                scale = 100 if key == "downstream_mean" else 1
                ys, err = [scale * r[key] for _, r in rows], None
            style = {"linestyle": "--", "color": "gray"} if m == "base" else {"marker": "o", "color": f"C{i}"}
            ax.errorbar([s for s, _ in rows], ys, yerr=err, label=m, capsize=3, **style)
        ax.set_xscale("log", base=2)
        ax.set_xticks(scales, [f"x{s:g}" for s in scales])
        if key != "kl":  # percentages on their full range, so that a small difference looks small
            ax.set_ylim(0, 102)
        ax.set_xlabel("instruction data scale")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Each point: the method at its lr {lr_basis(report['lr_grid'])} at that scale (bars: 95 % "
                 "interval over seeds and questions)", fontsize=9)  # fmt: skip
    fig.savefig(path)
    return path


def plot_kl(report: dict[str, Any], path: Path) -> Path:
    """Per trained run, KL(base || tuned) against its knowledge change on each fact set, one colour per method."""
    kl = report["kl"]
    tasks = [t for t in FACT_SETS if f"{t}_change" in kl["points"][0]]
    fig = Figure(figsize=(6 * len(tasks), 4.5), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(1, len(tasks)))
    methods = list(dict.fromkeys(p["method"] for p in kl["points"]))
    for ax, task in zip(axes, tasks):
        for i, m in enumerate(methods):
            pts = [p for p in kl["points"] if p["method"] == m]
            xs = [max(p["kl"], KL_FLOOR) for p in pts]
            ax.scatter(xs, [100 * p[f"{task}_change"] for p in pts], s=16, color=f"C{i + 1}", label=m)
        rho = kl["spearman"].get(task)
        ax.axhline(0, color="gray", linewidth=1)
        ax.set_xscale("log")
        ax.set_xlabel("KL(base || tuned), nats/token, held-out prompts")
        ax.set_ylabel("knowledge change vs base (points)")
        ax.set_title(f"{FACT_SETS[task]}: Spearman {'n/a' if rho is None else f'{rho:+.2f}'}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.savefig(path)
    return path
