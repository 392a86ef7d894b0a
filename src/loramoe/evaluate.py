"""Score a causal LM on task files: closed-book QA by greedy generation (exact match / token F1 against any
alias) and multiple-choice tasks by length-normalised log-likelihood (accuracy). This is how the method's two
claims are measured: world knowledge kept, downstream skill gained.

Task files are JSON lines, one sample per line (blank lines are skipped), or Hugging Face ``datasets`` sources
with these columns (``save_to_disk`` folders, .parquet, .arrow, Hub ids; see `loramoe.sources`)::

    {"task": "triviaqa", "type": "generate", "prompt": "Q: ...\\nA:", "answers": ["Paris", "Paris, France"]}
    {"task": "nli", "type": "choice", "prompt": "... Entailed?", "choices": [" yes", " no"], "answer": 0}

``task`` defaults to the file's stem; ``id`` and ``meta`` are optional and copied to the predictions.
See docs/evaluation.md.
"""

from __future__ import annotations

import contextlib
import json
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList

from .sources import SourceError, check_split, is_dataset_source, read_rows

MAIN_METRIC = {"generate": "exact_match", "choice": "accuracy"}
_REQUIRED = {"generate": ("prompt", "answers"), "choice": ("prompt", "choices", "answer")}
_OPTIONAL = ("task", "type", "id", "meta")


# ---- task files ----------------------------------------------------------------------------------------------
@dataclass
class EvalSample:
    """One scored sample. ``answers`` for generate tasks; ``choices`` and ``answer`` (an index) for choice tasks;
    ``source`` is ``file:line``, so that every prediction can be traced back."""

    task: str
    type: str
    prompt: str
    answers: list[str] = field(default_factory=list)
    choices: list[str] = field(default_factory=list)
    answer: int = -1
    source: str = ""
    id: Any = None
    meta: Any = None

    @property
    def reference(self) -> str:
        """The correct answer's text: the first alias, or the correct choice."""
        return self.answers[0] if self.type == "generate" else self.choices[self.answer]


class TaskFileError(ValueError):
    """A task file that cannot be read as documented; the message names the file and line."""


def _is_str_list(value: Any, min_len: int) -> bool:
    return isinstance(value, list) and len(value) >= min_len and all(isinstance(v, str) and v for v in value)


