"""What the data path did, for the log and ``data_report.json``: per file, records read, samples made and used
(after the mixing weight), prompts cut and samples truncated to fit, records skipped (with ``file:line`` and the
reason), and all of it per task type, so the task-type mix before (records) and after (samples used) shows."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

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
