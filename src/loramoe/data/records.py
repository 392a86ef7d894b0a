"""Instruction records streamed from their sources: ``(line, record)`` one at a time, never a whole file's
records in memory.

A JSON-lines file is read line by line; a JSON list element by element, through a window of text that moves
along the file (each record keeps the line it starts on); a ``datasets`` source row by row
(`loramoe.sources.iter_rows`), the 0-based row index standing for the line. A record of a JSON list is placed
by its 1-based index as well (``file:1 (record 7)``: ``json.dump`` writes a whole list on one line). `open_source` checks what concerns
the whole file (missing, unreadable, not UTF-8, empty) and fingerprints its content, in one pass, before any
record is read; a JSON list that breaks off raises `DataError` while it is read (nothing after the break can be
located); a JSON line that does not parse is handed on as `Malformed`, for the caller to report or skip.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from ..sources import Row, SourceError, dataset_files, has_splits, is_dataset_source, iter_rows

CHUNK = 1 << 20  # characters (bytes for hashing) read at a time
_JSON_WS = re.compile(r"[ \t\n\r]*")
_NOT_WS = re.compile(r"[^ \t\n\r]")


class DataError(ValueError):
    """Bad instruction data; the message starts with ``file:line``."""

    def __init__(self, path: str | Path, line: int | None, reason: str) -> None:
        self.path, self.line, self.reason = str(path), line, reason
        super().__init__(f"{self.location}: {reason}")

    @property
    def location(self) -> str:
        return self.path if self.line is None else f"{self.path}:{self.line}"


@dataclass(frozen=True)
class Malformed:
    """A JSON line that does not parse (a per-record problem: reported, or skipped with ``skip_bad``)."""

    reason: str


class ListRecord(int):
    """The place of a JSON list's element: its 1-based index (how it sorts and counts) and the line it starts on;
    prints as ``3 (record 7)``, so ``file:3 (record 7)`` tells records apart even when a list is on one line."""

    def __new__(cls, index: int, line: int) -> ListRecord:
        place = super().__new__(cls, index)
        place.line = line
        return place

    def __str__(self) -> str:
        return f"{self.line} (record {int(self)})"


def place(kind: str, line: int, index: int) -> int:
    """A record's place in messages (``file:{place}``) from its line (or row) and 1-based index in its source."""
    if kind == "dataset":
        return Row(line)
    return ListRecord(index, line) if kind == "json_list" else line


@dataclass(frozen=True)
class Source:
    """A checked data source and the sha256 of its content (what the token cache is keyed by)."""

    path: Path
    kind: str  # "jsonl" | "json_list" | "dataset"
    digest: str
    split: str | None = None  # as given, for a DatasetDict folder or Hub id
    default_split: str | None = None

    @property
    def chosen_split(self) -> str | None:
        """The split that decides what is read (None for a source without splits)."""
        return (self.split or self.default_split) if has_splits(self.path) else None


def open_source(path: str | Path, split: str | None = None, default_split: str | None = "train") -> Source:
    """Check a source as a whole and fingerprint it; raises `DataError` (``file is empty``, ``the JSON list is
    empty`` and ``the dataset is empty`` are the problems ``skip_bad`` may skip)."""
    path = Path(path)
    if is_dataset_source(path):
        try:
            iter_rows(path, split, default_split)  # opens it: a bad split or an empty table is told here
            digest = _digest(dataset_files(path, split, default_split))
        except SourceError as e:
            raise DataError(e.location, None, e.reason) from None
        return Source(path, "dataset", digest, split, default_split)
    if path.is_dir():
        raise DataError(path, None, "is a folder (expected a JSON list or JSON-lines file of instruction records)")
    digest, lead = _scan_text(path)
    if not lead:
        raise DataError(path, 1, "file is empty (expected a JSON list or JSON lines of instruction records)")
    if lead == "[]":
        raise DataError(path, 1, "the JSON list is empty")
    return Source(path, "json_list" if lead[0] == "[" else "jsonl", digest)


def iter_records(source: Source) -> Iterator[tuple[int, Any]]:
    """``(place, record)`` of every record in file order: the line (a `ListRecord` in a JSON list, a `Row` in a
    ``datasets`` source); ``record`` is a `Malformed` for a JSON line that does not parse."""
    if source.kind == "dataset":
        try:
            yield from iter_rows(source.path, source.split, source.default_split)
        except SourceError as e:
            raise DataError(e.location, None, e.reason) from None
    elif source.kind == "json_list":
        yield from _json_list(source.path)
    else:
        yield from _json_lines(source.path)


def read_records(
    path: str | Path, split: str | None = None, default_split: str | None = "train"
) -> tuple[list[tuple[int, Any]], list[tuple[int, str]]]:
    """``([(line, record)], [(line, problem)])`` of a whole source, in memory: for small files and tests."""
    records, problems = [], []
    for line, record in iter_records(open_source(path, split, default_split)):
        if isinstance(record, Malformed):
            problems.append((line, record.reason))
        else:
            records.append((line, record))
    return records, problems


# ---- the whole-file pass ---------------------------------------------------------------------------------------


def _digest(files: list[Path]) -> str:
    h = hashlib.sha256()
    for path in files:
        h.update(f"{path.name}\0".encode())
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
    return h.hexdigest()


