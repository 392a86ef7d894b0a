"""`loramoe reproduce --sweep experts|rank|lbc`: the paper's sensitivity analysis (its Table 3) on one preset.

Everything but the swept hyperparameter stays fixed: the same base model, data (the largest data scale), steps
and seeds. Each finished (setting, seed) is saved as a small JSON file, written atomically, before the next one
starts; a rerun with the same output directory skips them, so an interrupted sweep resumes where it stopped.
Training, evaluation and routing statistics are the library's (`loramoe.train`, `loramoe.evaluate`,
`loramoe.routing`), configured exactly as `pipeline.run_experiment` configures them.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..evaluate import load_tasks
from .pipeline import (
    KNOWLEDGE_IN_FORMAT,
    RESULTS_DIR,
    Plan,
    Preset,
    build_data,
    config_defaults,
    held_out,
    load_base,
    planned_steps,
    scorer,
    train_and_measure,
    train_config,
    with_overrides,
)  # fmt: skip
from .store import fingerprint, inputs_digest, load_done, weights_sha256, write_json_atomic
from .tasks import KNOWLEDGE_TASK

# sweep name -> (what varies, its settings as Preset field changes); K = N // 2 is the library's default
SWEEPS: dict[str, tuple[str, list[dict[str, Any]]]] = {
    "experts": ("experts N (K = N/2)", [{"num_experts": n} for n in (2, 4, 6, 8)]),
    "rank": ("rank r of each expert", [{"r": r} for r in (2, 4, 8, 16)]),
    "lbc": ("LBC strength (beta, delta)",
            [{"lbc_beta": b, "lbc_delta": d} for b, d in ((0.0, 0.0), (0.1, 0.1), (0.3, 0.1), (0.1, 0.3))]),
}  # fmt: skip


@dataclass
class Setting:
    """One point of a sweep: the preset with the swept fields changed, and the method that trains it."""

    label: str  # e.g. "N=6", "r=4", "beta=0.1, delta=0.1"
    changes: dict[str, Any]
    preset: Preset
    method: str  # loramoe_lbc, or loramoe when beta = 0

    @property
    def key(self) -> str:
        """File-name-safe id, e.g. ``num_experts6`` or ``lbc_beta0.3_lbc_delta0.1``."""
        return "_".join(f"{k}{v:g}" for k, v in sorted(self.changes.items()))


def settings(sweep: str, preset: Preset) -> list[Setting]:
    if sweep not in SWEEPS:
        raise ValueError(f"Unknown sweep {sweep!r}: expected one of {sorted(SWEEPS)}.")
    short = {"num_experts": "N", "r": "r", "lbc_beta": "beta", "lbc_delta": "delta"}
    points = []
    for changes in SWEEPS[sweep][1]:
        p = with_overrides(preset, **changes)
        label = ", ".join(f"{short[k]}={v:g}" for k, v in changes.items())
        points.append(Setting(label, changes, p, "loramoe_lbc" if p.lbc_beta > 0 else "loramoe"))
    return points


def run_sweep(sweep: str, preset: Preset, out: Path, seeds: list[int], scale: float | None = None,
              steps: int | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:  # fmt: skip
    """Train, score and route every (setting, seed) not already saved under ``out/results``; write
    sweep.json, sweep.md and sweep.png in ``out`` after each run and return sweep.json's content.

    Seeds are the outer loop, so an interrupted sweep leaves every setting with about as many seeds.
    """
    out = Path(out)
    with held_out(out, ("work", RESULTS_DIR, "sweep.json", "sweep.md", "sweep.png"), preset):
        return _sweep(sweep, preset, out, seeds, scale, steps, log)


def _sweep(sweep: str, preset: Preset, out: Path, seeds: list[int], scale: float | None, steps: int | None,
           log: Callable[[str], None]) -> dict[str, Any]:  # fmt: skip
    """`run_sweep`'s runs, in its held output folder."""
    if preset.threads:
        torch.set_num_threads(preset.threads)
    scale = max(preset.scales) if scale is None else scale
    points = settings(sweep, preset)
    base, tokenizer = load_base(preset)
    data = build_data(preset, [scale], out / "work", tokenizer)
    n_steps = planned_steps(Plan(preset, out, seeds, [scale], [], steps), data)[scale]
    test = load_tasks(data.test_files)
    samples = test + load_tasks(data.valid_files)
    downstream = list(preset.families)
    meta = {"sweep": sweep, "varies": SWEEPS[sweep][0], "preset": preset.name, "seeds": seeds, "scale": scale,
            "steps": n_steps, "data": data.counts, "downstream_tasks": downstream}  # fmt: skip

    score = scorer(preset, tokenizer, samples)
    meta["base_scores"] = score(base)["scores"]
    inputs = inputs_digest(weights_sha256(base), data.train_files[scale])
    done: dict[tuple[str, int], dict[str, Any]] = {}
    start = time.time()
    for seed in seeds:
        for point in points:
            plan = Plan(point.preset, out / "work" / point.key, [seed], [scale], [point.method], steps)
            cfg = train_config(plan, point.method, scale, point.preset.lr_adapter, seed, data, n_steps)
            path = out / RESULTS_DIR / f"{point.key}_seed{seed}.json"
            result = load_done(path, fingerprint(cfg), inputs, config_defaults())
            if result is not None:
                log(f"{point.label}, seed {seed}: done earlier ({path})")
            else:
                log(f"{point.label}, seed {seed}: training {point.method}, {n_steps} steps "
                    f"[{time.time() - start:.0f} s into this sweep]")  # fmt: skip
                t0 = time.time()
                measured, _ = train_and_measure(cfg, base, tokenizer, score, test, preset.eval_batch_size)
                result = {"setting": point.label, "changes": point.changes, "method": point.method, "seed": seed,
                          **measured, "wall_seconds": time.time() - t0, "inputs": inputs}  # fmt: skip
                write_json_atomic(path, result)
            done[(point.key, seed)] = result
            summary = summarise(meta, points, done)
            write_outputs(summary, out)
    log(f"sweep {sweep} done: {out / 'sweep.md'}")
    return summary


