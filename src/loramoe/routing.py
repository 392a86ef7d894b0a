"""Where does the router send each kind of input? For a LoRAMoE model and several datasets, the mean router
weight of every expert per dataset and per wrapped module, and from it the share of the *knowledge group*
(experts 0..K-1, K = ``knowledge_experts`` of the adapter config) per dataset and layer: the paper's Figure 7.

The average is token-weighted: every non-padding token of a dataset counts once (prompt tokens; with
``include_answer`` the reference answer's tokens too). The capture itself is `loramoe.capture_routing`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from .evaluate import EvalSample, batched, load_tasks, model_device, pad_sequences, pad_token_id
from .model import capture_routing, find_tuner

_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def layer_of(module_name: str) -> str:
    """The layer a wrapped module belongs to: its first numeric path component (``model.layers.3.mlp.up_proj``
    -> ``"3"``), or the module name itself when it has none."""
    match = _LAYER_INDEX.search(module_name)
    return match.group(1) if match else module_name


def expert_range(lo: int, hi: int) -> str:
    """Human-readable expert indices lo..hi (inclusive)."""
    if hi < lo:
        return "no experts"
    return f"expert {lo}" if lo == hi else f"experts {lo}..{hi}"


@dataclass
class DatasetRouting:
    """Token-weighted mean router weight per expert, for every wrapped module, over one dataset."""

    samples: int
    tokens: int
    modules: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class RoutingProfile:
    num_experts: int
    knowledge_experts: int
    include_answer: bool
    datasets: dict[str, DatasetRouting]

    @property
    def knowledge_label(self) -> str:
        return f"knowledge {expert_range(0, self.knowledge_experts - 1)}"

    @property
    def downstream_label(self) -> str:
        return f"downstream {expert_range(self.knowledge_experts, self.num_experts - 1)}"

    def module_knowledge_shares(self, dataset: str) -> dict[str, float]:
        k = self.knowledge_experts
        return {m: float(sum(w[:k])) for m, w in self.datasets[dataset].modules.items()}

    def layer_knowledge_shares(self, dataset: str) -> dict[str, float]:
        """Knowledge-group share per layer: the mean over the wrapped modules of that layer."""
        per_layer: dict[str, list[float]] = {}
        for module, share in self.module_knowledge_shares(dataset).items():
            per_layer.setdefault(layer_of(module), []).append(share)
        order = sorted(per_layer, key=lambda x: (not x.isdigit(), int(x) if x.isdigit() else 0, x))
        return {layer: sum(per_layer[layer]) / len(per_layer[layer]) for layer in order}

    def expert_shares(self, dataset: str) -> list[float]:
        """Mean weight per expert over all modules (every module sees the same tokens)."""
        modules = list(self.datasets[dataset].modules.values())
        return [sum(col) / len(modules) for col in zip(*modules)]

    def knowledge_share(self, dataset: str) -> float:
        return float(sum(self.expert_shares(dataset)[: self.knowledge_experts]))

    def to_dict(self) -> dict[str, Any]:
        k, n = self.knowledge_experts, self.num_experts
        knowledge = {name: self.module_knowledge_shares(name) for name in self.datasets}
        return {
            "num_experts": n,
            "knowledge_experts": k,
            "groups": {"knowledge": list(range(k)), "downstream": list(range(k, n))},
            "tokens_counted": "prompt+answer" if self.include_answer else "prompt",
            "average": "token-weighted mean router weight over the non-padding tokens of each dataset",
            "datasets": {
                name: {
                    "samples": d.samples,
                    "tokens": d.tokens,
                    "knowledge_share": self.knowledge_share(name),
                    "expert_shares": self.expert_shares(name),
                    "layers": self.layer_knowledge_shares(name),
                    "modules": {
                        m: {"expert_shares": w, "knowledge_share": knowledge[name][m]}
                        for m, w in d.modules.items()
                    },
                }
                for name, d in self.datasets.items()
            },
        }

    def to_markdown(self) -> str:
        lines = [f"| dataset | samples | tokens | share on {self.knowledge_label} |", "|---|---:|---:|---:|"]
        for name, d in self.datasets.items():
            lines.append(f"| {name} | {d.samples} | {d.tokens} | {self.knowledge_share(name):.3f} |")
        return "\n".join(lines) + "\n"

    def save(self, out_dir: str | Path) -> dict[str, Path]:
        """Write ``routing.json``, ``routing.md`` and the two figures into ``out_dir``."""
        from .plots import plot_knowledge_bars, plot_knowledge_heatmap

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"json": out / "routing.json", "markdown": out / "routing.md",
                 "heatmap": out / "routing_heatmap.png", "bars": out / "routing_bars.png"}
        data = self.to_dict()
        data["figures"] = {"heatmap": paths["heatmap"].name, "bars": paths["bars"].name}
        paths["json"].write_text(json.dumps(data, indent=2) + "\n")
        paths["markdown"].write_text(self.to_markdown())
        plot_knowledge_heatmap(self, paths["heatmap"])
        plot_knowledge_bars(self, paths["bars"])
        return paths


@torch.inference_mode()
def routing_profile(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    samples: Sequence[EvalSample],
    batch_size: int = 8,
    include_answer: bool = False,
    progress: bool = True,
) -> RoutingProfile:
    """Run every sample through ``model`` (a PEFT model with a LoRAMoE adapter) while capturing the routing, and
    average the router weights per dataset (= task name) and module over the non-padding tokens."""
    if not samples:
        raise ValueError("routing_profile: no samples.")
    tuner = find_tuner(model)
    config = tuner.peft_config[tuner.active_adapters[0]]
    pad_id, device = pad_token_id(tokenizer), model_device(model)
    was_training = model.training
    model.eval()

    by_dataset: dict[str, list[EvalSample]] = {}
    for s in samples:
        by_dataset.setdefault(s.task, []).append(s)
    seqs = {
        name: sorted(
            (tokenizer(s.prompt)["input_ids"]
             + (tokenizer(s.reference, add_special_tokens=False)["input_ids"] if include_answer else [])
             for s in group),
            key=len,
        )
        for name, group in by_dataset.items()
    }
    bar = tqdm(total=sum(len(batched(v, batch_size)) for v in seqs.values()), desc="routes", unit="batch",
               disable=not progress)
    datasets = {}
    try:
        for name, group in seqs.items():
            sums: dict[str, torch.Tensor] = {}
            tokens = 0
            for batch in batched(group, batch_size):
                ids, mask = pad_sequences(batch, pad_id, left=False)
                with capture_routing(model) as record:
                    model(input_ids=ids.to(device), attention_mask=mask.to(device), logits_to_keep=1)
                n = int(mask.sum())
                for module, share in record.expert_shares().items():  # mean over this batch's real tokens
                    sums[module] = sums.get(module, 0) + share.double() * n
                tokens += n
                bar.update()
            modules = {m: (s / tokens).tolist() for m, s in sums.items()}
            datasets[name] = DatasetRouting(samples=len(group), tokens=tokens, modules=modules)
    finally:
        bar.close()
        model.train(was_training)
    return RoutingProfile(num_experts=config.num_experts, knowledge_experts=config.knowledge_experts,
                          include_answer=include_answer, datasets=datasets)


# ---- command line ----------------------------------------------------------------------------------------------
def configure_parser(parser) -> None:
    from .evaluate import add_model_options, add_split_option

    parser.add_argument("--base", required=True, help="base model: Hugging Face directory, .gguf file or 'smollm2'")
    parser.add_argument("--adapter", required=True, help="LoRAMoE adapter directory")
    parser.add_argument("--tokenizer", default=None, help="tokenizer location (default: --base)")
    parser.add_argument("--tasks", nargs="+", required=True,
                        help="task files (JSON lines or datasets sources, as for `loramoe eval`); a dataset is a task "
                             "name (default: the file stem)")
    add_split_option(parser)
    parser.add_argument("--out", required=True,
                        help="output directory for routing.json, routing.md, routing_heatmap.png, routing_bars.png")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--include-answer", action="store_true",
                        help="count the reference answer's tokens too (default: prompt tokens only)")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N samples of each dataset")
    add_model_options(parser)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _peft_type(adapter: Path) -> str | None:
    """The ``peft_type`` an adapter folder declares (``None``: none readable; loading it then says what is wrong)."""
    try:
        return json.loads((adapter / "adapter_config.json").read_text()).get("peft_type")
    except (OSError, ValueError, AttributeError):
        return None


ROUTING_FILES = ("routing.json", "routing.md", "routing_heatmap.png", "routing_bars.png")


def run(args) -> int:
    from .evaluate import claim_out, load_for_cli

    samples = load_tasks(args.tasks, limit=args.limit, split=args.data_split)
    out = claim_out(args, ROUTING_FILES, "routes")
    kind = _peft_type(Path(args.adapter))
    if kind not in (None, "LORAMOE"):
        raise ValueError(f"{args.adapter}: a {kind} adapter, which has no router to profile (expected a LoRAMoE "
                         "adapter, e.g. one trained with loramoe train --method loramoe)")  # fmt: skip
    model, tokenizer = load_for_cli(args)
    profile = routing_profile(model, tokenizer, samples, batch_size=args.batch_size,
                              include_answer=args.include_answer, progress=not args.no_progress)
    out.create().record(ROUTING_FILES)
    paths = profile.save(out.path)
    print(profile.to_markdown())
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
