"""The token cache: each source tokenised once, into flat arrays on disk that every process memory-maps.

**Why flat arrays (numpy memmaps plus an index) rather than Arrow through ``datasets``.** Training reads sample
``i`` in a seeded random order: here that is two offsets and a slice of one array, with no per-row object, no
schema and no copy; plain files mapped read-only are shared through the page cache by every process on the
machine (8 ranks map one copy). ``datasets`` is an optional extra of loramoe, while every run needs the cache;
and its fingerprint hashes the map function and its pickled arguments, whereas this key names exactly what
decides the samples. Arrow would store the same arrays with more machinery around them.

An entry ``<cache folder>/<key>/`` holds::

    ids.u32       [tokens]       the token ids of all samples, one after the other (uint32)
    target.u8     [tokens]       1 where the label is the token itself, 0 where it is -100 (the prompt)
    offsets.i64   [samples + 1]  sample i is ids[offsets[i] : offsets[i + 1]]
    task_type.i8  [samples]
    line.i64      [samples]      the line (or row) of each sample's record in its source
    record.i64    [samples]      its 1-based index among the source's records (a JSON list's records share lines)
    meta.json     counts and problems for the report, the arrays' sha256, and what the key was made of

**Key**: the sha256 of the source's content (all its files), its kind and chosen split, and `Encoding.digest` (the
files the tokenizer saves, so its vocabulary and chat template; ``max_seq_len``; ``fit_prompt``; the task type
names; the transformers and tokenizers versions), and `FORMAT`. Not in it: ``skip_bad`` (an entry keeps every
problem it met and they are raised again whenever bad records are not to be skipped), and the mixing weight and
seed (applied on loading, as indices into the entry: `loramoe.data.load`).

**Build**: the source is read once, in order, in batches of records that ``num_proc`` worker processes encode
while the arrays are appended in order, so the entry is the same bytes whatever ``num_proc``; it is written
into ``<key>.tmp`` and renamed into place complete. A file lock per entry (``locks/<key>.lock``) lets
one process build it while the others wait, then map it: under torchrun that is one process per machine (per
cache folder); a second run with the same inputs reuses it, and says so. An entry that does not read back (bad
``meta.json``, an array of the wrong size, offsets that do not index the ids) is removed and rebuilt with a
`CacheWarning` naming it. An entry built for a source replaces older entries of the same source path and
encoding (the file changed: their tokens can serve no one); nothing else is ever removed automatically.

**Ownership** (`loramoe.outputs`): the cache folder is refused unless it is new, empty or written by loramoe (its
``loramoe-manifest.json`` lists the entries, each listed before it is created); loramoe only deletes or
replaces entries it listed there.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
import warnings
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock, Timeout

from ..outputs import MANIFEST, OutputDir, respect_umask, write_json
from .encode import IGNORE_INDEX, TYPE_NAMES, EncodedBatch, Encoding, encode_batch
from .records import Source, iter_records

FORMAT = 2  # 2: record.i64
ENV = "LORAMOE_CACHE"
META = "meta.json"
LOCKS = "locks"
ARRAYS = {"ids": ("ids.u32", np.uint32), "target": ("target.u8", np.uint8), "offsets": ("offsets.i64", np.int64),
          "task_type": ("task_type.i8", np.int8), "line": ("line.i64", np.int64),
          "record": ("record.i64", np.int64)}  # fmt: skip
REPORT_COUNTS = ("records", "valid", "prompt_cut", "prompt_tokens_cut", "truncated")
RECORDS_PER_TASK = 256  # records a worker encodes at a time

Log = Callable[[str], None]


class CacheWarning(UserWarning):
    """A cache entry could not be used as it was (it is rebuilt)."""


class CorruptEntry(Exception):
    """An entry that does not read back as written."""


def default_cache_dir() -> Path:
    """``$LORAMOE_CACHE``, else ``$XDG_CACHE_HOME/loramoe/data``, else ``~/.cache/loramoe/data``."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "loramoe" / "data"


