"""Records from Hugging Face ``datasets`` sources, for training data (`loramoe.data`) and task files
(`loramoe.evaluate`): a folder written by ``save_to_disk`` (a ``Dataset``, or a ``DatasetDict`` and a split), a
``.parquet`` or ``.arrow`` file, or a Hub dataset id and a split (this one needs the network).

A record is one row as a dict, without its null columns (a table has every column in every row; a null stands
for a field that JSON lines would leave out). Its place is the 0-based row index, a `Row`, which stands where
JSON lines have a line number: a problem reads ``train.parquet:row 12``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

TABLE_SUFFIXES = (".parquet", ".arrow")
_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")
_JSON_SUFFIXES = (".json", ".jsonl")


class Row(int):
    """A 0-based row index that prints as ``row N`` (and sorts as a number), in the place of a line number."""

    def __str__(self) -> str:
        return f"row {int(self)}"


class SourceError(ValueError):
    """A dataset source that cannot be read; the message starts with the source."""

    def __init__(self, location: str | Path, reason: str) -> None:
        self.location, self.reason = str(location), reason
        super().__init__(f"{self.location}: {reason}")


def _is_dataset_dict(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file()


def _is_hub_id(spec: str | Path) -> bool:
    path = Path(spec)
    return not path.exists() and path.suffix not in _JSON_SUFFIXES + TABLE_SUFFIXES and bool(_HUB_ID.fullmatch(str(spec)))


def is_dataset_source(spec: str | Path) -> bool:
    """Whether ``spec`` is read here rather than as JSON: a folder, a .parquet/.arrow file, or (when no such local
    path exists) something shaped like a Hub id, ``name`` or ``owner/name``."""
    path = Path(spec)
    return path.is_dir() or path.suffix in TABLE_SUFFIXES or _is_hub_id(spec)


def has_splits(spec: str | Path) -> bool:
    """A ``DatasetDict`` folder or a Hub id: the sources a split is chosen from."""
    path = Path(spec)
    return (path.is_dir() and _is_dataset_dict(path)) or _is_hub_id(spec)


def check_split(specs: Iterable[str | Path], split: str | None, option: str = "split") -> None:
    """A split that no source has would be a setting silently not applied."""
    specs = list(specs)
    if split is not None and not any(has_splits(s) for s in specs):
        raise ValueError(f"{option}={split!r}: none of {[str(s) for s in specs]} has splits (only a folder written by "
                         "DatasetDict.save_to_disk or a Hub dataset id has); leave it out")


def read_rows(spec: str | Path, split: str | None = None, default_split: str | None = None) -> list[tuple[Row, dict]]:
    """``[(row, record)]`` of a dataset source. ``split`` (else ``default_split``) chooses the part of a
    ``DatasetDict`` or Hub dataset; a ``DatasetDict`` with a single split needs none. A ``split`` given for a
    ``Dataset`` folder (which has none) is refused: read whole, it could hold the very samples the split was to
    keep out. Raises `SourceError`."""
    return list(iter_rows(spec, split, default_split))


def iter_rows(spec: str | Path, split: str | None = None, default_split: str | None = None) -> Iterator[tuple[Row, dict]]:
    """`read_rows`, one row at a time: Arrow data stays memory-mapped and Parquet is read a row group at a time,
    so a large source is never in memory whole. A source that cannot be opened, or has no rows, raises
    `SourceError` here, before the first row."""
    count, batches = _open_table(spec, split, default_split)
    if not count:
        raise SourceError(spec, "the dataset is empty (0 rows)")
    return _rows(spec, batches)


def dataset_files(spec: str | Path, split: str | None = None, default_split: str | None = None) -> list[Path]:
    """The files that hold a source's data (their contents fingerprint it): the file itself, every file of a
    ``save_to_disk`` folder, or the Arrow files a Hub dataset was cached in. Raises `SourceError`."""
    path = Path(spec)
    if path.suffix in TABLE_SUFFIXES and not path.is_dir():
        if not path.is_file():
            raise SourceError(path, "file not found")
        return [path]
    if path.is_dir():
        _check_saved(path)
        return sorted(p for p in path.rglob("*") if p.is_file())
    return sorted(Path(f["filename"]) for f in _read_hub(str(spec), split or default_split).cache_files)


ROWS_PER_BATCH = 1000


def _rows(spec: str | Path, batches: Iterable[Any]) -> Iterator[tuple[Row, dict]]:
    import pyarrow as pa

    index = 0
    try:
        for batch in batches:
            for record in batch.to_pylist():
                yield Row(index), {k: v for k, v in record.items() if v is not None}
                index += 1
    except (pa.ArrowException, OSError) as e:
        raise SourceError(spec, f"cannot be read past row {index} ({_first_line(e)})") from None


def _open_table(spec: str | Path, split: str | None, default_split: str | None) -> tuple[int, Iterable[Any]]:
    """``(rows, record batches)`` of a source, opened without reading its data."""
    path = Path(spec)
    if path.suffix in TABLE_SUFFIXES and path.is_file():
        return _read_table(path)
    if path.is_dir():
        data = _read_saved(path, split, default_split)
    elif path.suffix in TABLE_SUFFIXES:
        raise SourceError(path, "file not found")
    else:
        data = _read_hub(str(spec), split or default_split)
    return len(data), data.with_format("arrow").iter(batch_size=ROWS_PER_BATCH)


def _datasets(spec: str | Path) -> Any:
    try:
        import datasets
    except ImportError:
        raise SourceError(spec, "reading it needs the `datasets` package (pip install 'loramoe[datasets]')") from None
    return datasets


def _read_table(path: Path) -> tuple[int, Iterable[Any]]:
    """Parquet, or Arrow IPC: the stream format that ``datasets`` writes, or the file format (memory-mapped)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise SourceError(path, "reading it needs the `pyarrow` package (pip install 'loramoe[datasets]')") from None
    try:
        if path.suffix == ".parquet":
            parquet = pq.ParquetFile(path)
            return parquet.metadata.num_rows, parquet.iter_batches(batch_size=ROWS_PER_BATCH)
        source = pa.memory_map(str(path))
        try:
            table = pa.ipc.open_stream(source).read_all()
        except pa.ArrowInvalid:
            source.seek(0)
            table = pa.ipc.open_file(source).read_all()
        return table.num_rows, table.to_batches(max_chunksize=ROWS_PER_BATCH)
    except (pa.ArrowException, OSError) as e:
        kind = "Parquet" if path.suffix == ".parquet" else "Arrow (IPC stream or file)"
        raise SourceError(path, f"not a readable {kind} file ({e})") from None


