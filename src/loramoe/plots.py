"""Figures of a `RoutingProfile`: the knowledge-group share per dataset x layer (heatmap) and per dataset
(stacked bars, the paper's Figure 7 view). Drawn on Agg canvases without pyplot: no display, no global state."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize, TwoSlopeNorm
from matplotlib.figure import Figure

if TYPE_CHECKING:
    from .routing import RoutingProfile

KNOWLEDGE_COLOR, DOWNSTREAM_COLOR = "#c0392b", "#2e6da4"


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _crowded(names: list[str]) -> bool:
    return len(names) > 4 or max(len(n) for n in names) > 12


def _dataset_labels(profile: RoutingProfile) -> list[str]:
    sep = " " if _crowded(list(profile.datasets)) else "\n"
    return [f"{name}{sep}({d.tokens} tokens)" for name, d in profile.datasets.items()]


def plot_knowledge_heatmap(profile: RoutingProfile, path: str | Path) -> Path:
    """Rows: layers (input side at the top); columns: datasets; colour: share of router weight on the knowledge
    experts (mean over the wrapped modules of the layer). The colour scale is centred on the uniform share K/N."""
    names = list(profile.datasets)
    columns = [profile.layer_knowledge_shares(n) for n in names]
    layers = list(columns[0])
    values = [[col[layer] for col in columns] for layer in layers]
    uniform = profile.knowledge_experts / profile.num_experts
    spread = max([0.05] + [abs(v - uniform) for row in values for v in row])
    if 0.0 < uniform < 1.0:
        norm = TwoSlopeNorm(vcenter=uniform, vmin=max(0.0, uniform - spread), vmax=min(1.0, uniform + spread))
    else:
        norm = Normalize(vmin=0.0, vmax=1.0)

    fig = _new_figure(max(5.5, 1.3 * len(names) + 3.5), max(3.5, 0.3 * len(layers) + 2.0))
    ax = fig.add_subplot()
    image = ax.imshow(values, cmap="coolwarm", norm=norm, aspect="auto")
    if len(layers) * len(names) <= 400:
        for i, row in enumerate(values):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
    ax.set_yticks(range(len(layers)), layers)
    ax.set_xticks(range(len(names)), _dataset_labels(profile), rotation=30 if _crowded(names) else 0,
                  ha="right" if _crowded(names) else "center")
    ax.set_ylabel("layer")
    ax.set_xlabel("dataset")
    ax.set_title(f"Router weight on {profile.knowledge_label} (of {profile.num_experts})\nper layer, mean over its modules")
    bar = fig.colorbar(image, ax=ax)
    bar.set_label(f"share on {profile.knowledge_label} (uniform routing = {uniform:.2f})")
    fig.savefig(path)
    return Path(path)


def plot_knowledge_bars(profile: RoutingProfile, path: str | Path) -> Path:
    """One stacked bar per dataset: the router weight on the knowledge group (bottom) and on the downstream
    group (top), averaged over all layers and modules; a dashed line marks uniform routing."""
    names = list(profile.datasets)
    knowledge = [profile.knowledge_share(n) for n in names]
    downstream = [1.0 - k for k in knowledge]
    uniform = profile.knowledge_experts / profile.num_experts

    fig = _new_figure(max(6.0, 1.1 * len(names) + 2.5), 5.0)
    ax = fig.add_subplot()
    x = range(len(names))
    ax.bar(x, knowledge, width=0.6, color=KNOWLEDGE_COLOR, label=profile.knowledge_label)
    ax.bar(x, downstream, width=0.6, bottom=knowledge, color=DOWNSTREAM_COLOR, label=profile.downstream_label)
    for i, k in enumerate(knowledge):
        ax.text(i, k / 2, f"{100 * k:.1f}%", ha="center", va="center", color="white", fontsize=9, weight="bold")
    ax.axhline(uniform, color="black", linestyle="--", linewidth=1, label=f"uniform routing ({100 * uniform:.0f}%)")
    ax.set_xticks(list(x), _dataset_labels(profile), rotation=30 if _crowded(names) else 0,
                  ha="right" if _crowded(names) else "center")
    ax.set_ylim(0, 1)
    ax.set_xlabel("dataset")
    ax.set_ylabel("share of router weight")
    ax.set_title("Router weight by expert group per dataset\n(mean over all layers and modules)")
    fig.legend(loc="outside lower center", ncol=3, fontsize=8, frameon=False)
    fig.savefig(path)
    return Path(path)