class CacheEntry:
    """A published entry, memory-mapped read-only (`ids`, `target`, `offsets`, `task_type`, `line`, `meta`)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.meta = _read_meta(self.path)
        n, tokens = self.meta["samples"], self.meta["tokens"]
        counts = {"ids": tokens, "target": tokens, "offsets": n + 1, "task_type": n, "line": n, "record": n}
        for name, (file, dtype) in ARRAYS.items():
            setattr(self, name, _map(self.path / file, dtype, counts[name]))
        if self.offsets[0] != 0 or self.offsets[-1] != tokens or not np.all(np.diff(self.offsets) > 0):
            raise CorruptEntry(f"{ARRAYS['offsets'][0]} does not index {ARRAYS['ids'][0]}")

    def __len__(self) -> int:
        return self.meta["samples"]

    def __reduce__(self) -> tuple:  # pickled as its path: a worker process maps the files itself
        return CacheEntry, (self.path,)

    def sample(self, j: int) -> tuple[list[int], list[int], int]:
        """``(input_ids, labels, task_type)`` of sample ``j``."""
        start, stop = int(self.offsets[j]), int(self.offsets[j + 1])
        ids = self.ids[start:stop].astype(np.int64)
        return ids.tolist(), np.where(self.target[start:stop] > 0, ids, IGNORE_INDEX).tolist(), int(self.task_type[j])


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, ValueError) as e:
        raise CorruptEntry(f"{META} does not read ({e})") from None
    if not isinstance(meta, dict) or meta.get("written_by") != "loramoe" or meta.get("format") != FORMAT:
        raise CorruptEntry(f"{META} is not that of a loramoe cache entry of format {FORMAT}")
    report = meta.get("report")
    fields = {"samples": meta.get("samples"), "tokens": meta.get("tokens"), "digest": meta.get("digest"),
              **(report if isinstance(report, dict) else {"report": None})}  # fmt: skip
    kinds = {"samples": int, "tokens": int, "digest": str, **dict.fromkeys(REPORT_COUNTS, int), "task_types": dict,
             "names_used": list, "problems": list}  # fmt: skip
    wrong = [key for key, kind in kinds.items() if not isinstance(fields.get(key), kind)]
    if wrong:
        raise CorruptEntry(f"{META} has no valid {', '.join(wrong)}")
    return meta


def _map(path: Path, dtype: Any, count: int) -> np.ndarray:
    expected = count * np.dtype(dtype).itemsize
    size = path.stat().st_size if path.is_file() else None
    if size != expected:
        raise CorruptEntry(f"{path.name} is missing" if size is None else f"{path.name} holds {size} bytes, expected {expected}")
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,)) if count else np.zeros(0, dtype=dtype)


class DataCache:
    """A cache folder (``None``: a private temporary one, removed when this object goes)."""

    def __init__(self, root: str | Path | None = None) -> None:
        if root is None:
            root = tempfile.mkdtemp(prefix="loramoe-data-")
            weakref.finalize(self, shutil.rmtree, root, True)
        self.root = Path(root)
        self._out = _open_root(self.root)

    def entry(self, source: Source, encoding: Encoding, num_proc: int = 1, log: Log | None = None) -> CacheEntry:
        """The entry of ``source`` encoded with ``encoding``: reused if it is there, else built (see the module)."""
        log = log or (lambda message: None)
        key = _key(source, encoding)
        path = self.root / key
        self._out.claim([key])  # a folder of that name that loramoe did not write is refused
        with FileLock(self.root / LOCKS / f"{key}.lock"):
            if path.exists():
                try:
                    entry = CacheEntry(path)
                    log(f"data cache: {source.path}: reusing {path} ({len(entry)} samples)")
                    return entry
                except CorruptEntry as e:
                    warnings.warn(f"{path}: corrupt data cache entry ({e}); rebuilding it", CacheWarning, stacklevel=2)
                    shutil.rmtree(path)
            with FileLock(self.root / LOCKS / "manifest.lock"):
                self._out.record([key])
            log(f"data cache: {source.path}: building {path} ({num_proc} worker process(es))")
            start = time.perf_counter()
            staging = self.root / f"{key}.tmp"
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
            try:
                meta = _build(source, encoding, staging, num_proc)
                where = source.path.resolve() if source.path.exists() else source.path
                meta.update(written_by="loramoe", format=FORMAT, key=key, source=str(where), kind=source.kind,
                            split=source.chosen_split, content=source.digest, encoding=encoding.digest,
                            seconds=round(time.perf_counter() - start, 3), workers=num_proc)  # fmt: skip
                write_json(staging / META, meta)
                respect_umask(staging)
                os.replace(staging, path)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            entry = CacheEntry(path)
            log(f"data cache: built {path} in {meta['seconds']:.1f} s: {meta['samples']} samples, "
                f"{meta['tokens']} tokens")  # fmt: skip
        self._remove_replaced(key, meta)
        return entry

    def _remove_replaced(self, key: str, meta: dict[str, Any]) -> None:
        """Remove the entries this one replaces: same source path and encoding, other content."""
        for name in self._out.owned():
            if name in (key, LOCKS):
                continue
            try:
                other = json.loads((self.root / name / META).read_text())
            except (OSError, ValueError):
                continue
            if (other.get("source"), other.get("encoding"), other.get("split")) == (meta["source"], meta["encoding"], meta["split"]):
                with contextlib.suppress(Timeout), FileLock(self.root / LOCKS / f"{name}.lock", timeout=0):
                    shutil.rmtree(self.root / name, ignore_errors=True)  # (skipped while another process holds it)


def _open_root(root: Path) -> OutputDir:
    """The cache folder as an `OutputDir`, created with its ``locks`` folder when new (atomically: a folder made
    beside it, then renamed into place; a process that loses that race uses the winner's)."""
    out = OutputDir(root, "--cache-dir")  # a file, or a folder holding files loramoe did not write, is refused
    if not (root / MANIFEST).is_file():
        root.parent.mkdir(parents=True, exist_ok=True)
        fresh = Path(tempfile.mkdtemp(prefix=f".{root.name}-", suffix=".tmp", dir=root.parent))
        OutputDir(fresh, "--cache-dir").create().record([LOCKS])
        (fresh / LOCKS).mkdir()
        respect_umask(fresh)
        try:
            os.rename(fresh, root)  # onto a missing or empty folder
        except OSError:
            shutil.rmtree(fresh, ignore_errors=True)
        out = OutputDir(root, "--cache-dir")
    if LOCKS not in out.entries():  # a folder loramoe wrote for something else
        out.record([LOCKS])
    (root / LOCKS).mkdir(exist_ok=True)
    return out


def _key(source: Source, encoding: Encoding) -> str:
    described = {"format": FORMAT, "kind": source.kind, "split": source.chosen_split, "content": source.digest,
                 "encoding": encoding.digest}  # fmt: skip
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:40]


