"""Hugging Face `datasets` input: save_to_disk folders (Dataset, DatasetDict + split), .parquet and .arrow files
read like JSON lines (same samples, same validation, the row index in place of the line number), and a Hub id
that fails offline with one clear line."""

from __future__ import annotations

import json

import pytest

datasets = pytest.importorskip("datasets")

from loramoe import cli  # noqa: E402
from loramoe.data import DataError, load_instruction_data  # noqa: E402
from loramoe.evaluate import TaskFileError, load_tasks  # noqa: E402
from loramoe.sources import Row, is_dataset_source  # noqa: E402

RECORDS = [
    {"instruction": "Capital of France?", "input": None, "output": "Paris", "task_type": 1},
    {"instruction": "Add", "input": "2 + 2", "output": "4", "task_type": 0},
    {"instruction": "Capital of Italy?", "input": "", "output": "Rome", "task_type": 1},
]
TASKS = [
    {"task": "cbqa", "type": "generate", "prompt": "q : capital of italy ?", "answers": ["rome"]},
    {"task": "nli", "type": "choice", "prompt": "the cat is red ?", "choices": ["yes", "no"], "answer": 1},
    {"task": "cbqa", "type": "generate", "prompt": "q : the capital of france is", "answers": ["paris", "city"]},
]


def _jsonl(path, records) -> str:
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if v is not None}) + "\n" for r in records))
    return str(path)


def _sources(tmp_path, records) -> dict[str, str]:
    """The same records as JSON lines, a save_to_disk folder, a DatasetDict folder, parquet, arrow (stream) and
    Arrow IPC file format."""
    import pyarrow as pa

    columns = list(dict.fromkeys(k for r in records for k in r))  # a table has every column; absent = null
    ds = datasets.Dataset.from_list([{k: r.get(k) for k in columns} for r in records])
    paths = {"jsonl": _jsonl(tmp_path / "data.jsonl", records), "folder": str(tmp_path / "folder"),
             "dict": str(tmp_path / "dict"), "parquet": str(tmp_path / "data.parquet"),
             "arrow_file": str(tmp_path / "ipc.arrow")}  # fmt: skip
    ds.save_to_disk(paths["folder"])
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(paths["dict"])
    ds.to_parquet(paths["parquet"])
    paths["arrow"] = ds.cache_files[0]["filename"] if ds.cache_files else None
    if paths["arrow"] is None:  # an in-memory Dataset has no cache file: the saved folder's shard is one
        paths["arrow"] = str(next((tmp_path / "folder").glob("*.arrow")))
    with pa.OSFile(paths["arrow_file"], "wb") as sink, pa.ipc.new_file(sink, ds.data.table.schema) as writer:
        writer.write_table(ds.data.table)
    return paths


def _samples(dataset) -> list[tuple]:
    return [(s.input_ids, s.labels, s.task_type) for s in dataset.samples]


def test_every_datasets_form_gives_the_json_lines_samples(tmp_path, byte_tokenizer):
    paths = _sources(tmp_path, RECORDS)
    reference = load_instruction_data(paths["jsonl"], byte_tokenizer, max_seq_len=64)
    assert [s.source for s in reference.samples] == [f"{paths['jsonl']}:{i}" for i in (1, 2, 3)]
    for name in ("folder", "dict", "parquet", "arrow", "arrow_file"):
        data = load_instruction_data(paths[name], byte_tokenizer, max_seq_len=64)  # the DatasetDict: 'train'
        assert _samples(data) == _samples(reference), name
        assert [s.source for s in data.samples] == [f"{paths[name]}:row {i}" for i in (0, 1, 2)]
        assert data.report.files[0].records == 3
    test = load_instruction_data(paths["dict"], byte_tokenizer, max_seq_len=64, split="test")
    assert _samples(test) == _samples(reference)[:1]


def test_a_bad_row_is_reported_like_a_bad_line(tmp_path, byte_tokenizer):
    bad = [RECORDS[0], {"instruction": "Add", "output": "4", "task_type": 7}, RECORDS[2]]
    paths = _sources(tmp_path, bad)
    with pytest.raises(DataError, match=r"data\.jsonl:2: unknown task_type 7"):
        load_instruction_data(paths["jsonl"], byte_tokenizer)
    with pytest.raises(DataError, match=r"data\.parquet:row 1: unknown task_type 7"):
        load_instruction_data(paths["parquet"], byte_tokenizer)
    kept = load_instruction_data(paths["folder"], byte_tokenizer, skip_bad=True)
    assert len(kept) == 2
    assert kept.report.skipped == [f"{paths['folder']}:row 1: unknown task_type 7: expected 1 (world knowledge), "
                                   "0 (downstream), -1 (untyped) or one of the names ['downstream', 'knowledge', "
                                   "'untyped'] (map more names with task_type_names, e.g. {'cbqa': 1, 'nli': 0})"]


