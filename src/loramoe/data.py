"""Instruction files -> tokenised samples with task types -> padded batches.

Two record formats, one per line of a JSON-lines file or one per element of a JSON list:

- reference format ``{"instruction", "input" (optional), "output", "task_type"}``: prompt = instruction
  (+ "\\n" + input when non-empty) + EOS, target = output + EOS, as in the reference code (SPEC.md);
- chat format ``{"messages": [{"role", "content"}, ...], "task_type"}``: rendered with the tokenizer's chat
  template; every assistant turn is a target, everything else is prompt.

Labels are -100 on the prompt. ``task_type`` is 1 (world knowledge), 0 (downstream), -1 (untyped), or a name
looked up in ``task_type_names``. Every problem names the file and line (in a JSON list also the record's
1-based index: ``file:1 (record 7)``); with ``skip_bad`` the sample is skipped and listed in the report
instead, never dropped silently.

A sample longer than ``max_seq_len`` is *fitted* (``fit_prompt``, the default): its prompt (for chat records,
everything before the first assistant turn) loses tokens from its middle, keeping its start (the instruction,
BOS) and its end (the question, EOS), until the sample fits, but never below half of ``max_seq_len``; if that is
not enough the sample is then cut at its end (the response's end is lost). Without ``fit_prompt`` a sample is
only cut at its end, and a record whose response is cut away entirely is bad (the behaviour before fitting).
Every cut is counted per file and per task type in the report, which also shows the task-type mix before
(records read) and after (samples used).

Records may also come from Hugging Face ``datasets`` sources (``save_to_disk`` folders, .parquet, .arrow, Hub ids;
see `loramoe.sources`): the same columns, the row index in place of the line number.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from .balance import DOWNSTREAM, KNOWLEDGE, UNTYPED
from .sources import SourceError, check_split, is_dataset_source, read_rows

IGNORE_INDEX = -100
DEFAULT_TASK_TYPE_NAMES = {"knowledge": KNOWLEDGE, "downstream": DOWNSTREAM, "untyped": UNTYPED}
TYPE_NAMES = {value: name for name, value in DEFAULT_TASK_TYPE_NAMES.items()}
INVALID = "invalid"  # the report's name for records whose task type could not be read
CHAT_ROLES = ("system", "user", "assistant", "tool")
_JSON_WS = re.compile(r"[ \t\n\r]*")

DataSpec = str | Path | tuple[str | Path, float]


class DataError(ValueError):
    """Bad instruction data; the message starts with ``file:line``."""

    def __init__(self, path: str | Path, line: int | None, reason: str) -> None:
        self.path, self.line, self.reason = str(path), line, reason
        super().__init__(f"{self.location}: {reason}")

    @property
    def location(self) -> str:
        return self.path if self.line is None else f"{self.path}:{self.line}"


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]
    task_type: int
    source: str  # "file:line", for error messages and reports


COUNTS = ("records", "valid", "used", "skipped", "prompt_cut", "truncated")


@dataclass
class FileReport:
    path: str
    weight: float
    records: int = 0  # records read
    valid: int = 0  # records that became samples
    used: int = 0  # samples after applying the weight
    prompt_cut: int = 0  # valid samples whose prompt was cut in the middle to fit max_seq_len
    prompt_tokens_cut: int = 0  # tokens those cuts removed
    truncated: int = 0  # valid samples cut at the end to max_seq_len (part of a response lost)
    skipped: list[str] = field(default_factory=list)  # "file:line: reason" (only with skip_bad)
    task_types: dict[str, dict[str, int]] = field(default_factory=dict)  # type name -> the counts above

    def count(self, task_type: str, key: str, n: int = 1) -> None:
        counts = self.task_types.setdefault(task_type, dict.fromkeys(COUNTS, 0))
        counts[key] += n


@dataclass
class DataReport:
    max_seq_len: int
    fit_prompt: bool = True
    files: list[FileReport] = field(default_factory=list)
    names_used: set[str] = field(default_factory=set)  # task_type names that records used

    @property
    def skipped(self) -> list[str]:
        return [s for f in self.files for s in f.skipped]

    @property
    def truncated(self) -> int:
        return sum(f.truncated for f in self.files)

    @property
    def prompt_cut(self) -> int:
        return sum(f.prompt_cut for f in self.files)

    def task_types(self) -> dict[str, dict[str, int]]:
        """The per-type counts of all files together."""
        total: dict[str, dict[str, int]] = {}
        for f in self.files:
            for name, counts in f.task_types.items():
                mine = total.setdefault(name, dict.fromkeys(COUNTS, 0))
                for key, n in counts.items():
                    mine[key] += n
        return dict(sorted(total.items()))

    def mix(self) -> str:
        """Task-type mix before (records read) and after (samples used), e.g. ``downstream 80% -> 76%``."""
        types = self.task_types()
        records = sum(c["records"] for c in types.values()) or 1
        used = sum(c["used"] for c in types.values()) or 1
        return ", ".join(
            f"{name} {c['records']} ({100 * c['records'] / records:.0f}%) -> {c['used']} ({100 * c['used'] / used:.0f}%)"
            + (f" [{c['skipped']} skipped, {c['prompt_cut']} prompts cut, {c['truncated']} truncated]"
               if c["skipped"] or c["prompt_cut"] or c["truncated"] else "")
            for name, c in types.items()
        )  # fmt: skip

    def summary(self, detail: bool = True) -> str:
        used = sum(f.used for f in self.files)
        records = sum(f.records for f in self.files)
        tokens = sum(f.prompt_tokens_cut for f in self.files)
        text = (
            f"{used} samples from {records} records in {len(self.files)} file(s); {self.prompt_cut} prompts cut in "
            f"the middle ({tokens} tokens) and {self.truncated} truncated at the end to fit {self.max_seq_len} "
            f"tokens; {len(self.skipped)} skipped; task-type mix, records -> samples: {self.mix()}"
        )
        if self.skipped and detail:
            text += ":\n  " + "\n  ".join(self.skipped[:10]) + ("\n  ..." if len(self.skipped) > 10 else "")
        return text

    def to_dict(self) -> dict[str, Any]:
        return {"max_seq_len": self.max_seq_len, "fit_prompt": self.fit_prompt, "task_types": self.task_types(),
                "files": [asdict(f) for f in self.files]}  # fmt: skip


class InstructionDataset(torch.utils.data.Dataset):
    """Tokenised samples; items are ``{"input_ids", "labels", "task_type"}`` for `InstructionCollator`."""

    def __init__(self, samples: list[Sample], report: DataReport) -> None:
        self.samples, self.report = samples, report

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        s = self.samples[i]
        return {"input_ids": s.input_ids, "labels": s.labels, "task_type": s.task_type}

    def task_type_counts(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for s in self.samples:
            counts[s.task_type] = counts.get(s.task_type, 0) + 1
        return counts


@dataclass
class InstructionCollator:
    """Right-pads a list of items to the longest one: ``input_ids`` with ``pad_token_id``, ``labels`` with -100,
    ``attention_mask`` 0 on padding (built from lengths, so a pad id equal to EOS is harmless), and
    ``task_types`` [batch]. Works as a ``transformers.Trainer`` data collator."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __post_init__(self) -> None:
        if self.pad_token_id is None:
            raise ValueError("InstructionCollator needs a pad_token_id (set tokenizer.pad_token, e.g. to the EOS token).")

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        lengths = [len(it["input_ids"]) for it in items]
        width = max(lengths)
        if self.pad_to_multiple_of:
            width = math.ceil(width / self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(items), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, (it, n) in enumerate(zip(items, lengths)):
            input_ids[row, :n] = torch.as_tensor(it["input_ids"], dtype=torch.long)
            labels[row, :n] = torch.as_tensor(it["labels"], dtype=torch.long)
            attention_mask[row, :n] = 1
        task_types = torch.tensor([int(it.get("task_type", it.get("task_types"))) for it in items], dtype=torch.long)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "task_types": task_types}