# ---- summary -----------------------------------------------------------------------------------------------------


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def measures(run: dict[str, Any], downstream: list[str]) -> dict[str, float]:
    """The numbers of one run: world knowledge, downstream mean, their average and the routing share gap
    (knowledge-group share on world-knowledge questions minus its mean over the downstream tasks)."""
    wk = run["scores"][KNOWLEDGE_TASK]
    ds = _mean([run["scores"][t] for t in downstream])
    shares = run["knowledge_share"]
    gap = shares[KNOWLEDGE_IN_FORMAT] - _mean([shares[t] for t in downstream])
    return {"world_knowledge": wk, "downstream_mean": ds, "average": (wk + ds) / 2, "routing_gap": gap,
            "train_seconds": run["train_seconds"], "wall_seconds": run["wall_seconds"]}  # fmt: skip


def summarise(meta: dict[str, Any], points: list[Setting], done: dict[tuple[str, int], dict[str, Any]]) -> dict[str, Any]:
    """sweep.json's content: per setting, mean and std over the seeds finished so far."""
    rows = []
    for point in points:
        runs = [done[(point.key, s)] for s in meta["seeds"] if (point.key, s) in done]
        row: dict[str, Any] = {"setting": point.label, "changes": point.changes, "method": point.method,
                               "seeds_done": [r["seed"] for r in runs]}  # fmt: skip
        if runs:
            per_run = [measures(r, meta["downstream_tasks"]) for r in runs]
            for key in per_run[0]:
                values = [m[key] for m in per_run]
                row[key], row[key + "_std"] = _mean(values), _std(values)
            row["downstream"] = {t: _mean([r["scores"][t] for r in runs]) for t in meta["downstream_tasks"]}
            row["trainable_params"] = runs[0]["trainable_params"]
        rows.append(row)
    base = meta["base_scores"]
    base_row = {"world_knowledge": base[KNOWLEDGE_TASK],
                "downstream_mean": _mean([base[t] for t in meta["downstream_tasks"]])}  # fmt: skip
    return {**meta, "base": base_row, "settings": rows}