def _parse_record(record: Any, where: str, default_task: str) -> EvalSample:
    def fail(msg: str) -> TaskFileError:
        return TaskFileError(f"{where}: {msg}")

    if not isinstance(record, dict):
        raise fail(f"expected a JSON object, got {type(record).__name__}")
    try:  # a lone UTF-16 surrogate ("\\ud800" without its pair) is no character: no tokenizer takes it
        json.dumps(record, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise fail(f"holds {e.object[e.start]!r}, a lone UTF-16 surrogate, not text (expected a character, or a "
                   "surrogate pair such as \\ud83d\\ude00)") from None
    kind = record.get("type")
    if kind not in _REQUIRED:
        raise fail(f"unknown task type {kind!r}; expected 'generate' or 'choice' in the 'type' field")
    missing = [k for k in _REQUIRED[kind] if k not in record]
    if missing:
        raise fail(f"{kind} record is missing {missing}; it needs {list(_REQUIRED[kind])}")
    unknown = sorted(set(record) - set(_REQUIRED[kind]) - set(_OPTIONAL))
    if unknown:
        raise fail(f"unknown keys {unknown} for a {kind} record; allowed: {list(_REQUIRED[kind]) + list(_OPTIONAL)}")
    task = record.get("task", default_task)
    if not isinstance(task, str) or not task:
        raise fail(f"'task' must be a non-empty string, got {task!r}")
    if not isinstance(record["prompt"], str) or not record["prompt"]:
        raise fail("'prompt' must be a non-empty string")
    sample = EvalSample(task=task, type=kind, prompt=record["prompt"], source=where,
                        id=record.get("id"), meta=record.get("meta"))
    if kind == "generate":
        if not _is_str_list(record["answers"], 1):
            raise fail("'answers' must be a non-empty list of non-empty strings (the accepted aliases)")
        sample.answers = list(record["answers"])
    else:
        if not _is_str_list(record["choices"], 2):
            raise fail("'choices' must be a list of at least two non-empty strings")
        answer = record["answer"]
        if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(record["choices"]):
            raise fail(f"'answer' must be the index (0..{len(record['choices']) - 1}) of the correct choice, got {answer!r}")
        sample.choices, sample.answer = list(record["choices"]), answer
    return sample


def check_task_types(samples: Iterable[EvalSample]) -> None:
    """Every sample has a known type, and all samples of a task the same one (a task has one main metric)."""
    kinds: dict[str, EvalSample] = {}
    for s in samples:
        if s.type not in MAIN_METRIC:
            raise TaskFileError(f"{s.source or s.task}: unknown task type {s.type!r}; expected 'generate' or 'choice'")
        first = kinds.setdefault(s.task, s)
        if first.type != s.type:
            raise TaskFileError(
                f"{s.source}: task {s.task!r} is a {s.type} task here but a {first.type} task at {first.source}; "
                "give them different task names."
            )


def _records(path: Path, split: str | None) -> Iterator[tuple[str, Any]]:
    """``(where, record)`` of a JSON-lines task file (blank lines skipped) or of a ``datasets`` source."""
    if is_dataset_source(path):
        try:
            rows = read_rows(path, split)
        except SourceError as e:
            raise TaskFileError(str(e)) from None
        yield from ((f"{path}:{row}", record) for row, record in rows)
        return
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {'is a folder' if path.is_dir() else 'not found'} (expected a JSON-lines task file)")
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise TaskFileError(f"{where}: malformed JSON ({err.msg} at column {err.colno})") from None
            yield where, record


def load_tasks(
    paths: str | Path | Iterable[str | Path], limit: int | None = None, split: str | None = None
) -> list[EvalSample]:
    """Read task files (format in the module docstring): JSON lines, or ``datasets`` sources with the same
    columns (`loramoe.sources`; ``split`` chooses the part of a DatasetDict or Hub dataset). ``limit`` keeps the
    first ``limit`` samples of each task, in file order. Errors name the file and line (or row)."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not paths:
        raise ValueError("load_tasks: no task files given.")
    check_split(paths, split)
    samples: list[EvalSample] = []
    for path in map(Path, paths):
        before = len(samples)
        samples += [_parse_record(record, where, path.stem) for where, record in _records(path, split)]
        if len(samples) == before:
            raise TaskFileError(f"{path}: no records (expected one JSON object per line).")
    check_task_types(samples)
    if limit is not None:
        seen: Counter[str] = Counter()
        kept = []
        for s in samples:
            seen[s.task] += 1
            if seen[s.task] <= limit:
                kept.append(s)
        samples = kept
    return samples


# ---- answer normalisation and metrics (SQuAD / TriviaQA style) -------------------------------------------------
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def _is_punctuation(ch: str) -> bool:
    return ch in string.punctuation or unicodedata.category(ch).startswith("P")


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation (ASCII and Unicode; underscores become spaces as in TriviaQA), drop the
    articles a/an/the, collapse whitespace."""
    text = text.lower().replace("_", " ")
    text = "".join(ch for ch in text if not _is_punctuation(ch))
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _aliases(answers: str | Sequence[str]) -> list[str]:
    answers = [answers] if isinstance(answers, str) else list(answers)
    if not answers:
        raise ValueError("At least one reference answer is needed.")
    return answers


def exact_match(prediction: str, answers: str | Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised alias, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in _aliases(answers)))


def _f1(pred_tokens: list[str], gold_tokens: list[str]) -> float:
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)
    same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, answers: str | Sequence[str]) -> float:
    """Bag-of-tokens F1 between the normalised prediction and the best-matching alias."""
    pred = normalize_answer(prediction).split()
    return max(_f1(pred, normalize_answer(a).split()) for a in _aliases(answers))


# ---- model side ------------------------------------------------------------------------------------------------
def model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("The tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token.")
    return pad


def pad_sequences(seqs: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) for token-id lists of different lengths, padded on the left or right."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        span = slice(width - len(s), width) if left else slice(0, len(s))
        ids[i, span] = torch.tensor(s, dtype=torch.long)
        mask[i, span] = 1
    return ids, mask