def _scan_text(path: Path) -> tuple[str, str]:
    """``(sha256, lead)``: ``lead`` is the first two characters that are not JSON whitespace (``[]`` for an
    empty list). Reading it all also proves it UTF-8 text before any record is read, as the old whole-file
    read did."""
    h, decoder, lead, read = hashlib.sha256(), codecs.getincrementaldecoder("utf-8")(), "", 0
    try:
        with open(path, "rb") as f:
            while True:
                chunk = f.read(CHUNK)
                h.update(chunk)
                held = len(decoder.getstate()[0])  # bytes of a character split across chunks
                try:
                    text = decoder.decode(chunk, final=not chunk)
                except UnicodeDecodeError as e:
                    raise DataError(path, None, f"not UTF-8 text ({_utf8_error(e, read - held)})") from None
                if len(lead) < 2:
                    lead += "".join(m.group() for m, _ in zip(_NOT_WS.finditer(text), range(2 - len(lead))))
                if not chunk:
                    return h.hexdigest(), lead
                read += len(chunk)
    except FileNotFoundError:
        raise DataError(path, None, "file not found") from None
    except OSError as e:
        raise DataError(path, None, f"cannot be read ({e.strerror or e})") from None


def _utf8_error(e: UnicodeDecodeError, shift: int) -> str:
    """CPython's message for the error, with the position counted from the start of the file."""
    start, end = e.start + shift, e.end + shift
    if e.end - e.start == 1:
        return f"'{e.encoding}' codec can't decode byte 0x{e.object[e.start]:02x} in position {start}: {e.reason}"
    return f"'{e.encoding}' codec can't decode bytes in position {start}-{end - 1}: {e.reason}"


# ---- JSON lines ------------------------------------------------------------------------------------------------


def _json_lines(path: Path) -> Iterator[tuple[int, Any]]:
    """Lines end at ``\\n`` (a ``\\r`` before it is dropped); blank lines are skipped."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            line = raw.removesuffix(b"\n").removesuffix(b"\r").decode("utf-8")
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as e:
                yield number, Malformed(f"malformed JSON ({e.msg} at column {e.colno})")


# ---- a JSON list, element by element ---------------------------------------------------------------------------


class _Window:
    """The text of a file around a parser's position ``pos``: what lies behind it is dropped and at least
    ``CHUNK`` characters (or the rest of the file) are kept ahead. ``line`` is the line number at ``pos``;
    ``column0`` the 0-based column of ``text[0]`` on its line."""

    def __init__(self, f: IO[str]) -> None:
        self.f, self.text, self.pos, self.line, self.column0, self.eof = f, "", 0, 1, 0, False

    def fill(self, ahead: int | None = None) -> None:
        ahead = CHUNK if ahead is None else ahead
        newline = self.text.rfind("\n", 0, self.pos)
        self.column0 = self.pos - newline - 1 if newline >= 0 else self.column0 + self.pos
        self.text, self.pos = self.text[self.pos :], 0
        while not self.eof and len(self.text) < ahead:
            chunk = self.f.read(max(CHUNK, ahead - len(self.text)))
            self.text += chunk
            self.eof = not chunk

    def move(self, to: int) -> None:
        self.line += self.text.count("\n", self.pos, to)
        self.pos = to

    def skip_space(self) -> None:
        while True:
            self.move(_JSON_WS.match(self.text, self.pos).end())
            if self.pos < len(self.text) or self.eof:
                return
            self.fill()

    def at(self, char: str) -> bool:
        return self.text.startswith(char, self.pos)

    def where(self, p: int) -> tuple[int, int]:
        """1-based line and column of ``text[p]``."""
        newline = self.text.rfind("\n", 0, p)
        return self.line + self.text.count("\n", self.pos, p), p - newline if newline >= 0 else self.column0 + p + 1


def _json_list(path: Path) -> Iterator[tuple[int, Any]]:
    """``[rec, rec, ...]`` (known to start with ``[``) record by record, each placed by its index and the line it
    starts on."""
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8", newline="") as f:
        w = _Window(f)
        w.skip_space()
        w.move(w.pos + 1)  # "["
        w.skip_space()
        if w.at("]"):
            return
        index = 0
        while True:
            if len(w.text) - w.pos < CHUNK:
                w.fill()
            line = w.line
            while True:
                try:
                    record, end = decoder.raw_decode(w.text, w.pos)
                except json.JSONDecodeError as e:
                    # A record longer than the window ends past it: widen the window; otherwise the JSON is bad.
                    cut = e.pos >= len(w.text) - 64 or e.msg.startswith("Unterminated string")
                    if w.eof or not cut:
                        at_line, column = w.where(e.pos)
                        raise DataError(path, at_line, f"malformed JSON ({e.msg} at column {column})") from None
                    w.fill(2 * (len(w.text) - w.pos))
                    continue
                if end < len(w.text) or w.eof:  # a number at the window's end might go on
                    break
                w.fill(2 * (len(w.text) - w.pos))
            index += 1
            yield ListRecord(index, line), record
            w.move(end)
            w.skip_space()
            if w.at(","):
                w.move(w.pos + 1)
                w.skip_space()
                continue
            if w.at("]"):
                break
            raise DataError(path, w.line, "malformed JSON (expected ',' or ']' after a record)")
        closing = w.line
        w.move(w.pos + 1)
        w.skip_space()
        if w.pos < len(w.text):
            raise DataError(path, closing, "malformed JSON (extra content after the closing ']')")
