"""Instruction files -> tokenised samples with task types -> padded batches, through an on-disk token cache.

The path, one module per stage:

- `records`: sources -> ``(line, record)``, streamed (JSON lines, a JSON list, ``datasets`` sources);
- `encode`: record -> ids, labels, task type; over-long samples fitted to ``max_seq_len``;
- `cache`: every source tokenised once into memory-mapped flat arrays, keyed by its content and the encoding,
  built by worker processes, shared by every process on the machine;
- `batches`: `InstructionDataset` over the cache, `InstructionCollator` (padding);
- `report`: what was read, cut, skipped and used, per file and task type (``data_report.json``);
- `load`: `load_instruction_data`, the stages in order, and the mixing weights.

Every problem names the file and line (in a JSON list also the record's 1-based index: ``file:1 (record 7)``);
with ``skip_bad`` the record is skipped and listed in the report instead, never dropped silently. Records may also come from Hugging Face ``datasets`` sources (``save_to_disk``
folders, .parquet, .arrow, Hub ids; see `loramoe.sources`): the same columns, the row index in place of the
line number.
"""

from .batches import FINGERPRINT_VERSION, InstructionCollator, InstructionDataset, Part
from .cache import CacheEntry, CacheWarning, DataCache, default_cache_dir
from .encode import (
    CHAT_ROLES,
    DEFAULT_TASK_TYPE_NAMES,
    IGNORE_INDEX,
    INVALID,
    TYPE_NAMES,
    Cut,
    Encoding,
    Sample,
    check_task_type_names,
    encode_record,
    fit_to_length,
)
from .load import DataSpec, load_instruction_data, parse_data_spec
from .records import DataError, ListRecord, Malformed, Source, iter_records, open_source, read_records
from .report import COUNTS, DataReport, FileReport

__all__ = [
    "CHAT_ROLES", "COUNTS", "FINGERPRINT_VERSION", "DEFAULT_TASK_TYPE_NAMES", "IGNORE_INDEX", "INVALID", "TYPE_NAMES", "CacheEntry",
    "CacheWarning", "Cut", "DataCache", "DataError", "DataReport", "DataSpec", "Encoding", "FileReport",
    "InstructionCollator", "InstructionDataset", "ListRecord", "Malformed", "Part", "Sample", "Source", "check_task_type_names",
    "default_cache_dir", "encode_record", "fit_to_length", "iter_records", "load_instruction_data", "open_source",
    "parse_data_spec", "read_records",
]  # fmt: skip