def batched(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def greedy_generation_config(max_new_tokens: int, eos_token_id: int | None, pad_token_id: int) -> GenerationConfig:
    """`loramoe eval`'s decoding as a config for ``model.generate(..., generation_config=...)``: greedy, with every
    common setting that a model's own ``generation_config`` could change greedy output with set explicitly (no
    sampling, beams or penalties; EOS the tokenizer's); cut the decoded text with `cut_at_stop`. What else a
    model's config sets (``bad_words_ids``, ``suppress_tokens``, ``min_new_tokens``, ...) still applies to a plain
    generate() call; `greedy_generate` sets the model's config aside while it decodes."""
    return GenerationConfig(
        do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, min_length=0,
        repetition_penalty=1.0, no_repeat_ngram_size=0, renormalize_logits=False, remove_invalid_values=False,
        eos_token_id=eos_token_id, pad_token_id=pad_token_id,
    )  # fmt: skip


class _RowStop(StoppingCriteria):
    """Stops a row at EOS (not kept) or once ``should_stop(its new ids)``; remembers where each row ended, since
    generate() pads a finished row on until the whole batch stops."""

    def __init__(self, should_stop: Callable[[list[int]], bool], eos_id: int | None, prompt_width: int) -> None:
        self.should_stop, self.eos_id, self.width = should_stop, eos_id, prompt_width
        self.ends: dict[int, int] = {}

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        new = input_ids[:, self.width :].tolist()
        for i, ids in enumerate(new):
            if i in self.ends:
                continue
            if ids[-1] == self.eos_id:
                self.ends[i] = len(ids) - 1
            elif self.should_stop(ids):
                self.ends[i] = len(ids)
        return torch.tensor([i in self.ends for i in range(len(new))], device=input_ids.device)


@contextlib.contextmanager
def _generation_config_set_aside(model: nn.Module) -> Iterator[None]:
    """generate() fills every setting its config leaves unset from the model's own ``generation_config``; a
    blank one stands in for it while `greedy_generate` decodes, so that nothing but the given config applies."""
    owners = [m for m in model.modules() if isinstance(vars(m).get("generation_config"), GenerationConfig)]
    saved = [m.generation_config for m in owners]
    try:
        for m in owners:
            m.generation_config = GenerationConfig()
        yield
    finally:
        for m, config in zip(owners, saved):
            m.generation_config = config


@torch.inference_mode()
def greedy_generate(
    model: nn.Module,
    prompts: list[list[int]],
    pad_id: int,
    eos_id: int | None,
    max_new_tokens: int,
    should_stop: Callable[[list[int]], bool] = lambda ids: False,
) -> list[list[int]]:
    """Greedy decoding of a batch of token-id prompts through transformers' ``generate()`` (KV cache) with
    `greedy_generation_config`. Prompts are left-padded and the attention mask marks the padding, from which
    generate() counts positions over real tokens only, so every row decodes as it would alone. A row stops at
    EOS (not returned) or when ``should_stop(its new ids)`` is true; the batch stops when every row has."""
    device = model_device(model)
    ids, mask = (t.to(device) for t in pad_sequences(prompts, pad_id, left=True))
    stop = _RowStop(should_stop, eos_id, ids.shape[1])
    config = greedy_generation_config(max_new_tokens, eos_id, pad_id)
    with _generation_config_set_aside(model):
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config,
                             stopping_criteria=StoppingCriteriaList([stop]))
    return [row[: stop.ends.get(i, len(row))] for i, row in enumerate(out[:, ids.shape[1] :].tolist())]


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """The text before the earliest stop string."""
    cuts = [text.find(s) for s in stop if s and s in text]
    return text[: min(cuts)] if cuts else text


@torch.inference_mode()
def choice_logprobs(model: nn.Module, contexts: list[list[int]], options: list[list[int]], pad_id: int) -> list[float]:
    """Mean log-probability per option token of ``option`` following ``context``, one value per pair.
    Right padding: the real tokens of each row sit at positions 0.., exactly as without a batch."""
    device = model_device(model)
    seqs = [c + o for c, o in zip(contexts, options)]
    ids, mask = (t.to(device) for t in pad_sequences(seqs, pad_id, left=False))
    logits = model(input_ids=ids, attention_mask=mask).logits
    scores = []
    for i, (c, o) in enumerate(zip(contexts, options)):
        # the logits at position p predict token p + 1
        rows = logits[i, len(c) - 1 : len(c) - 1 + len(o)].float().log_softmax(dim=-1)
        target = torch.tensor(o, device=device).unsqueeze(1)
        scores.append(rows.gather(1, target).mean().item())
    return scores


