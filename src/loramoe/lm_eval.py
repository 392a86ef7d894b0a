"""lm-evaluation-harness (0.4.x) for LoRAMoE models, and `loramoe eval`'s task files as lm-eval tasks.

    loramoe lm-eval make-task examples/eval/*.jsonl --tokenizer BASE --out runs/lm_tasks
    loramoe lm-eval --model hf --model_args pretrained=BASE,peft=ADAPTER --device cpu \\
        --include_path runs/lm_tasks --tasks cbqa_mini,nli_mini

``loramoe lm-eval ARGS`` is lm-eval's own command line (``lm-eval ARGS``) with LoRAMoE registered as a PEFT
method first: lm-eval's ``hf`` model loads adapters with ``PeftModel.from_pretrained``, which fails on a LoRAMoE
adapter's unknown ``peft_type`` unless ``import loramoe`` ran in the process.

``make-task`` turns `loramoe eval` task files (JSON lines or `datasets` sources) into lm-eval task configs that
run offline (``dataset_path: json`` on a local copy of the records), one per task, from the templates shipped in
``loramoe/lm_eval_tasks/``, and scored as `loramoe eval` scores them, so the two agree on a shared task:

- generate -> ``generate_until``: greedy, until the stop strings (default "\\n") or EOS, at most 32 new tokens;
  exact match and token F1 of the normalised answer against any alias (`process_generate`);
- choice -> ``multiple_choice``: the option with the highest mean log-probability per option token wins
  (`process_choice`). lm-eval's own ``acc`` ranks the summed log-likelihood, ``acc_norm`` divides it by the
  option's length in characters and ``acc_bytes`` in bytes; none is per token, and a task sees only the summed
  log-likelihoods, so make-task stores each option's token count (``--tokenizer``) in the records.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from string import Template
from typing import Any

from .evaluate import EvalSample, exact_match, load_tasks, token_f1
from .outputs import OutputDir

TEMPLATES = Path(__file__).parent / "lm_eval_tasks"


# ---- scoring, called by lm-eval through the task configs' `process_results: !function` ------------------------
def process_generate(doc: dict[str, Any], results: Sequence[str]) -> dict[str, float]:
    """`loramoe eval`'s generate metrics of lm-eval's generation (already cut at the stop strings)."""
    return {"exact_match": exact_match(results[0], doc["answers"]), "f1": token_f1(results[0], doc["answers"])}


def process_choice(doc: dict[str, Any], results: Sequence[tuple[float, bool]]) -> dict[str, float]:
    """Accuracy of the option with the highest mean log-probability per token (ties: the first option), from
    lm-eval's summed log-likelihoods and the token counts make-task stored."""
    means = [ll / n for (ll, _), n in zip(results, doc["option_tokens"])]
    picked = max(range(len(means)), key=lambda j: (means[j], -j))
    return {"accuracy": float(picked == doc["answer"])}


# ---- task configs ----------------------------------------------------------------------------------------------
def _task_name(task: str) -> str:
    """A task name lm-eval and the file system both take (``--tasks`` splits on commas)."""
    return re.sub(r"[^\w.-]", "_", task)


def _doc(sample: EvalSample, tokenizer: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"prompt": sample.prompt, "source": sample.source}
    if sample.type == "generate":
        return {**doc, "answers": sample.answers}
    counts = [len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in sample.choices]
    if 0 in counts:
        raise ValueError(f"{sample.source}: choice {counts.index(0)} ({sample.choices[counts.index(0)]!r}) encodes to "
                         "no tokens (expected at least one)")  # fmt: skip
    return {**doc, "choices": sample.choices, "answer": sample.answer, "option_tokens": counts}