# ---- building ---------------------------------------------------------------------------------------------------


def _build(source: Source, encoding: Encoding, folder: Path, num_proc: int) -> dict[str, Any]:
    """Encode every record of ``source`` into the arrays under ``folder``; return their counts for meta.json."""
    writer = _Writer(folder)
    try:
        with _encoder(encoding, num_proc) as submit:
            pending: deque[tuple[list[tuple[int, int]], Future]] = deque()
            for places, records in _batches(iter_records(source), RECORDS_PER_TASK):
                pending.append((places, submit(records)))
                while len(pending) > 2 * num_proc:  # bounded: the source is never read far ahead of the writing
                    writer.add(*_result(pending.popleft()))
            while pending:
                writer.add(*_result(pending.popleft()))
    finally:
        writer.close()
    return writer.meta()


def _result(item: tuple[list[tuple[int, int]], Future]) -> tuple[list[tuple[int, int]], EncodedBatch]:
    return item[0], item[1].result()


def _batches(items: Iterable[tuple[int, Any]], size: int) -> Iterator[tuple[list[tuple[int, int]], list[Any]]]:
    """Batches of ``size`` records with the ``(line, index)`` of each (index: 1-based, in the source)."""
    places: list[tuple[int, int]] = []
    records: list[Any] = []
    for index, (where, record) in enumerate(items, 1):
        places.append((int(getattr(where, "line", where)), index))
        records.append(record)
        if len(records) == size:
            yield places, records
            places, records = [], []
    if records:
        yield places, records


