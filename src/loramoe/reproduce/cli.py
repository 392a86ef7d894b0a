"""`loramoe reproduce`: run the comparison (base, full SFT, LoRA, LoRAMoE, LoRAMoE+LBC) and write the report."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from ..quantization import add_cli_options as add_quantize_options
from .pipeline import ADAPTER_METHODS, METHODS, Plan, open_out, run_experiment, with_overrides
from .presets import PRESETS, TINY_BASE, smollm2_preset, tiny_preset
from .report import summarise, to_markdown, write_report
from .sweep import SWEEPS, run_sweep


# Preset fields a user may override from the command line (the rest is the preset's design).
def _lr(text: str) -> float:
    lr = float(text)  # a ValueError is argparse's "invalid _lr value"
    if not (math.isfinite(lr) and lr > 0):
        raise argparse.ArgumentTypeError(f"{text!r}: expected a finite learning rate > 0")
    return lr


OVERRIDES = {"downstream_per_family": int, "test_per_family": int, "valid_per_family": int, "epochs": float,
             "batch_size": int, "lr_full": _lr, "lr_adapter": _lr, "decisive_seeds": int, "num_experts": int,
             "r": int, "lora_alpha": float, "lbc_beta": float, "lbc_delta": float, "threads": int}  # fmt: skip


def _lr_grid_entry(text: str) -> tuple[str, tuple[float, ...]]:
    """``METHOD=LR[,LR...]``, e.g. ``sft=1e-5,3e-5,1e-4``."""
    method, sep, values = text.partition("=")
    if not sep or method not in METHODS or METHODS[method] is None:
        trained = [m for m in METHODS if METHODS[m] is not None]
        raise argparse.ArgumentTypeError(f"{text!r}: expected METHOD=LR[,LR...] with METHOD one of {trained}")
    try:
        lrs = tuple(sorted({float(v) for v in values.split(",")}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: learning rates must be numbers, e.g. sft=1e-5,3e-5") from None
    if not lrs or any(not (math.isfinite(lr) and lr > 0) for lr in lrs):
        raise argparse.ArgumentTypeError(f"{text!r}: expected finite learning rates > 0")
    return method, lrs


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
    parser.add_argument("--lr-grid", nargs="+", type=_lr_grid_entry, default=None, metavar="METHOD=LR[,LR...]",
                        help="learning rates per method: the frontier's grid (default: the preset's; --lr-full / "
                             "--lr-adapter set a single lr instead)")
    parser.add_argument("--knowledge-test", type=Path, default=None, metavar="FILE",
                        help='extra closed-book test, JSON lines {"question", "answers": [...]}: never trained on, '
                             "scored format-free and in-format for every method")
    parser.add_argument("--decisive-at", choices=("largest", "every"), default=None,
                        help="where the decisive setting gets its --decisive-seeds: the largest data scale only, or "
                             "every scale (the scale axis; default: the preset's)")
    parser.add_argument("--mastery", type=float, default=None, metavar="SCALE",
                        help="also train every method at SCALE's decisive lrs with knowledge QA on only the facts the "
                             "base model answers (known) or only those it does not (unknown), same counts, "
                             "--decisive-seeds seeds each")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: write the report from the runs stored in OUT/results (a data scale "
                             "without its full grid is left out)")
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
        raise ValueError(f"--seeds: must be >= 1, got {args.seeds}")
    changes = {k: getattr(args, k) for k in (*OVERRIDES, "quantize", "bnb_compute_dtype", "decisive_at")
               if getattr(args, k) is not None}  # fmt: skip
    if args.target_modules:
        changes["target_modules"] = tuple(args.target_modules)
    preset = tiny_preset(args.base, **changes) if args.preset == "tiny" else smollm2_preset(**changes)
    preset = with_overrides(preset, lr_grid=lr_grid(preset.lr_grid, args))
    scales = sorted(args.scales) if args.scales else list(preset.scales)
    if args.sweep:
        unused = [flag for flag, value in (("--lr-grid", args.lr_grid), ("--knowledge-test", args.knowledge_test),
                                           ("--decisive-seeds", args.decisive_seeds), ("--mastery", args.mastery),
                                           ("--decisive-at", args.decisive_at),
                                           ("--report-only", args.report_only or None)) if value is not None]  # fmt: skip
        if unused:
            raise ValueError(f"{unused[0]}: not used by --sweep (a sweep trains at --lr-adapter on the preset's own "
                             "test sets; expected the comparison, without --sweep)")  # fmt: skip
        open_out(args.out, (f"sweep_{args.sweep}",), preset)
        run_sweep(args.sweep, preset, args.out / f"sweep_{args.sweep}", list(range(args.seeds)), max(scales), args.steps)
        return 0
    plan = Plan(preset, args.out, list(range(args.seeds)), scales, methods_to_run(args.methods, args.quantize), args.steps,
                knowledge_test=args.knowledge_test, mastery_scale=args.mastery, train_missing=not args.report_only)
    raw = run_experiment(plan)
    (args.out / "raw_results.json").write_text(json.dumps(raw, indent=1) + "\n")
    report = summarise(raw)
    paths = write_report(report, args.out)
    print(to_markdown(report))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def lr_grid(grid: dict[str, tuple[float, ...]], args: argparse.Namespace) -> dict[str, tuple[float, ...]]:
    """The preset's grid, where --lr-full / --lr-adapter replace it by one lr and --lr-grid entries replace it
    (a method given twice, ``sft=1e-3 sft=2e-3``, trains at both, like ``sft=1e-3,2e-3``)."""
    grid = dict(grid)
    if args.lr_full is not None:
        grid.pop("sft", None)
    if args.lr_adapter is not None:
        for method in ADAPTER_METHODS:
            grid.pop(method, None)
    given: dict[str, tuple[float, ...]] = {}
    for method, lrs in args.lr_grid or []:
        given[method] = tuple(sorted({*given.get(method, ()), *lrs}))
    grid.update(given)
    return grid