def test_splits_must_be_chosen_and_must_exist(tmp_path, byte_tokenizer):
    paths = _sources(tmp_path, TASKS)
    with pytest.raises(TaskFileError, match=r"dict: a DatasetDict with splits \['train', 'test'\]: choose one"):
        load_tasks(paths["dict"])  # evaluation has no default split
    with pytest.raises(TaskFileError, match=r"no split 'valid' \(expected one of them\)"):
        load_tasks(paths["dict"], split="valid")
    assert [s.source for s in load_tasks(paths["dict"], split="test")] == [f"{paths['dict']}:row 0"]
    with pytest.raises(ValueError, match=r"split='test': none of .* has splits"):
        load_tasks([paths["jsonl"], paths["parquet"]], split="test")  # a setting that would not be applied
    with pytest.raises(ValueError, match=r"split='test': none of .* has splits"):
        load_instruction_data(_jsonl(tmp_path / "r.jsonl", RECORDS), byte_tokenizer, split="test")


def test_a_split_chooses_from_the_datasetdict_and_a_json_lines_file_beside_it_is_read_whole(tmp_path, byte_tokenizer):
    paths = _sources(tmp_path, RECORDS)  # the DatasetDict: 'train' = all three records, 'test' = the first one
    data = load_instruction_data([paths["dict"], paths["jsonl"]], byte_tokenizer, max_seq_len=64, split="test")
    reference = _samples(load_instruction_data(paths["jsonl"], byte_tokenizer, max_seq_len=64))
    assert _samples(data) == reference[:1] + reference
    assert [s.source for s in data.samples] == [f"{paths['dict']}:row 0"] + [f"{paths['jsonl']}:{i}" for i in (1, 2, 3)]
    assert [(f.records, f.used) for f in data.report.files] == [(1, 1), (3, 3)]


def test_a_dataset_folder_given_a_split_is_refused(tmp_path, byte_tokenizer):
    """A plain Dataset has no splits: read whole under --data-split it could hold the very samples the split keeps
    out, so it is refused (beside a DatasetDict, which makes the split valid as a setting), naming the folder."""
    paths = _sources(tmp_path, RECORDS)
    with pytest.raises(DataError, match=rf"^{paths['folder']}: a Dataset folder has no splits, but split 'test' was "
                                        r"given \(expected a folder written by DatasetDict.save_to_disk"):  # fmt: skip
        load_instruction_data([paths["dict"], paths["folder"]], byte_tokenizer, split="test")
    assert len(load_instruction_data([paths["dict"], paths["folder"]], byte_tokenizer)) == 6  # no split: 'train' + all
    (tmp_path / "tasks").mkdir()
    tasks = _sources(tmp_path / "tasks", TASKS)
    with pytest.raises(TaskFileError, match=rf"^{tasks['folder']}: a Dataset folder has no splits, but split 'test'"):
        load_tasks([tasks["dict"], tasks["folder"]], split="test")


def test_a_multi_line_library_error_is_one_line_naming_the_source(tmp_path, monkeypatch, byte_tokenizer):
    def fails(*args, **kwargs):
        raise ValueError("\nCouldn't find 'someone/capitals' on the Hugging Face Hub.\n  Traceback (most recent call "
                         "last):\n    more detail")  # fmt: skip

    monkeypatch.setattr(datasets, "load_dataset", fails)
    with pytest.raises(TaskFileError) as err:
        load_tasks("someone/capitals", split="test")
    assert str(err.value) == ("someone/capitals: not a local file or folder, and loading it from the Hugging Face Hub "
                              "failed: Couldn't find 'someone/capitals' on the Hugging Face Hub.")  # fmt: skip
    paths = _sources(tmp_path, RECORDS)
    for shard in (tmp_path / "folder").glob("*.arrow"):
        shard.unlink()  # a folder whose data file is gone: datasets' own error, as one line naming the folder
    with pytest.raises(DataError) as err:
        load_instruction_data(paths["folder"], byte_tokenizer)
    message = str(err.value)
    assert message.startswith(f"{paths['folder']}: does not load as a save_to_disk folder (") and "\n" not in message
    assert "data-00000-of-00001.arrow" in message


def test_task_files_from_datasets_match_json_lines(tmp_path):
    paths = _sources(tmp_path, TASKS)
    reference = load_tasks(paths["jsonl"])
    for name in ("folder", "parquet", "arrow"):
        samples = load_tasks(paths[name])
        assert [(s.task, s.type, s.prompt, s.answers, s.choices, s.answer) for s in samples] == \
               [(s.task, s.type, s.prompt, s.answers, s.choices, s.answer) for s in reference]  # fmt: skip
        assert samples[1].source == f"{paths[name]}:row 1"
    datasets.Dataset.from_list([{**TASKS[0], "question": "?"}]).to_parquet(str(tmp_path / "bad.parquet"))
    with pytest.raises(TaskFileError, match=r"bad\.parquet:row 0: unknown keys \['question'\]"):
        load_tasks(tmp_path / "bad.parquet")


