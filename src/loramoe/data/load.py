"""Instruction files -> an `InstructionDataset`: the data path, one line per stage (check each source, get its
cache entry, report it, mix it)."""

from __future__ import annotations

import math
import random
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizerBase

from ..sources import check_split
from .batches import InstructionDataset, Part
from .cache import CacheEntry, DataCache, Log
from .encode import DEFAULT_TASK_TYPE_NAMES, TYPE_NAMES, Encoding, check_task_type_names
from .records import DataError, open_source, place
from .report import DataReport, FileReport

DataSpec = str | Path | tuple[str | Path, float]
SKIPPABLE = ("file is empty", "the JSON list is empty", "the dataset is empty")  # whole-file problems skip_bad skips


def load_instruction_data(
    files: DataSpec | Iterable[DataSpec],
    tokenizer: PreTrainedTokenizerBase,
    max_seq_len: int = 1024,
    task_type_names: dict[str, int] | None = None,
    skip_bad: bool = False,
    seed: int = 0,
    fit_prompt: bool = True,
    split: str | None = None,
    default_split: str | None = "train",
    cache_dir: str | Path | None = None,
    num_proc: int = 1,
    log: Log | None = None,
) -> InstructionDataset:
    """Read, validate, tokenise and mix instruction files, through the token cache (`loramoe.data.cache`).

    ``files``: paths or ``(path, weight)`` pairs; a weight w takes each file w times (2.0 = every sample twice,
    0.5 = a seeded half). ``task_type_names`` maps names to types, on top of knowledge/downstream/untyped.
    ``skip_bad``: skip bad records (listed in ``dataset.report``) instead of raising `DataError`.
    ``fit_prompt``: fit over-long samples by cutting the prompt's middle (`loramoe.data.encode`).
    ``split`` (else ``default_split``): the split of the DatasetDict folders and Hub ids among ``files``.
    ``cache_dir``: the cache folder (``None``: a private temporary one, gone with the dataset; `loramoe train`
    uses `default_cache_dir`); ``num_proc``: worker processes that tokenise what is not cached yet;
    ``log``: called with a line when an entry is reused or built.
    """
    if isinstance(files, (str, Path, tuple)):
        files = [files]
    if tokenizer.eos_token_id is None:
        raise ValueError("The tokenizer has no EOS token; instruction targets end with EOS.")
    if not isinstance(num_proc, int) or num_proc < 1:
        raise ValueError(f"num_proc={num_proc!r} is invalid: expected an integer >= 1")
    check_task_type_names(task_type_names or {})
    files = list(files)
    check_split([parse_data_spec(spec)[0] for spec in files], split)
    encoding = Encoding(tokenizer, max_seq_len, {**DEFAULT_TASK_TYPE_NAMES, **(task_type_names or {})}, fit_prompt)
    cache = DataCache(cache_dir)
    report = DataReport(max_seq_len=max_seq_len, fit_prompt=fit_prompt)
    parts = []
    for index, spec in enumerate(files):
        path, weight = parse_data_spec(spec)
        file_report = FileReport(str(path), weight)
        report.files.append(file_report)
        try:
            source = open_source(path, split, default_split)
        except DataError as e:
            if not skip_bad or not str(e.reason).startswith(SKIPPABLE):
                raise
            file_report.skipped.append(str(e))
            continue
        entry = cache.entry(source, encoding, num_proc, log)
        _report_entry(entry, file_report, report, source.kind, skip_bad)
        used = _weighted(len(entry), weight, random.Random(seed * 1_000_003 + index))
        file_report.used = len(used)
        types = np.bincount(np.asarray(entry.task_type)[used] + 1, minlength=3)
        for value, name in TYPE_NAMES.items():
            if types[value + 1]:
                file_report.count(name, "used", int(types[value + 1]))
        parts.append(Part(entry, str(path), source.kind, used))
    if not sum(len(p.used) for p in parts):
        first = f"; first: {report.skipped[0]}" if report.skipped else ""
        raise DataError(", ".join(f.path for f in report.files), None,
                        f"no usable samples ({len(report.skipped)} skipped{first})")  # fmt: skip
    return InstructionDataset(parts, report, keep=cache)


def _report_entry(entry: CacheEntry, file_report: FileReport, report: DataReport, kind: str, skip_bad: bool) -> None:
    """Copy an entry's counts into the file's report; its first problem is the error unless ``skip_bad``."""
    stored = entry.meta["report"]
    path = file_report.path
    problems = [(place(kind, line, index), reason) for index, line, reason in stored["problems"]]
    if problems and not skip_bad:
        raise DataError(path, *problems[0])
    for key in ("records", "valid", "prompt_cut", "prompt_tokens_cut", "truncated"):
        setattr(file_report, key, stored[key])
    file_report.skipped = [f"{path}:{line}: {reason}" for line, reason in problems]
    for kind, counts in stored["task_types"].items():
        for key, n in counts.items():
            file_report.count(kind, key, n)
    report.names_used.update(stored["names_used"])


def _weighted(n: int, weight: float, rng: random.Random) -> np.ndarray:
    """Indices of ``weight`` copies of ``n`` samples: whole repeats, plus a seeded subset (in file order) for the
    fraction."""
    whole, frac = int(weight), weight - int(weight)
    extra = sorted(rng.sample(range(n), round(frac * n)))
    return np.concatenate([np.tile(np.arange(n, dtype=np.int64), whole), np.asarray(extra, dtype=np.int64)])


def parse_data_spec(spec: DataSpec) -> tuple[Path, float]:
    """``path``, ``(path, weight)``, ``{"path", "weight"}`` (YAML) or ``"path:weight"`` (CLI) -> ``(Path, weight)``."""
    if isinstance(spec, dict):
        path, weight = spec.get("path"), spec.get("weight", 1.0)
    elif isinstance(spec, (tuple, list)):
        path, weight = spec
    else:
        path, weight = str(spec), 1.0
        head, sep, tail = path.rpartition(":")
        if sep and head and re.fullmatch(r"[+-]?([0-9]*\.?[0-9]+([eE][+-]?[0-9]+)?|inf|nan)", tail, re.I):  # "C:\\x" stays a path
            path, weight = head, float(tail)
    try:
        weight = float(weight)
    except (TypeError, ValueError):
        raise DataError(path, None, f"mixing weight must be a finite number > 0, got {weight!r}") from None
    if not weight > 0 or not math.isfinite(weight):
        raise DataError(path, None, f"mixing weight must be a finite number > 0, got {weight}")
    return Path(path), weight