def make_tasks(
    files: Sequence[str | Path],
    out_dir: str | Path,
    tokenizer: str | None = None,
    max_new_tokens: int = 32,
    stop: Sequence[str] = ("\n",),
    split: str | None = None,
) -> dict[str, Path]:
    """Write ``<task>.yaml`` (an lm-eval task config) and ``<task>.jsonl`` (its records) into ``out_dir`` for
    every task of ``files``; return ``{lm-eval task name: config path}``. ``tokenizer`` (a model location, as
    for `loramoe eval`) is needed for choice tasks: it counts each option's tokens."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens: expected an integer >= 1, got {max_new_tokens}")
    samples = load_tasks(files, split=split)
    by_task: dict[str, list[EvalSample]] = {}
    for s in samples:
        by_task.setdefault(s.task, []).append(s)
    names: dict[str, str] = {}
    for task in by_task:
        name = _task_name(task)
        if name in names:
            raise ValueError(f"task {task!r}: its lm-eval name {name!r} is also that of task {names[name]!r} "
                             "(expected task names that differ in letters, digits, '.', '-' or '_')")  # fmt: skip
        names[name] = task
    tok = None
    if any(group[0].type == "choice" for group in by_task.values()):
        if tokenizer is None:
            raise ValueError("tokenizer: choice tasks need one, to count each option's tokens (--tokenizer BASE)")
        from .loading import load_tokenizer

        tok = load_tokenizer(tokenizer)
    records = {name: "".join(json.dumps(_doc(s, tok)) + "\n" for s in by_task[task]) for name, task in names.items()}
    entries = [f"{name}{suffix}" for name in names for suffix in (".yaml", ".jsonl")]
    folder = OutputDir(out_dir, "--out", owner="lm-eval").claim(entries).create()  # only its own files are replaced (loramoe.outputs)
    folder.record(entries)
    out = folder.path
    written: dict[str, Path] = {}
    for name, task in names.items():
        group = by_task[task]
        config, data = out / f"{name}.yaml", out / f"{name}.jsonl"
        data.write_text(records[name], encoding="utf-8")
        template = Template((TEMPLATES / f"_{group[0].type}_template_yaml").read_text(encoding="utf-8"))
        sources = sorted({s.source.rsplit(":", 1)[0] for s in group})
        config.write_text(template.substitute(
            task=name, data_file=json.dumps(str(data.resolve())), source=", ".join(sources),
            until=json.dumps(list(stop)), max_gen_toks=max_new_tokens, tokenizer=json.dumps(tokenizer),
        ), encoding="utf-8")  # fmt: skip
        written[name] = config
    return written


# ---- command line ----------------------------------------------------------------------------------------------
USAGE = """usage: loramoe lm-eval [lm-eval arguments]      lm-eval's command line, with LoRAMoE registered
       loramoe lm-eval make-task FILE [FILE ...] --out DIR [--tokenizer BASE]
                                               `loramoe eval` task files as lm-eval tasks (make-task -h)
"""


def _make_task_parser() -> argparse.ArgumentParser:
    from .cli import OneLineParser
    from .evaluate import add_split_option

    parser = OneLineParser(prog="loramoe lm-eval", description=make_tasks.__doc__,  # errors: `loramoe lm-eval: error:`
                           usage="loramoe lm-eval make-task FILE [FILE ...] --out DIR [--tokenizer BASE] [options]")
    parser.add_argument("files", nargs="+", help="task files, as `loramoe eval --tasks` takes them")
    parser.add_argument("--out", required=True, help="folder for the configs (give it to lm-eval as --include_path)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer (a model location) for choice tasks")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--stop", action="append", default=None,
                        help=r"stop string for generate tasks, repeatable; '\n' and '\t' are understood (default '\n')")
    add_split_option(parser)
    return parser


def run_argv(argv: list[str]) -> int:
    """``make-task ...`` here; everything else goes to lm-eval's command line, LoRAMoE registered first."""
    if argv and argv[0] == "make-task":
        args = _make_task_parser().parse_args(argv[1:])
        stop = ["\n"] if args.stop is None else [s.replace("\\n", "\n").replace("\\t", "\t") for s in args.stop]
        written = make_tasks(args.files, args.out, args.tokenizer, args.max_new_tokens, stop, args.data_split)
        for name, path in written.items():
            print(f"{name}: {path}")
        print(f"run: loramoe lm-eval --model hf --model_args pretrained=BASE[,peft=ADAPTER] --include_path {args.out} "
              f"--tasks {','.join(written)}")  # fmt: skip
        return 0
    if argv in ([], ["-h"], ["--help"]):
        print(USAGE)
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError:
        print("loramoe lm-eval: error: lm-eval is not installed (pip install 'loramoe[lm-eval]')", file=sys.stderr)
        return 2
    import loramoe  # noqa: F401  (registers the LoRAMoE PEFT method for lm-eval's `peft=`)

    saved, sys.argv = sys.argv, ["lm-eval", *argv]  # lm-eval's parser reads sys.argv
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0