# ---- reading files ---------------------------------------------------------------------------------------------


def read_records(
    path: str | Path, split: str | None = None, default_split: str | None = "train"
) -> tuple[list[tuple[int, Any]], list[tuple[int, str]]]:
    """``([(line, record)], [(line, problem)])`` from a JSON list or a JSON-lines file, or the rows of a
    ``datasets`` source (`loramoe.sources.read_rows`; ``split`` else ``default_split`` for a DatasetDict or Hub id).

    A broken JSON-lines record is a per-line problem (skippable); a broken JSON list, an empty file or an
    unreadable one raises `DataError`, since nothing after the break can be located.
    """
    path = Path(path)
    if is_dataset_source(path):
        try:
            return read_rows(path, split, default_split), []
        except SourceError as e:
            raise DataError(e.location, None, e.reason) from None
    if path.is_dir():
        raise DataError(path, None, "is a folder (expected a JSON list or JSON-lines file of instruction records)")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(path, None, "file not found") from None
    except UnicodeDecodeError as e:
        raise DataError(path, None, f"not UTF-8 text ({e})") from None
    except OSError as e:
        raise DataError(path, None, f"cannot be read ({e.strerror or e})") from None
    start = _JSON_WS.match(text).end()
    if start == len(text):
        raise DataError(path, 1, "file is empty (expected a JSON list or JSON lines of instruction records)")
    if text[start] == "[":
        records = _read_json_list(path, text, start)
        if not records:
            raise DataError(path, 1, "the JSON list is empty")
        return records, []
    records, problems = [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append((number, json.loads(line)))
        except json.JSONDecodeError as e:
            problems.append((number, f"malformed JSON ({e.msg} at column {e.colno})"))
    return records, problems


class ListRecord(int):
    """The place of a JSON list's element: its 1-based index (how it sorts and counts) and the line it starts on;
    prints as ``3 (record 7)``, so ``file:3 (record 7)`` tells records apart even when a list is on one line."""

    def __new__(cls, index: int, line: int) -> ListRecord:
        place = super().__new__(cls, index)
        place.line = line
        return place

    def __str__(self) -> str:
        return f"{self.line} (record {int(self)})"


def _read_json_list(path: Path, text: str, start: int) -> list[tuple[int, Any]]:
    """Parse ``[rec, rec, ...]`` element by element so that each record keeps its index and the line it starts on."""
    decoder = json.JSONDecoder()
    records: list[tuple[int, Any]] = []
    pos = _JSON_WS.match(text, start + 1).end()
    line, counted = 1 + text.count("\n", 0, pos), pos

    def here(p: int) -> int:
        nonlocal line, counted
        line, counted = line + text.count("\n", counted, p), p
        return line

    if text.startswith("]", pos):
        return records
    while True:
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise DataError(path, e.lineno, f"malformed JSON ({e.msg} at column {e.colno})") from None
        records.append((ListRecord(len(records) + 1, here(pos)), obj))
        pos = _JSON_WS.match(text, end).end()
        if text.startswith(",", pos):
            pos = _JSON_WS.match(text, pos + 1).end()
            continue
        if text.startswith("]", pos):
            break
        raise DataError(path, here(pos), "malformed JSON (expected ',' or ']' after a record)")
    if _JSON_WS.match(text, pos + 1).end() != len(text):
        raise DataError(path, here(pos + 1), "malformed JSON (extra content after the closing ']')")
    return records


# ---- records -> samples ----------------------------------------------------------------------------------------


class _BadRecord(Exception):
    """A record-level problem; turned into a DataError (or a skip) with file and line by the caller."""


def check_task_type_names(names: dict[Any, Any]) -> None:
    """Refuse a mapping that could not apply as written: a number as a name (records' numbers are the task
    types themselves, so ``0=1`` would change nothing), a type other than 1/0/-1, a built-in name redefined."""
    for name, value in names.items():
        if not isinstance(name, str) or not name.strip() or re.fullmatch(r"\s*[+-]?\d+\s*", name):
            raise ValueError(
                f"task_type_names: {name!r} is not a name (1, 0 and -1 in a record are task types already; "
                "expected NAME=TYPE with a word as NAME, e.g. cbqa=1)"
            )
        if isinstance(value, bool) or value not in (KNOWLEDGE, DOWNSTREAM, UNTYPED):
            raise ValueError(f"task_type_names[{name!r}]={value!r}: not a task type (expected 1, 0 or -1)")
        if DEFAULT_TASK_TYPE_NAMES.get(name, value) != value:
            raise ValueError(f"task_type_names[{name!r}]={value!r}: {name!r} is built in as "
                             f"{DEFAULT_TASK_TYPE_NAMES[name]} (expected another name)")  # fmt: skip


def _task_type(record: dict, names: dict[str, int]) -> int:
    if "task_type" not in record:
        raise _BadRecord("missing field 'task_type' (1 world knowledge, 0 downstream, -1 untyped, or a name)")
    value = record["task_type"]
    if isinstance(value, int) and not isinstance(value, bool) and value in (KNOWLEDGE, DOWNSTREAM, UNTYPED):
        return value
    if isinstance(value, str) and value in names:
        return names[value]
    raise _BadRecord(
        f"unknown task_type {value!r}: expected 1 (world knowledge), 0 (downstream), -1 (untyped) or one of the "
        f"names {sorted(names)} (map more names with task_type_names, e.g. {{'cbqa': 1, 'nli': 0}})"
    )


def _text_field(record: dict, key: str, required: bool = True) -> str:
    if key not in record or record[key] is None:
        if required:
            raise _BadRecord(f"missing field {key!r} (a record needs 'instruction', 'output' and 'task_type')")
        return ""
    if not isinstance(record[key], str):
        raise _BadRecord(f"field {key!r} must be a string, got {type(record[key]).__name__}")
    return _check_text(record[key], f"field {key!r}")


def _check_text(text: str, where: str) -> str:
    """Refuse a lone UTF-16 surrogate (JSON ``"\\ud800"`` without its pair): not a character, no tokenizer takes it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _BadRecord(f"{where} holds {text[e.start]!r}, a lone UTF-16 surrogate, not text (expected a "
                         "character, or a surrogate pair such as \\ud83d\\ude00)") from None
    return text


def _encode_reference(record: dict, tok: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """Prompt = instruction (+ "\\n" + input) + EOS, target = output + EOS (labels only on the target)."""
    prompt = _text_field(record, "instruction")
    extra = _text_field(record, "input", required=False)
    output = _text_field(record, "output")
    if extra:
        prompt = prompt + "\n" + extra
    prompt_ids = tok(prompt)["input_ids"] + [tok.eos_token_id]
    target_ids = tok(output, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return prompt_ids + target_ids, [IGNORE_INDEX] * len(prompt_ids) + target_ids


def _encode_chat(record: dict, tok: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """Render with the chat template turn by turn; the text each assistant turn adds is its target."""
    messages = record["messages"]
    if not getattr(tok, "chat_template", None):
        raise _BadRecord("chat-style record ('messages') but the tokenizer has no chat template")
    if not isinstance(messages, list) or not messages:
        raise _BadRecord("'messages' must be a non-empty list of {'role', 'content'} objects")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise _BadRecord(f"messages[{i}] must be an object with string fields 'role' and 'content'")
        _check_text(m["content"], f"messages[{i}].content")
        if m["role"] not in CHAT_ROLES:
            raise _BadRecord(f"messages[{i}].role {m['role']!r} is not a chat role (expected one of {list(CHAT_ROLES)})")
    if not any(m["role"] == "assistant" for m in messages):
        raise _BadRecord("'messages' has no assistant turn to train on")

    def render(upto: int, generation_prompt: bool) -> str:
        return tok.apply_chat_template(messages[:upto], tokenize=False, add_generation_prompt=generation_prompt)

    ids: list[int] = []
    labels: list[int] = []
    done = ""  # text already turned into tokens
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt, full = render(i, True), render(i + 1, False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise _BadRecord("the tokenizer's chat template does not render turn by turn (prefix property fails)")
        prompt_ids = tok(prompt[len(done) :], add_special_tokens=False)["input_ids"]
        target_ids = tok(full[len(prompt) :], add_special_tokens=False)["input_ids"]
        ids += prompt_ids + target_ids
        labels += [IGNORE_INDEX] * len(prompt_ids) + target_ids
        done = full
    return ids, labels


@dataclass
class Cut:
    """What fitting a sample to ``max_seq_len`` removed."""

    prompt_tokens: int = 0  # tokens cut from the middle of the (first) prompt
    truncated: bool = False  # the sample's end was cut off


def fit_to_length(ids: list[int], labels: list[int], max_len: int, fit_prompt: bool = True) -> tuple[list[int], list[int], Cut]:
    """Cut a tokenised sample to ``max_len`` tokens as the module docstring says."""
    over, cut = len(ids) - max_len, Cut()
    if over <= 0:
        return ids, labels, cut
    if fit_prompt:
        prompt = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))
        keep = max(prompt - over, min(prompt, max_len // 2))
        if keep < prompt:
            head = (keep + 1) // 2
            tail_start = prompt - (keep - head)
            ids, labels = ids[:head] + ids[tail_start:], labels[:head] + labels[tail_start:]
            cut.prompt_tokens = prompt - keep
    if len(ids) > max_len:
        ids, labels, cut.truncated = ids[:max_len], labels[:max_len], True
    return ids, labels, cut


def encode_record(
    record: Any, tok: PreTrainedTokenizerBase, max_seq_len: int, task_type_names: dict[str, int],
    fit_prompt: bool = True,
) -> tuple[Sample, Cut]:  # fmt: skip
    """``(sample, what fitting it to max_seq_len cut)``; raises `_BadRecord` with the reason for a bad record."""
    if not isinstance(record, dict):
        raise _BadRecord(f"expected a JSON object per record, got {type(record).__name__}")
    task_type = _task_type(record, task_type_names)
    ids, labels = _encode_chat(record, tok) if "messages" in record else _encode_reference(record, tok)
    ids, labels, cut = fit_to_length(ids, labels, max_seq_len, fit_prompt)
    # Position 0 predicts nothing (labels are shifted), so a sample needs a target token after it.
    if all(label == IGNORE_INDEX for label in labels[1:]):
        raise _BadRecord(f"the response is truncated away entirely (max_seq_len={max_seq_len}; the prompt is "
                         "longer; without --no-fit-prompt the prompt would be cut to fit)")  # fmt: skip
    return Sample(ids, labels, task_type, ""), cut


def _weighted(samples: list[Sample], weight: float, rng: random.Random) -> list[Sample]:
    """``weight`` copies of the file: whole repeats, plus a seeded subset (in file order) for the fraction."""
    whole, frac = int(weight), weight - int(weight)
    extra = sorted(rng.sample(range(len(samples)), round(frac * len(samples))))
    return samples * whole + [samples[i] for i in extra]


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


def _type_name(record: Any, names: dict[str, int]) -> str:
    """The report's name for a record's task type (``invalid`` when it has none that is known)."""
    try:
        return TYPE_NAMES[_task_type(record, names)] if isinstance(record, dict) else INVALID
    except _BadRecord:
        return INVALID


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
) -> InstructionDataset:
    """Read, validate, tokenise and mix instruction files.

    ``files``: paths or ``(path, weight)`` pairs; a weight w takes each file w times (2.0 = every sample twice,
    0.5 = a seeded half). ``task_type_names`` maps names to types, on top of knowledge/downstream/untyped.
    ``skip_bad``: skip bad records (listed in ``dataset.report``) instead of raising `DataError`.
    ``fit_prompt``: fit over-long samples by cutting the prompt's middle (module docstring).
    ``split`` (else ``default_split``): the split of the DatasetDict folders and Hub ids among ``files``.
    """
    if isinstance(files, (str, Path, tuple)):
        files = [files]
    if tokenizer.eos_token_id is None:
        raise ValueError("The tokenizer has no EOS token; instruction targets end with EOS.")
    check_task_type_names(task_type_names or {})
    names = {**DEFAULT_TASK_TYPE_NAMES, **(task_type_names or {})}
    files = list(files)
    check_split([parse_data_spec(spec)[0] for spec in files], split)
    report = DataReport(max_seq_len=max_seq_len, fit_prompt=fit_prompt)
    samples: list[Sample] = []
    for index, spec in enumerate(files):
        path, weight = parse_data_spec(spec)
        file_report = FileReport(str(path), weight)
        report.files.append(file_report)
        try:
            records, problems = read_records(path, split, default_split)
        except DataError as e:
            empty = ("file is empty", "the JSON list is empty", "the dataset is empty")
            if not skip_bad or not str(e.reason).startswith(empty):
                raise
            file_report.skipped.append(str(e))
            continue
        file_report.records = len(records) + len(problems)  # parsed + unparsable lines
        kinds = dict.fromkeys((line for line, _ in problems), INVALID)
        file_samples = []
        for line, record in records:
            kinds[line] = _type_name(record, names)
            if isinstance(record, dict) and isinstance(record.get("task_type"), str) and record["task_type"] in names:
                report.names_used.add(record["task_type"])
            try:
                sample, cut = encode_record(record, tokenizer, max_seq_len, names, fit_prompt)
            except _BadRecord as e:
                problems.append((line, str(e)))
                continue
            sample.source = f"{path}:{line}"
            file_samples.append(sample)
            file_report.prompt_cut += bool(cut.prompt_tokens)
            file_report.prompt_tokens_cut += cut.prompt_tokens
            file_report.truncated += cut.truncated
            file_report.count(kinds[line], "valid")
            file_report.count(kinds[line], "prompt_cut", bool(cut.prompt_tokens))
            file_report.count(kinds[line], "truncated", cut.truncated)
        for kind in kinds.values():
            file_report.count(kind, "records")
        for line, reason in sorted(problems):
            if not skip_bad:
                raise DataError(path, line, reason)
            file_report.skipped.append(f"{path}:{line}: {reason}")
            file_report.count(kinds[line], "skipped")
        file_report.valid = len(file_samples)
        used = _weighted(file_samples, weight, random.Random(seed * 1_000_003 + index))
        file_report.used = len(used)
        for sample in used:
            file_report.count(TYPE_NAMES[sample.task_type], "used")
        samples += used
    if not samples:
        first = f"; first: {report.skipped[0]}" if report.skipped else ""
        raise DataError(", ".join(f.path for f in report.files), None,
                        f"no usable samples ({len(report.skipped)} skipped{first})")  # fmt: skip
    return InstructionDataset(samples, report)