def _check_saved(path: Path) -> None:
    if not (_is_dataset_dict(path) or (path / "dataset_info.json").is_file()):
        raise SourceError(path, "is a folder, but not one written by Dataset.save_to_disk or DatasetDict.save_to_disk "
                                "(no dataset_info.json or dataset_dict.json; expected a JSON list or JSON-lines file, "
                                "a .parquet / .arrow file or a save_to_disk folder)")  # fmt: skip


def _read_saved(path: Path, split: str | None, default_split: str | None) -> Any:
    """The ``datasets.Dataset`` of a ``save_to_disk`` folder (memory-mapped), of the chosen split."""
    _check_saved(path)
    if split is not None and not _is_dataset_dict(path):
        raise SourceError(path, f"a Dataset folder has no splits, but split {split!r} was given (expected a folder "
                                "written by DatasetDict.save_to_disk with that split; a Dataset folder is read whole, "
                                "so only without a split)")  # fmt: skip
    datasets = _datasets(path)
    try:
        loaded = datasets.load_from_disk(str(path))
    except IndexError:  # what datasets raises for a Dataset saved with 0 rows (it has no data file to load)
        raise SourceError(path, "the dataset is empty (0 rows)") from None
    except Exception as e:  # a missing or damaged shard, a newer format, ...: the library's own words, one line
        raise SourceError(path, f"does not load as a save_to_disk folder ({_first_line(e)})") from None
    if _is_dataset_dict(path):
        split = split or default_split
        splits = list(loaded)
        if split is None and len(splits) == 1:
            split = splits[0]
        if split not in splits:
            wanted = "choose one of them as the split" if split is None else f"no split {split!r} (expected one of them)"
            raise SourceError(path, f"a DatasetDict with splits {splits}: {wanted}")
        loaded = loaded[split]
    return loaded


def _read_hub(spec: str, split: str | None) -> Any:
    if split is None:
        raise SourceError(spec, "not a local file or folder; as a Hugging Face Hub dataset it needs a split")
    datasets = _datasets(spec)
    try:
        return datasets.load_dataset(spec, split=split)
    except Exception as e:  # offline, unknown id, no such split, ...: all the same to the user
        raise SourceError(spec, f"not a local file or folder, and loading it from the Hugging Face Hub failed: "
                                f"{_first_line(e)}") from None  # fmt: skip


def _first_line(error: Exception) -> str:
    """A library's error as one line: its first non-blank line (the rest is usually a traceback or a hint)."""
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