def _cell(row: dict[str, Any], key: str, scale: float = 100.0, digits: int = 1) -> str:
    if key not in row:
        return "—"
    std = row[key + "_std"]
    text = f"{scale * row[key]:.{digits}f}"
    return text + (f" ± {scale * std:.{digits}f}" if len(row["seeds_done"]) > 1 else "")


def to_markdown(summary: dict[str, Any]) -> str:
    b = summary["base"]
    lines = [
        f"# Sensitivity to {summary['varies']}, preset `{summary['preset']}`",
        "",
        f"Data scale x{summary['scale']:g} ({summary['steps']} optimizer steps per run); seeds {summary['seeds']}; "
        "scores in %, mean ± std over the seeds finished (column `seeds`). World knowledge = exact match on "
        "closed-book questions about facts never fine-tuned on; average = (world knowledge + downstream mean) / 2; "
        "routing gap = knowledge-group router share on world-knowledge questions minus on downstream tasks "
        "(percentage points). Wall s = training + evaluation + routing per run.",
        "",
        "| setting | method | seeds | trainable params | world knowledge | downstream mean | average | routing gap | wall s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        f"| base model | — | — | 0 | {100 * b['world_knowledge']:.1f} | {100 * b['downstream_mean']:.1f} | "
        f"{50 * (b['world_knowledge'] + b['downstream_mean']):.1f} | — | — |",
    ]  # fmt: skip
    for row in summary["settings"]:
        params = f"{row['trainable_params']:,}" if "trainable_params" in row else "—"
        lines.append(
            f"| {row['setting']} | {row['method']} | {len(row['seeds_done'])} | {params} | {_cell(row, 'world_knowledge')} | "
            f"{_cell(row, 'downstream_mean')} | {_cell(row, 'average')} | {_cell(row, 'routing_gap')} | "
            f"{_cell(row, 'wall_seconds', 1.0, 0)} |"
        )
    tasks = summary["downstream_tasks"]
    lines += ["", "Downstream tasks (mean over seeds, %):", "", "| setting | " + " | ".join(tasks) + " |",
              "|---|" + "---:|" * len(tasks)]  # fmt: skip
    for row in summary["settings"]:
        if "downstream" in row:
            lines.append(f"| {row['setting']} | " + " | ".join(f"{100 * row['downstream'][t]:.1f}" for t in tasks) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], path: Path) -> Path:
    """Left: scores (error bars: std over seeds) against the swept setting; right: trainable parameters."""
    rows = [r for r in summary["settings"] if "average" in r]
    fig = Figure(figsize=(11, 4.2), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2, width_ratios=(3, 2))
    xs = list(range(len(rows)))
    labels = [r["setting"].replace(", ", ",\n") for r in rows]
    for key, name, marker in (("world_knowledge", "world knowledge", "o"), ("downstream_mean", "downstream mean", "s"),
                              ("average", "average", "D")):  # fmt: skip
        left.errorbar(xs, [100 * r[key] for r in rows], yerr=[100 * r[key + "_std"] for r in rows], label=name,
                      marker=marker, capsize=3)  # fmt: skip
    left.axhline(100 * summary["base"]["world_knowledge"], color="gray", linestyle="--", label="base: world knowledge")
    left.set_ylim(0, 102)
    left.set_ylabel("score (%)")
    left.set_title(f"Scores vs {summary['varies']} (x{summary['scale']:g} data)")
    bars = right.bar(xs, [r["trainable_params"] for r in rows], color="tab:purple")
    right.bar_label(bars, [f"{r['trainable_params'] / 1000:.0f}k" for r in rows], fontsize=8)
    right.set_ylabel("trainable parameters")
    right.set_title("Trainable parameters")
    for ax in (left, right):
        ax.set_xticks(xs, labels)
        ax.grid(alpha=0.3)
    left.legend(fontsize=8, loc="lower left")
    fig.savefig(path)
    return path


def write_outputs(summary: dict[str, Any], out: Path) -> dict[str, Path]:
    paths = {"json": out / "sweep.json", "markdown": out / "sweep.md", "figure": out / "sweep.png"}
    write_json_atomic(paths["json"], summary)
    paths["markdown"].write_text(to_markdown(summary))
    plot(summary, paths["figure"])
    return paths
