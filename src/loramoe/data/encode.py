"""Records -> tokenised samples: the two record formats, task types, and fitting a sample to ``max_seq_len``.

- reference format ``{"instruction", "input" (optional), "output", "task_type"}``: prompt = instruction
  (+ "\\n" + input when non-empty) + EOS, target = output + EOS, as in the reference code (SPEC.md);
- chat format ``{"messages": [{"role", "content"}, ...], "task_type"}``: rendered with the tokenizer's chat
  template; every assistant turn is a target, everything else is prompt.

Labels are -100 on the prompt and the token itself on the target, so a sample is stored as its ids and a
target mask (`loramoe.data.cache`). ``task_type`` is 1 (world knowledge), 0 (downstream), -1 (untyped), or a
name looked up in the task type names.

A sample longer than ``max_seq_len`` is *fitted* (``fit_prompt``, the default): its prompt (for chat records,
everything before the first assistant turn) loses tokens from its middle, keeping its start (the instruction,
BOS) and its end (the question, EOS), until the sample fits, but never below half of ``max_seq_len``; if that is
not enough the sample is then cut at its end (the response's end is lost). Without ``fit_prompt`` a sample is
only cut at its end, and a record whose response is cut away entirely is bad.
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..balance import DOWNSTREAM, KNOWLEDGE, UNTYPED
from .records import Malformed

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
DEFAULT_TASK_TYPE_NAMES = {"knowledge": KNOWLEDGE, "downstream": DOWNSTREAM, "untyped": UNTYPED}
TYPE_NAMES = {value: name for name, value in DEFAULT_TASK_TYPE_NAMES.items()}
INVALID = "invalid"  # the report's name for records whose task type could not be read
CHAT_ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]
    task_type: int
    source: str  # "file:line", for error messages and reports


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


def _reference_texts(record: dict) -> tuple[str, str]:
    """``(prompt, output)``: prompt = instruction (+ "\\n" + input when non-empty)."""
    prompt = _text_field(record, "instruction")
    extra = _text_field(record, "input", required=False)
    output = _text_field(record, "output")
    return (prompt + "\n" + extra if extra else prompt), output


def _reference_sample(prompt_ids: list[int], output_ids: list[int], eos: int) -> tuple[list[int], list[int]]:
    """Prompt + EOS, then the target: output + EOS (labels only on the target)."""
    prompt_ids, target_ids = prompt_ids + [eos], output_ids + [eos]
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
    (result,) = encode_records([record], tok, max_seq_len, task_type_names, fit_prompt)
    if isinstance(result, _BadRecord):
        raise result
    return result


def encode_records(
    records: list[Any], tok: PreTrainedTokenizerBase, max_seq_len: int, task_type_names: dict[str, int],
    fit_prompt: bool = True,
) -> list[tuple[Sample, Cut] | _BadRecord]:  # fmt: skip
    """`encode_record` of each record (its `_BadRecord` in its place). The reference-format texts of all of them
    are tokenised in two calls: the same ids as one call each, without the tokenizer's per-call overhead (half
    the time of encoding short records one by one)."""
    parts: list[Any] = [None] * len(records)  # (task type, ids, labels) | (task type, prompt, output) | _BadRecord
    for i, record in enumerate(records):
        try:
            if not isinstance(record, dict):
                raise _BadRecord(f"expected a JSON object per record, got {type(record).__name__}")
            task_type = _task_type(record, task_type_names)
            parts[i] = (task_type, *(_encode_chat(record, tok) if "messages" in record else _reference_texts(record)))
        except _BadRecord as e:
            parts[i] = e
    texts = [i for i, part in enumerate(parts) if not isinstance(part, _BadRecord) and isinstance(part[1], str)]
    if texts:
        prompts = tok([parts[i][1] for i in texts])["input_ids"]
        outputs = tok([parts[i][2] for i in texts], add_special_tokens=False)["input_ids"]
        for i, prompt_ids, output_ids in zip(texts, prompts, outputs):
            parts[i] = (parts[i][0], *_reference_sample(prompt_ids, output_ids, tok.eos_token_id))
    return [part if isinstance(part, _BadRecord) else _fitted(*part, max_seq_len, fit_prompt) for part in parts]


def _fitted(task_type: int, ids: list[int], labels: list[int], max_seq_len: int, fit_prompt: bool) -> Any:
    """``(sample, cut)`` fitted to ``max_seq_len``, or the `_BadRecord` of a response cut away entirely."""
    ids, labels, cut = fit_to_length(ids, labels, max_seq_len, fit_prompt)
    # Position 0 predicts nothing (labels are shifted), so a sample needs a target token after it.
    if labels[1:].count(IGNORE_INDEX) == len(labels) - 1:
        return _BadRecord(f"the response is truncated away entirely (max_seq_len={max_seq_len}; the prompt is "
                          "longer; without --no-fit-prompt the prompt would be cut to fit)")  # fmt: skip
    return Sample(ids, labels, task_type, ""), cut


def _type_name(record: Any, names: dict[str, int]) -> str:
    """The report's name for a record's task type (``invalid`` when it has none that is known)."""
    try:
        return TYPE_NAMES[_task_type(record, names)] if isinstance(record, dict) else INVALID
    except _BadRecord:
        return INVALID


# ---- many records at once, for the cache -----------------------------------------------------------------------


@dataclass(frozen=True)
class Encoding:
    """Everything besides the data that decides the samples: the tokenizer, ``max_seq_len``, fitting and the task
    type names (built-in ones included). Sent to the cache's worker processes; `digest` keys the cache."""

    tokenizer: Any
    max_seq_len: int
    names: dict[str, int]
    fit_prompt: bool = True
    digest: str = field(init=False, compare=False)

    def __post_init__(self) -> None:
        import tokenizers
        import transformers

        described = {"tokenizer": tokenizer_digest(self.tokenizer), "max_seq_len": self.max_seq_len,
                     "names": dict(sorted(self.names.items())), "fit_prompt": self.fit_prompt,
                     "transformers": transformers.__version__, "tokenizers": tokenizers.__version__}  # fmt: skip
        object.__setattr__(self, "digest", hashlib.sha256(json.dumps(described).encode()).hexdigest())

    def __getstate__(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in ("tokenizer", "max_seq_len", "names", "fit_prompt", "digest")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            object.__setattr__(self, key, value)


def tokenizer_digest(tokenizer: Any) -> str:
    """sha256 of what the tokenizer saves (vocabulary, merges, normalisation, special tokens, chat template),
    whether it was loaded from files or built in memory."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        for path in sorted(Path(folder).rglob("*")):
            if path.is_file():
                h.update(f"\0{path.relative_to(folder)}\0".encode() + path.read_bytes())
    return h.hexdigest()


@dataclass
class EncodedBatch:
    """The samples of a batch of records, as flat arrays, and what the report counts about the records."""

    index: np.ndarray  # [samples] position of each sample's record in the batch
    lengths: np.ndarray  # [samples] tokens per sample
    ids: np.ndarray  # [tokens] uint32, the samples one after the other
    target: np.ndarray  # [tokens] uint8, 1 where the label is the token (not IGNORE_INDEX)
    task_type: np.ndarray  # [samples] int8
    prompt_cut: np.ndarray  # [samples] prompt tokens cut from the middle
    truncated: np.ndarray  # [samples] bool: cut at the end
    kinds: Counter  # task type name (or ``invalid``) -> records
    problems: list[tuple[int, str, str]]  # (position in the batch, type name, reason)
    names_used: set[str]


def encode_batch(records: list[Any], encoding: Encoding) -> EncodedBatch:
    """`encode_record` over ``records`` (`Malformed` items are problems as they are)."""
    tok, names = encoding.tokenizer, encoding.names
    index, lengths, ids, labels, types, cuts, truncated = [], [], [], [], [], [], []
    kinds: Counter = Counter()
    problems: list[tuple[int, str, str]] = []
    names_used: set[str] = set()
    parsed = [i for i, record in enumerate(records) if not isinstance(record, Malformed)]
    results = dict(zip(parsed, encode_records([records[i] for i in parsed], tok, encoding.max_seq_len, names,
                                              encoding.fit_prompt)))  # fmt: skip
    for i, record in enumerate(records):
        kind = INVALID if isinstance(record, Malformed) else _type_name(record, names)
        kinds[kind] += 1
        if isinstance(record, dict) and isinstance(record.get("task_type"), str) and record["task_type"] in names:
            names_used.add(record["task_type"])
        result = record.reason if isinstance(record, Malformed) else results[i]
        if not isinstance(result, tuple):
            problems.append((i, kind, str(result)))
            continue
        sample, cut = result
        index.append(i)
        lengths.append(len(sample.input_ids))
        ids += sample.input_ids
        labels += sample.labels
        types.append(sample.task_type)
        cuts.append(cut.prompt_tokens)
        truncated.append(cut.truncated)
    ids_array, labels_array = np.asarray(ids, dtype=np.int64), np.asarray(labels, dtype=np.int64)
    target = labels_array != IGNORE_INDEX
    # stored as ids + mask: that is exact only while every label is the token itself or IGNORE_INDEX
    if not (np.all(labels_array[target] == ids_array[target]) and np.all((ids_array >= 0) & (ids_array < 2**32))):
        raise RuntimeError("encode_record returned labels that are not the ids or -100, or ids outside uint32")
    return EncodedBatch(
        index=np.asarray(index, dtype=np.int64), lengths=np.asarray(lengths, dtype=np.int64),
        ids=ids_array.astype(np.uint32), target=target.astype(np.uint8), task_type=np.asarray(types, dtype=np.int8),
        prompt_cut=np.asarray(cuts, dtype=np.int64), truncated=np.asarray(truncated, dtype=bool), kinds=kinds,
        problems=problems, names_used=names_used,
    )  # fmt: skip