def test_unreadable_sources_name_the_path(tmp_path, byte_tokenizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "plain").mkdir()
    (tmp_path / "broken.parquet").write_text("not parquet")
    pq.write_table(pa.table({"instruction": pa.array([], pa.string())}), tmp_path / "empty.parquet")
    cases = [(tmp_path / "plain", "is a folder, but not one written by Dataset.save_to_disk"),
             (tmp_path / "broken.parquet", "not a readable Parquet file"),
             (tmp_path / "missing.parquet", "file not found"),
             (tmp_path / "empty.parquet", "the dataset is empty \\(0 rows\\)")]  # fmt: skip
    for path, message in cases:
        with pytest.raises(DataError, match=f"^{path}: {message}"):
            load_instruction_data(path, byte_tokenizer)
    skipped = load_instruction_data([tmp_path / "empty.parquet", _jsonl(tmp_path / "ok.jsonl", RECORDS)],
                                    byte_tokenizer, skip_bad=True)  # fmt: skip
    assert skipped.report.skipped == [f"{tmp_path / 'empty.parquet'}: the dataset is empty (0 rows)"]


def test_an_empty_save_to_disk_dataset_is_named_empty(tmp_path, byte_tokenizer):
    """datasets itself fails to load a Dataset saved with 0 rows (IndexError: it has no data file)."""
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list([]).save_to_disk(str(tmp_path / "empty"))
    with pytest.raises(DataError, match=f"^{tmp_path / 'empty'}: the dataset is empty \\(0 rows\\)$"):
        load_instruction_data(tmp_path / "empty", byte_tokenizer)
    skipped = load_instruction_data([tmp_path / "empty", _jsonl(tmp_path / "ok.jsonl", RECORDS)], byte_tokenizer,
                                    skip_bad=True)  # fmt: skip
    assert skipped.report.skipped == [f"{tmp_path / 'empty'}: the dataset is empty (0 rows)"]


def test_hub_id_offline_fails_with_one_line(tmp_path, monkeypatch, capsys, tiny_llama_dir):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    assert is_dataset_source("someone/capitals") and not is_dataset_source("someone/capitals.jsonl")
    with pytest.raises(TaskFileError) as err:
        load_tasks("someone/capitals", split="test")
    message = str(err.value)
    assert message.startswith("someone/capitals: not a local file or folder, and loading it from the Hugging Face "
                              "Hub failed:") and "\n" not in message  # fmt: skip
    with pytest.raises(TaskFileError, match="^someone/capitals: .* it needs a split$"):
        load_tasks("someone/capitals")
    code = cli.main(["train", "--model", str(tiny_llama_dir), "--data", "someone/capitals", "--output-dir",
                     str(tmp_path / "o")])  # fmt: skip
    assert code != 0
    err_lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err_lines[-1].startswith("loramoe train: error: someone/capitals: not a local file or folder")


def test_row_prints_as_row_and_sorts_as_a_number():
    assert f"x.parquet:{Row(12)}" == "x.parquet:row 12" and sorted([Row(10), Row(2)]) == [2, 10]


def test_cli_eval_and_train_read_datasets(tmp_path, word_tokenizer, tiny_llama_dir):
    from conftest import bigram_llama, save_base_and_loramoe
    from test_evaluate import _capital_table

    paths = _sources(tmp_path, TASKS)
    base_dir, adapter_dir = save_base_and_loramoe(tmp_path, bigram_llama(_capital_table()), word_tokenizer)
    common = ["--base", str(base_dir), "--adapter", str(adapter_dir), "--no-progress", "--device", "cpu"]
    assert cli.main(["eval", "--tasks", paths["jsonl"], "--out", str(tmp_path / "a"), *common]) == 0
    assert cli.main(["eval", "--tasks", paths["dict"], "--data-split", "train", "--out", str(tmp_path / "b"),
                     *common]) == 0  # fmt: skip
    a, b = (json.loads((tmp_path / d / "eval.json").read_text()) for d in "ab")
    assert a["tasks"] == b["tasks"] and a["tasks"]["cbqa"]["n"] == 2

    (tmp_path / "train").mkdir()
    records = _sources(tmp_path / "train", RECORDS)
    out = tmp_path / "run"
    assert cli.main(["train", "--model", str(tiny_llama_dir), "--data", records["parquet"], "--eval-file",
                     records["dict"], "--eval-split", "test", "--max-steps", "1", "--batch-size", "2", "--num-experts",
                     "2", "--r", "2", "--max-seq-len", "64", "--output-dir", str(out), "--no-progress"]) == 0  # fmt: skip
    report = json.loads((out / "data_report.json").read_text())
    assert report["files"][0]["path"] == records["parquet"] and report["files"][0]["used"] == 3
