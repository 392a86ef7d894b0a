"""`loramoe` command line: a thin shell over the Python API. Each command lives in its own module, which
provides ``configure_parser(parser)`` and ``run(args) -> int``, or ``run_argv(argv) -> int`` that takes the
command's arguments unparsed (a thin entry into another tool's command line); only the chosen command's module is
imported.

Failures are one line on stderr, for every command (a new entry in `COMMANDS` gets this for free)::

    loramoe <command>: error: <path or key>: <what is wrong> (<what was expected>)

- exit 2, bad input: a command-line error (argparse), or an exception of the types in `BAD_INPUT`:
  ``ValueError`` and its subclasses (``loramoe.data.DataError``, ``loramoe.evaluate.TaskFileError``, ...),
  ``FileNotFoundError``, ``FileExistsError``, ``NotADirectoryError``, ``IsADirectoryError``,
  ``PermissionError``, or an ``OSError`` "read-only file system" (an output folder that cannot be written).
  Code that rejects input raises one of these, with a message that *starts with the
  path or key* at fault and says what was expected; the wrapper adds only the ``loramoe <command>: error:``
  prefix (an OS error raised by Python itself is shown as ``<filename>: <reason>``).
- exit 1, a run that stopped for a reason it states: ``loramoe.errors.RunStopped`` (e.g. a non-finite loss),
  or a full disk (`loramoe.errors.out_of_space`).
- exit 1, anything else: a bug; the line names the exception type and asks for ``--debug``.
- exit 130: interrupted (Ctrl-C).

``--debug`` (accepted by every command) or the environment variable ``LORAMOE_DEBUG=1`` shows the traceback
instead (the exception is re-raised), and first what third-party libraries printed while they were imported
(held otherwise, whatever they print on whichever CPU: see `loramoe._quiet`).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
import warnings

from ._quiet import HELD, held_output

COMMANDS: dict[str, tuple[str, str]] = {
    "import-official": ("loramoe.interop", "convert an adapter saved by the reference LoRAMoE code"),
    "train": ("loramoe.train", "fine-tune with LoRAMoE + LBC (or plain LoRA / full) on instruction files"),
    "eval": ("loramoe.evaluate", "score a model (base, base + adapter, or full checkpoint) on JSON-lines task files"),
    "routes": ("loramoe.routing", "mean router weight per expert group, dataset and layer of a LoRAMoE model (JSON + PNG)"),
    "reproduce": ("loramoe.reproduce.cli", "the paper's experiment in miniature: forgetting under SFT, LoRAMoE's cure"),
    "lm-eval": ("loramoe.lm_eval", "lm-evaluation-harness with LoRAMoE registered; make-task: task files as lm-eval tasks"),
    "serve": ("loramoe.vllm.serve", "serve a base model + LoRAMoE adapter with vLLM's OpenAI-compatible server"),
}

BAD_INPUT = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)
EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED = 2, 1, 130


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the usage itself is one ``--help`` away)."""

    def error(self, message: str) -> None:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def describe(error: BaseException) -> str:
    """The error as one line: ``<filename>: <reason>`` for an OS error raised by Python, else its message."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        names = [str(error.filename)] + ([str(error.filename2)] if error.filename2 is not None else [])
        text = f"{' -> '.join(names)}: {error.strerror}"
    else:
        text = str(error).strip() or type(error).__name__
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _debug(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("LORAMOE_DEBUG", "").lower() in ("1", "true", "yes")


def _exit_code(call, argv: list[str]):
    """``call(argv)``; a usage error or --help (argparse exits: the message is already printed) as its exit code."""
    try:
        return call(argv)
    except SystemExit as e:
        if e.code is None:
            return 0
        return e.code if isinstance(e.code, int) else EXIT_BAD_INPUT


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # PEFT 0.21 still calls a transformers API deprecated in 5.x; the warning is noise for CLI users.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    parser = OneLineParser(prog="loramoe", description="LoRAMoE adapters for Hugging Face causal LMs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    subparsers = {name: sub.add_parser(name, help=text, description=text) for name, (_, text) in COMMANDS.items()}
    command = argv[0] if argv and argv[0] in COMMANDS else None
    prog = f"loramoe {command}" if command else "loramoe"
    debug = _debug(argv)
    try:
        if command:
            with held_output():  # the command's own third-party imports (see loramoe._quiet)
                module = importlib.import_module(COMMANDS[command][0])
            if debug and HELD:
                sys.stderr.write("".join(HELD))
            if hasattr(module, "run_argv"):  # another tool's command line: its arguments, unparsed (--debug is ours)
                return int(_exit_code(module.run_argv, [a for a in argv[1:] if a != "--debug"]) or 0)
            module.configure_parser(subparsers[command])
            subparsers[command].add_argument("--debug", action="store_true",
                                             help="show the traceback of a failure (or set LORAMOE_DEBUG=1)")  # fmt: skip
        args = _exit_code(parser.parse_args, argv)
        if isinstance(args, int):  # a usage error (already printed as one line) or --help
            return args
        vars(args).pop("debug", None)
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        if debug:
            raise
        from .errors import RunStopped, out_of_space

        if isinstance(e, BAD_INPUT) or (isinstance(e, OSError) and e.errno == errno.EROFS):
            print(f"{prog}: error: {describe(e)}", file=sys.stderr)
            return EXIT_BAD_INPUT
        if isinstance(e, RunStopped) or out_of_space(e):
            print(f"{prog}: error: {describe(e)}", file=sys.stderr)
            return EXIT_FAILED
        print(f"{prog}: error: internal error ({type(e).__name__}: {describe(e)}); rerun with --debug for the "
              "traceback and report it", file=sys.stderr)  # fmt: skip
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
