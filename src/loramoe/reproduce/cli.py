"""`loramoe reproduce`: run the comparison (base, full SFT, LoRA, LoRAMoE, LoRAMoE+LBC) and write the report."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..quantization import add_cli_options as add_quantize_options
from .pipeline import METHODS, Plan, run_experiment
from .presets import PRESETS, TINY_BASE, smollm2_preset, tiny_preset
from .report import summarise, to_markdown, write_report
from .sweep import SWEEPS, run_sweep

# Preset fields a user may override from the command line (the rest is the preset's design).
OVERRIDES = {"downstream_per_family": int, "test_per_family": int, "epochs": float, "batch_size": int,
             "lr_full": float, "lr_adapter": float, "num_experts": int, "r": int, "lora_alpha": float,
             "lbc_beta": float, "lbc_delta": float, "threads": int}  # fmt: skip


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                        help="tiny: the miniature world and its shipped base (minutes on a CPU); smollm2: SmolLM2-135M")
    parser.add_argument("--out", type=Path, default=Path("runs/reproduce"), help="output directory")
    parser.add_argument("--seeds", type=int, default=1, help="repeat every method with seeds 0..N-1 (mean ± std)")
    parser.add_argument("--scales", type=float, nargs="+", default=None, help="data scales (default: the preset's)")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=None,
                        help="methods to run (default: all; with --quantize all but sft)")
    parser.add_argument("--steps", type=int, default=None,
                        help="optimizer steps of every run (default: the preset's epochs over each scale's data)")
    parser.add_argument("--base", type=Path, default=TINY_BASE, help="tiny preset: the pre-trained base directory")
    parser.add_argument("--sweep", choices=sorted(SWEEPS), default=None,
                        help="sensitivity analysis instead of the comparison: vary N, r or (beta, delta) of LoRAMoE "
                             "at the largest scale (writes OUT/sweep_NAME; resumes finished settings)")
    parser.add_argument("--target-modules", nargs="+", default=None,
                        help="adapter targets for lora/loramoe (default: the preset's; FFN linears unless set)")
    for name, kind in OVERRIDES.items():
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help="override the preset's value")
    add_quantize_options(parser)


def methods_to_run(requested: list[str] | None, quantize: str | None) -> list[str]:
    """The methods asked for (default: all). Full SFT cannot train a quantized base: left out of the default
    list with a note, refused when asked for by name."""
    methods = list(requested or METHODS)
    if quantize and "sft" in methods:
        if requested:
            raise ValueError(f"--methods: sft (full fine-tuning) cannot train a {quantize} base (expected the "
                             "adapter methods only with --quantize: base lora loramoe loramoe_lbc)")  # fmt: skip
        methods.remove("sft")
        print(f"--quantize {quantize}: sft left out (full fine-tuning cannot train quantized weights)")
    return methods


def run(args: argparse.Namespace) -> int:
    if args.seeds < 1:
        raise SystemExit(f"--seeds must be >= 1, got {args.seeds}")
    changes = {k: getattr(args, k) for k in (*OVERRIDES, "quantize", "bnb_compute_dtype") if getattr(args, k) is not None}
    if args.target_modules:
        changes["target_modules"] = tuple(args.target_modules)
    preset = tiny_preset(args.base, **changes) if args.preset == "tiny" else smollm2_preset(**changes)
    scales = sorted(args.scales) if args.scales else list(preset.scales)
    if args.sweep:
        run_sweep(args.sweep, preset, args.out / f"sweep_{args.sweep}", list(range(args.seeds)), max(scales), args.steps)
        return 0
    plan = Plan(preset, args.out, list(range(args.seeds)), scales, methods_to_run(args.methods, args.quantize), args.steps)
    raw = run_experiment(plan)
    (args.out / "raw_results.json").write_text(json.dumps(raw, indent=1) + "\n")
    report = summarise(raw)
    paths = write_report(report, args.out)
    print(to_markdown(report))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0