# ---- evaluation ------------------------------------------------------------------------------------------------
@dataclass
class EvalReport:
    """Per-task scores (``scores[task][metric]``), counts, per-sample predictions and the settings used.
    The main metric is exact_match for generate tasks and accuracy for choice tasks; ``mean`` averages the
    main metric over tasks (each task counts once, whatever its size)."""

    scores: dict[str, dict[str, float]]
    counts: dict[str, int]
    types: dict[str, str]
    predictions: list[dict[str, Any]]
    settings: dict[str, Any]

    @property
    def main(self) -> dict[str, float]:
        return {task: self.scores[task][MAIN_METRIC[self.types[task]]] for task in self.scores}

    @property
    def mean(self) -> float:
        return sum(self.main.values()) / len(self.main) if self.main else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "mean": self.mean,
            "tasks": {
                t: {"type": self.types[t], "n": self.counts[t], "main_metric": MAIN_METRIC[self.types[t]], **self.scores[t]}
                for t in self.scores
            },
            "settings": self.settings,
        }

    def to_markdown(self) -> str:
        lines = ["| task | type | n | EM / accuracy (%) | F1 (%) |", "|---|---|---:|---:|---:|"]
        for t in self.scores:
            f1 = self.scores[t].get("f1")
            f1_cell = f"{100 * f1:.1f}" if f1 is not None else "-"
            lines.append(f"| {t} | {self.types[t]} | {self.counts[t]} | {100 * self.main[t]:.1f} | {f1_cell} |")
        lines.append(f"| **mean** | | {sum(self.counts.values())} | {100 * self.mean:.1f} | |")
        return "\n".join(lines) + "\n"

    def save(self, out_dir: str | Path) -> dict[str, Path]:
        """Write ``eval.json``, ``eval.md`` and ``predictions.jsonl`` into ``out_dir``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"json": out / "eval.json", "markdown": out / "eval.md", "predictions": out / "predictions.jsonl"}
        paths["json"].write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        paths["markdown"].write_text(self.to_markdown())
        paths["predictions"].write_text("".join(json.dumps(p) + "\n" for p in self.predictions))
        return paths


def evaluate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    samples: Sequence[EvalSample],
    batch_size: int = 8,
    max_new_tokens: int = 32,
    stop: Sequence[str] = ("\n",),
    progress: bool = True,
) -> EvalReport:
    """Score ``samples`` (from `load_tasks`). Generate tasks: greedy decoding, cut at EOS or the first
    ``stop`` string, EM and token F1 against the aliases. Choice tasks: the option with the highest mean
    log-prob per token wins. Deterministic: no sampling; samples are batched in a fixed, length-sorted order."""
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size and max_new_tokens must be >= 1, got {batch_size} and {max_new_tokens}.")
    if not samples:
        raise ValueError("evaluate: no samples.")
    check_task_types(samples)
    was_training = model.training
    model.eval()
    pad_id, eos_id = pad_token_id(tokenizer), tokenizer.eos_token_id
    stop = [s for s in stop if s]

    def encode(text: str, special: bool) -> list[int]:
        return tokenizer(text, add_special_tokens=special)["input_ids"]

    prompts = [encode(s.prompt, True) for s in samples]
    gen = sorted((i for i, s in enumerate(samples) if s.type == "generate"), key=lambda i: (len(prompts[i]), i))
    pairs = []  # (sample index, option index, option ids) for every option of every choice sample
    for i, s in enumerate(samples):
        for j, text in enumerate(s.choices):
            ids = encode(text, False)
            if not ids:
                raise ValueError(f"{s.source}: choice {j} ({text!r}) encodes to no tokens.")
            pairs.append((i, j, ids))
    pairs.sort(key=lambda p: (len(prompts[p[0]]) + len(p[2]), p[0], p[1]))
    gen_batches, pair_batches = batched(gen, batch_size), batched(pairs, batch_size)

    def stopped(ids: list[int]) -> bool:
        return bool(stop) and any(s in tokenizer.decode(ids, skip_special_tokens=True) for s in stop)

    texts: dict[int, str] = {}
    option_scores: dict[int, list[float]] = {i: [0.0] * len(s.choices) for i, s in enumerate(samples) if s.type == "choice"}
    bar = tqdm(total=len(gen_batches) + len(pair_batches), desc="eval", unit="batch", disable=not progress)
    try:
        for batch in gen_batches:
            outs = greedy_generate(model, [prompts[i] for i in batch], pad_id, eos_id, max_new_tokens, stopped)
            for i, ids in zip(batch, outs):
                texts[i] = cut_at_stop(tokenizer.decode(ids, skip_special_tokens=True), stop)
            bar.update()
        for batch in pair_batches:
            scores = choice_logprobs(model, [prompts[i] for i, _, _ in batch], [ids for _, _, ids in batch], pad_id)
            for (i, j, _), score in zip(batch, scores):
                option_scores[i][j] = score
            bar.update()
    finally:
        bar.close()
        model.train(was_training)

    totals: dict[str, Counter[str]] = {}
    counts: Counter[str] = Counter()
    types: dict[str, str] = {}
    predictions = []
    for i, s in enumerate(samples):
        record: dict[str, Any] = {"task": s.task, "source": s.source}
        if s.id is not None:
            record["id"] = s.id
        if s.type == "generate":
            metrics = {"exact_match": exact_match(texts[i], s.answers), "f1": token_f1(texts[i], s.answers)}
            record.update(prediction=texts[i], answers=s.answers)
        else:
            scores = option_scores[i]
            picked = max(range(len(scores)), key=lambda j: (scores[j], -j))  # ties go to the first option
            metrics = {"accuracy": float(picked == s.answer)}
            record.update(prediction=picked, answer=s.answer, option_scores=scores)
        record.update(metrics)
        if s.meta is not None:
            record["meta"] = s.meta
        predictions.append(record)
        totals.setdefault(s.task, Counter()).update(metrics)
        counts[s.task] += 1
        types[s.task] = s.type
    scores = {t: {m: v / counts[t] for m, v in sorted(totals[t].items())} for t in totals}
    settings = {"batch_size": batch_size, "max_new_tokens": max_new_tokens, "stop": stop, "decoding": "greedy",
                "choice_score": "mean log-prob per option token"}
    return EvalReport(scores=scores, counts=dict(counts), types=types, predictions=predictions, settings=settings)


# ---- command line ----------------------------------------------------------------------------------------------
def configure_parser(parser) -> None:
    parser.add_argument("--base", required=True,
                        help="base model: Hugging Face directory, .gguf file, 'smollm2', or a fully fine-tuned checkpoint")
    parser.add_argument("--adapter", default=None, help="PEFT adapter directory (LoRA or LoRAMoE) to put on the base")
    parser.add_argument("--tokenizer", default=None, help="tokenizer location (default: --base)")
    parser.add_argument("--tasks", nargs="+", required=True,
                        help="task files: JSON lines, or datasets sources (a save_to_disk folder, .parquet, .arrow, "
                             "a Hub id); see docs/evaluation.md")
    add_split_option(parser)
    parser.add_argument("--out", required=True, help="output directory for eval.json, eval.md, predictions.jsonl")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--stop", action="append", default=None,
                        help=r"stop string for generation, repeatable; '\n' and '\t' are understood "
                             r"(default: '\n'; pass --stop '' to stop only at EOS)")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N samples of each task")
    add_model_options(parser)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def add_split_option(parser) -> None:
    """--data-split, shared with `loramoe routes`."""
    parser.add_argument("--data-split", default=None,
                        help="split of a DatasetDict folder or Hub dataset given in --tasks (needed when it has several)")


def add_model_options(parser) -> None:
    """--device, --dtype, --quantize and --bnb-compute-dtype, shared with `loramoe routes`."""
    from .quantization import add_cli_options

    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    add_cli_options(parser)


def load_for_cli(args) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """Model (base [+ adapter]) and tokenizer from the common command-line options."""
    from .loading import load_model, load_tokenizer

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(args.base, args.adapter, dtype=getattr(torch, args.dtype), quantize=args.quantize,
                       bnb_compute_dtype=args.bnb_compute_dtype, device=device)  # fmt: skip
    return model, load_tokenizer(args.tokenizer or args.base)


def claim_out(args, names: tuple[str, ...], command: str):
    """The ``--out`` folder of `eval` / `routes` (``command``), checked (see `loramoe.outputs`): never the base
    model's folder."""
    from .loading import model_folder
    from .outputs import OutputDir

    return OutputDir(args.out, "--out", {"--base": model_folder(args.base)}, owner=command).claim(names)


EVAL_FILES = ("eval.json", "eval.md", "predictions.jsonl")


def run(args) -> int:
    stop = ["\n"] if args.stop is None else [s.replace("\\n", "\n").replace("\\t", "\t") for s in args.stop]
    samples = load_tasks(args.tasks, limit=args.limit, split=args.data_split)
    out = claim_out(args, EVAL_FILES, "eval")
    model, tokenizer = load_for_cli(args)
    report = evaluate(model, tokenizer, samples, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                      stop=stop, progress=not args.no_progress)
    report.settings.update(base=args.base, adapter=args.adapter, tasks=[str(p) for p in args.tasks], limit=args.limit,
                           quantize=args.quantize)  # fmt: skip
    out.create().record(EVAL_FILES)
    paths = report.save(out.path)
    print(report.to_markdown())
    print(f"wrote {paths['json']}, {paths['markdown']}, {paths['predictions']}")
    return 0
