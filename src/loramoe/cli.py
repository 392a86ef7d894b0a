"""`loramoe` command line: a thin shell over the Python API. Each command lives in its own module, which
provides ``configure_parser(parser)`` and ``run(args) -> int``, or ``run_argv(argv) -> int`` that takes the
command's arguments unparsed; only the chosen command's module is imported."""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

COMMANDS: dict[str, tuple[str, str]] = {
    "import-official": ("loramoe.interop", "convert an adapter saved by the reference LoRAMoE code"),
    "train": ("loramoe.train", "fine-tune with LoRAMoE + LBC (or plain LoRA / full) on instruction files"),
    "eval": ("loramoe.evaluate", "score a model (base, base + adapter, or full checkpoint) on JSON-lines task files"),
    "routes": ("loramoe.routing", "mean router weight per expert group, dataset and layer of a LoRAMoE model (JSON + PNG)"),
    "reproduce": ("loramoe.reproduce.cli", "the paper's experiment in miniature: forgetting under SFT, LoRAMoE's cure"),
    "lm-eval": ("loramoe.lm_eval", "lm-evaluation-harness with LoRAMoE registered; make-task: task files as lm-eval tasks"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # PEFT 0.21 still calls a transformers API deprecated in 5.x; the warning is noise for CLI users.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    parser = argparse.ArgumentParser(prog="loramoe", description="LoRAMoE adapters for Hugging Face causal LMs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    subparsers = {name: sub.add_parser(name, help=text, description=text) for name, (_, text) in COMMANDS.items()}
    if argv and argv[0] in COMMANDS:
        module = importlib.import_module(COMMANDS[argv[0]][0])
        if hasattr(module, "run_argv"):  # a thin entry into another tool's command line: its arguments, unparsed
            return int(module.run_argv(argv[1:]) or 0)
        module.configure_parser(subparsers[argv[0]])
    args = parser.parse_args(argv)
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