@contextlib.contextmanager
def _encoder(encoding: Encoding, num_proc: int) -> Iterator[Callable[[list[Any]], Future]]:
    """``submit(records) -> Future[EncodedBatch]``: in this process for ``num_proc`` 1, else on a pool of
    workers. On Linux they are forked: they share this process's memory (the imports: a spawned worker would
    import torch and transformers again, ~0.5 GB and seconds each) and run only Python and the tokenizer, whose
    own threads it turns off in a forked child; elsewhere they are spawned."""
    if num_proc == 1:

        def submit(records: list[Any]) -> Future:
            done: Future = Future()
            done.set_result(encode_batch(records, encoding))
            return done

        yield submit
        return
    method = "fork" if sys.platform == "linux" else "spawn"
    pool = ProcessPoolExecutor(num_proc, mp_context=multiprocessing.get_context(method), initializer=_start_worker,
                               initargs=(encoding,))  # fmt: skip
    try:
        yield lambda records: pool.submit(_encode_in_worker, records)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


_WORKER_ENCODING: Encoding | None = None


def _start_worker(encoding: Encoding) -> None:
    global _WORKER_ENCODING
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker: the workers are the parallelism
    _WORKER_ENCODING = encoding


def _encode_in_worker(records: list[Any]) -> EncodedBatch:
    return encode_batch(records, _WORKER_ENCODING)


class _Writer:
    """Appends encoded batches to an entry's array files, hashing them, and counts what the report needs."""

    def __init__(self, folder: Path) -> None:
        self.files = {name: open(folder / file, "wb") for name, (file, _) in ARRAYS.items()}  # noqa: SIM115
        self.hashes = {name: hashlib.sha256() for name in ("ids", "target", "offsets", "task_type")}
        self.samples = self.tokens = self.records = self.prompt_cut = self.prompt_tokens_cut = self.truncated = 0
        self.task_types: dict[str, dict[str, int]] = {}
        self.problems: list[tuple[int, int, str]] = []  # (index, line, reason)
        self.names_used: set[str] = set()
        self._write("offsets", np.zeros(1, dtype=np.int64))

    def _write(self, name: str, array: np.ndarray) -> None:
        data = np.ascontiguousarray(array, dtype=ARRAYS[name][1]).tobytes()
        self.files[name].write(data)
        if name in self.hashes:
            self.hashes[name].update(data)

    def _count(self, kind: str, key: str, n: int) -> None:
        counts = self.task_types.setdefault(kind, dict.fromkeys(("records", "valid", "skipped", "prompt_cut", "truncated"), 0))
        counts[key] += int(n)

    def add(self, places: list[tuple[int, int]], batch: EncodedBatch) -> None:
        self._write("ids", batch.ids)
        self._write("target", batch.target)
        self._write("offsets", self.tokens + np.cumsum(batch.lengths))
        self._write("task_type", batch.task_type)
        where = np.asarray(places, dtype=np.int64).reshape(-1, 2)[batch.index]
        self._write("line", where[:, 0])
        self._write("record", where[:, 1])
        self.samples += len(batch.lengths)
        self.tokens += int(batch.lengths.sum())
        self.records += sum(batch.kinds.values())
        self.prompt_cut += int((batch.prompt_cut > 0).sum())
        self.prompt_tokens_cut += int(batch.prompt_cut.sum())
        self.truncated += int(batch.truncated.sum())
        for kind, n in batch.kinds.items():
            self._count(kind, "records", n)
        for i, kind, reason in batch.problems:
            self.problems.append((places[i][1], places[i][0], reason))
            self._count(kind, "skipped", 1)
        for value, kind in TYPE_NAMES.items():
            mine = batch.task_type == value
            if mine.any():
                self._count(kind, "valid", mine.sum())
                self._count(kind, "prompt_cut", (batch.prompt_cut[mine] > 0).sum())
                self._count(kind, "truncated", batch.truncated[mine].sum())
        self.names_used |= batch.names_used

    def close(self) -> None:
        for f in self.files.values():
            f.close()

    def meta(self) -> dict[str, Any]:
        digest = hashlib.sha256("".join(h.hexdigest() for h in self.hashes.values()).encode()).hexdigest()
        report = {"records": self.records, "valid": self.samples, "prompt_cut": self.prompt_cut,
                  "prompt_tokens_cut": self.prompt_tokens_cut, "truncated": self.truncated,
                  "task_types": dict(sorted(self.task_types.items())), "names_used": sorted(self.names_used),
                  "problems": sorted(self.problems)}  # fmt: skip
        return {"samples": self.samples, "tokens": self.tokens, "digest": digest, "report": report}
