"""The token cache (`loramoe.data.cache`) and the streamed reading under it: samples equal to encoding each record
on its own, reuse, rebuilds on a changed file or encoding, corrupt entries rebuilt with a warning, the same bytes
whatever the number of worker processes, the ownership rule, one build under torchrun, and JSON lists read in
small windows equal to json.loads of the whole text."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from loramoe.data import (
    DEFAULT_TASK_TYPE_NAMES,
    CacheWarning,
    DataError,
    default_cache_dir,
    load_instruction_data,
    read_records,
)
from loramoe.data import records as records_module
from loramoe.outputs import MANIFEST


def rec(i: int, task_type=0, output=None) -> dict:
    return {"instruction": f"Add {i} and {i}.", "input": "" if i % 3 else f"{i} + {i}",
            "output": output or str(2 * i), "task_type": task_type}  # fmt: skip


def write_jsonl(path: Path, records: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def logged(lines: list[str], what: str) -> list[str]:
    return [line for line in lines if f": {what} " in line]


def entries(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if (p / "meta.json").is_file())


def reference(records: list, tok) -> list[tuple[list[int], list[int], int]]:
    """Each (short, reference-format) record tokenised on its own as SPEC.md says, without loramoe's encoding:
    prompt = instruction (+ "\\n" + input) + EOS, target = output + EOS."""
    out = []
    for r in records:
        prompt = tok(r["instruction"] + ("\n" + r["input"] if r["input"] else ""))["input_ids"] + [tok.eos_token_id]
        target = tok(r["output"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        out.append((prompt + target, [-100] * len(prompt) + target, DEFAULT_TASK_TYPE_NAMES.get(r["task_type"], r["task_type"])))
    return out


def samples(data) -> list[tuple[list[int], list[int], int]]:
    return [(s.input_ids, s.labels, s.task_type) for s in data.samples]


# ---- reuse and rebuilds -----------------------------------------------------------------------------------------


def test_a_second_load_reuses_the_entry_and_a_changed_file_replaces_it(tmp_path, byte_tokenizer):
    records = [rec(i, task_type=i % 2) for i in range(20)]
    path = write_jsonl(tmp_path / "a.jsonl", records)
    cache, log = tmp_path / "cache", []
    first = load_instruction_data(path, byte_tokenizer, max_seq_len=64, cache_dir=cache, log=log.append)
    assert samples(first) == reference(records, byte_tokenizer)
    assert [s.source for s in first.samples] == [f"{path}:{i}" for i in range(1, 21)]
    (built,) = entries(cache)
    assert logged(log, "building") and not logged(log, "reusing")

    log.clear()
    again = load_instruction_data(path, byte_tokenizer, max_seq_len=64, cache_dir=cache, log=log.append)
    assert logged(log, "reusing") == [f"data cache: {path}: reusing {built} (20 samples)"] and not logged(log, "building")
    assert samples(again) == samples(first) and again.fingerprint() == first.fingerprint()

    records[4] = rec(4, output="forty-two")  # the file changes: rebuilt, and the old entry goes
    write_jsonl(tmp_path / "a.jsonl", records)
    log.clear()
    changed = load_instruction_data(path, byte_tokenizer, max_seq_len=64, cache_dir=cache, log=log.append)
    assert logged(log, "building") and samples(changed) == reference(records, byte_tokenizer)
    assert entries(cache) != [built] and len(entries(cache)) == 1 and changed.fingerprint() != first.fingerprint()


def test_a_datasets_source_goes_through_the_same_cache(tmp_path, byte_tokenizer):
    datasets = pytest.importorskip("datasets")
    records = [rec(i, task_type=i % 2) for i in range(12)]
    path = tmp_path / "a.parquet"
    datasets.Dataset.from_list(records).to_parquet(str(path))
    cache, log = tmp_path / "cache", []
    first = load_instruction_data(path, byte_tokenizer, max_seq_len=64, cache_dir=cache, log=log.append)
    again = load_instruction_data(path, byte_tokenizer, max_seq_len=64, cache_dir=cache, log=log.append)
    assert [len(logged(log, w)) for w in ("building", "reusing")] == [1, 1]
    assert samples(first) == samples(again) == reference(records, byte_tokenizer)
    assert [s.source for s in again.samples][:2] == [f"{path}:row 0", f"{path}:row 1"]


def test_every_setting_that_shapes_the_samples_is_in_the_key(tmp_path, byte_tokenizer):
    path = write_jsonl(tmp_path / "a.jsonl", [rec(i, task_type="nli") for i in range(6)])
    cache = tmp_path / "cache"
    byte_tokenizer.save_pretrained(tmp_path / "tok")
    same, other = (byte_tokenizer.__class__.from_pretrained(tmp_path / "tok") for _ in range(2))
    other.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    variants = [dict(), dict(max_seq_len=32), dict(fit_prompt=False), dict(task_type_names={"nli": 1}),
                dict(tokenizer=other)]  # fmt: skip
    for variant in variants:
        kwargs = {"max_seq_len": 64, "task_type_names": {"nli": 0}, "tokenizer": same, **variant}
        load_instruction_data(path, cache_dir=cache, **kwargs)
    assert len(entries(cache)) == len(variants)  # no variant reused another's entry
    log = []
    load_instruction_data(path, same, max_seq_len=64, task_type_names={"nli": 0}, cache_dir=cache, skip_bad=True,
                          seed=7, log=log.append)  # fmt: skip
    assert logged(log, "reusing")  # skip_bad and the seed are applied on loading


def test_mixing_weights_are_indices_into_one_entry(tmp_path, byte_tokenizer):
    records = [rec(i) for i in range(10)]
    path = write_jsonl(tmp_path / "a.jsonl", records)
    data = load_instruction_data([(path, 2.5)], byte_tokenizer, max_seq_len=64, cache_dir=tmp_path / "c", seed=1)
    (entry,) = entries(tmp_path / "c")
    assert json.loads((entry / "meta.json").read_text())["samples"] == 10  # stored once
    ref = reference(records, byte_tokenizer)
    got = samples(data)
    assert len(got) == 25 and got[:20] == ref + ref and all(s in ref for s in got[20:]) and len(set(map(str, got[20:]))) == 5


@pytest.mark.parametrize("damage", ["truncated ids", "bad meta", "meta without counts", "missing offsets",
                                    "offsets out of order"])  # fmt: skip
def test_a_corrupt_entry_is_rebuilt_with_a_warning_naming_it(tmp_path, byte_tokenizer, damage):
    records = [rec(i) for i in range(8)]
    path = write_jsonl(tmp_path / "a.jsonl", records)
    cache = tmp_path / "cache"
    load_instruction_data(path, byte_tokenizer, max_seq_len=64, cache_dir=cache)
    (entry,) = entries(cache)
    if damage == "truncated ids":
        with open(entry / "ids.u32", "r+b") as f:
            f.truncate(10)
    elif damage == "bad meta":
        (entry / "meta.json").write_text('{"written_by": "loramoe", "form')
    elif damage == "meta without counts":
        meta = json.loads((entry / "meta.json").read_text())
        del meta["report"]["problems"]
        (entry / "meta.json").write_text(json.dumps(meta))
    elif damage == "missing offsets":
        (entry / "offsets.i64").unlink()
    else:
        offsets = np.fromfile(entry / "offsets.i64", dtype=np.int64)
        offsets[[2, 3]] = offsets[[3, 2]]
        offsets.tofile(entry / "offsets.i64")
    log = []
    with pytest.warns(CacheWarning, match=re.escape(f"{entry}: corrupt data cache entry")):
        data = load_instruction_data(path, byte_tokenizer, max_seq_len=64, cache_dir=cache, log=log.append)
    assert logged(log, "building") and samples(data) == reference(records, byte_tokenizer)
    log.clear()
    load_instruction_data(path, byte_tokenizer, max_seq_len=64, cache_dir=cache, log=log.append)
    assert logged(log, "reusing")


def test_worker_processes_build_the_same_bytes_as_one(tmp_path, byte_tokenizer, monkeypatch):
    """Several batches (records per task lowered), bad records skipped, chat records, prompts cut: the entry
    built by 2 spawned workers is byte for byte the one built in-process."""
    monkeypatch.setattr("loramoe.data.cache.RECORDS_PER_TASK", 16)
    chat = {"messages": [{"role": "user", "content": "Q " + "x" * 90}, {"role": "assistant", "content": "A"}], "task_type": 1}
    rows = [rec(i, task_type=i % 2) if i % 7 else chat for i in range(100)]
    rows[10], rows[55] = '{"broken', rec(55, task_type="poetry")
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    one = load_instruction_data(path, byte_tokenizer, max_seq_len=48, cache_dir=tmp_path / "one", skip_bad=True)
    two = load_instruction_data(path, byte_tokenizer, max_seq_len=48, cache_dir=tmp_path / "two", skip_bad=True,
                                num_proc=2)  # fmt: skip
    (a,), (b,) = entries(tmp_path / "one"), entries(tmp_path / "two")
    assert a.name == b.name
    for name in ("ids.u32", "target.u8", "offsets.i64", "task_type.i8", "line.i64"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    meta_a, meta_b = (json.loads((p / "meta.json").read_text()) for p in (a, b))
    assert {k: v for k, v in meta_a.items() if k not in ("seconds", "workers")} == \
           {k: v for k, v in meta_b.items() if k not in ("seconds", "workers")}  # fmt: skip
    assert len(one.report.skipped) == 2 and one.report.prompt_cut > 0 and samples(one) == samples(two)


# ---- ownership --------------------------------------------------------------------------------------------------


def test_the_cache_folder_follows_the_ownership_rule(tmp_path, byte_tokenizer):
    path = write_jsonl(tmp_path / "a.jsonl", [rec(i) for i in range(4)])
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=rf"^{re.escape(str(foreign))}: holds files loramoe did not write"):
        load_instruction_data(path, byte_tokenizer, cache_dir=foreign)
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]

    cache = tmp_path / "cache"
    load_instruction_data(path, byte_tokenizer, cache_dir=cache)
    (entry,) = entries(cache)
    (cache / "notes.txt").write_text("mine")  # someone's file beside the entries: never touched
    manifest = json.loads((cache / MANIFEST).read_text())
    (cache / MANIFEST).write_text(json.dumps({**manifest, "entries": [e for e in manifest["entries"] if e != entry.name]}))
    with pytest.raises(FileExistsError, match=rf"^{re.escape(str(entry))}: exists and was not written by loramoe"):
        load_instruction_data(path, byte_tokenizer, cache_dir=cache)  # an entry's folder that loramoe did not list
    (cache / MANIFEST).write_text(json.dumps(manifest))
    write_jsonl(tmp_path / "a.jsonl", [rec(i) for i in range(5)])  # replaces the (listed) entry
    load_instruction_data(path, byte_tokenizer, cache_dir=cache)
    assert not entry.exists() and (cache / "notes.txt").read_text() == "mine"


def test_the_default_cache_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("LORAMOE_CACHE", str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("LORAMOE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "loramoe" / "data"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "loramoe" / "data"


def test_a_private_cache_goes_with_its_dataset(tmp_path, byte_tokenizer):
    import gc

    data = load_instruction_data(write_jsonl(tmp_path / "a.jsonl", [rec(1)]), byte_tokenizer)
    folder = data.parts[0].entry.path.parent
    assert folder.is_dir() and len(data) == 1
    del data
    gc.collect()
    assert not folder.exists()


# ---- one build under torchrun ----------------------------------------------------------------------------------

DRIVER = textwrap.dedent('''
    import json, sys
    from loramoe.train import TrainConfig, train

    train(TrainConfig(**json.loads(sys.argv[1])))
''')


@pytest.mark.slow
def test_torchrun_builds_the_entry_once_and_every_rank_maps_it(tiny_llama_dir, tmp_path):
    rows = [rec(i, task_type=i % 2) for i in range(64)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    cache = tmp_path / "cache"
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)

    def run(name: str) -> str:
        cfg = dict(model=str(tiny_llama_dir), data=[data], output_dir=str(tmp_path / name), num_experts=2, r=2,
                   max_seq_len=64, batch_size=2, max_steps=1, progress=False, cache_dir=str(cache))  # fmt: skip
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(driver),
                   json.dumps(cfg)]  # fmt: skip
        proc = subprocess.run(command, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                              timeout=600)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    out = run("a").splitlines()
    (entry,) = entries(cache)
    built = [line for line in out if ": building " in line]
    reused = [line for line in out if ": reusing " in line]
    assert len(built) == 1 and len(reused) == 1, out  # one rank built it; the other waited, then mapped it
    assert {line[:8] for line in built + reused} == {"[rank 0]", "[rank 1]"} and str(entry) in reused[0]
    out = run("b").splitlines()
    assert sum(": reusing " in line for line in out) == 2 and not any(": building " in line for line in out)


# ---- training: resume checks the samples by the cache's fingerprint --------------------------------------------


def test_resume_refuses_changed_samples_and_accepts_an_older_fingerprint(tiny_llama_dir, tmp_path, capsys):
    from loramoe.checkpoint import write_checksums
    from loramoe.train import TrainConfig, checkpoint_dirs, train

    rows = [rec(i, task_type=i % 2) for i in range(16)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "run"
    cfg = dict(model=str(tiny_llama_dir), data=[data], output_dir=str(out), num_experts=2, r=2, max_seq_len=64,
               batch_size=4, max_steps=4, save_every=2, progress=False, cache_dir=str(tmp_path / "cache"))  # fmt: skip
    train(TrainConfig(**cfg))
    rows[3] = rec(3, output="changed")
    write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(ValueError, match=r"cannot resume: .*data_fingerprint 'v2:[0-9a-f]{64}' -> 'v2:[0-9a-f]{64}'"):
        train(TrainConfig(**{**cfg, "max_steps": 6, "resume": True}))
    rows[3] = rec(3)
    write_jsonl(tmp_path / "d.jsonl", rows)
    state_file = checkpoint_dirs(out)[-1] / "trainer_state.json"
    state = json.loads(state_file.read_text())
    state["invariants"]["data_fingerprint"] = "0" * 64  # as written before the cache
    state_file.write_text(json.dumps(state))
    write_checksums(state_file.parent)  # an intact checkpoint of an older loramoe, not a damaged one
    capsys.readouterr()
    assert train(TrainConfig(**{**cfg, "max_steps": 6, "resume": True})).resumed_from == 2
    assert "does not record data_fingerprint (written by an older loramoe), so they were not checked" in \
        capsys.readouterr().out  # fmt: skip


# ---- reading: JSON lists in small windows, UTF-8 errors, laziness -----------------------------------------------

LIST_RECORDS = [{"instruction": "é" * 7, "output": "[1, 2]", "task_type": 1, "nested": {"a": [1, {"b": "}"}]}},
                {"instruction": "x\\ny", "output": "\u2028 ok", "task_type": 0}, 12345, "a string",
                {"instruction": "last", "output": "z" * 40, "task_type": -1}]  # fmt: skip


def list_text(records: list, layout: str) -> str:
    if layout == "indented":
        return json.dumps(records, indent=3, ensure_ascii=False)
    if layout == "one line":
        return json.dumps(records, ensure_ascii=False)
    if layout == "crlf":
        return json.dumps(records, indent=1).replace("\n", "\r\n")
    # three records a line: a record starts mid-line, after a line break the window has left behind
    rows = [", ".join(json.dumps(r, ensure_ascii=False) for r in records[i : i + 3]) for i in range(0, len(records), 3)]
    return "[" + ",\n ".join(rows) + "]\n"


@pytest.mark.parametrize("layout", ["indented", "one line", "crlf", "three a line"])
def test_a_json_list_read_in_small_windows_equals_json_loads(tmp_path, monkeypatch, layout):
    monkeypatch.setattr(records_module, "CHUNK", 5)  # windows far smaller than a record
    many = LIST_RECORDS * 20  # far more text than a window: what is behind is dropped as the reader moves on
    text = list_text(many, layout)
    path = tmp_path / "list.json"
    path.write_text(text, encoding="utf-8", newline="")
    got, problems = read_records(path)
    assert [r for _, r in got] == json.loads(text) and problems == []
    # a record's line is the line of its first character, counted independently here
    decoder, pos, starts = json.JSONDecoder(), text.index("[") + 1, []
    for _ in many:
        pos = len(text) - len(text[pos:].lstrip(" \t\r\n,"))
        starts.append(text.count("\n", 0, pos) + 1)
        pos = decoder.raw_decode(text, pos)[1]
    assert [(where.line, int(where)) for where, _ in got] == list(zip(starts, range(1, len(many) + 1)))


@pytest.mark.parametrize("layout", ["indented", "one line", "three a line"])
def test_a_broken_json_list_names_the_line_and_column_json_loads_names(tmp_path, monkeypatch, layout):
    monkeypatch.setattr(records_module, "CHUNK", 5)
    text = list_text(LIST_RECORDS * 20, layout)
    head, _, tail = text.rpartition('"last"')
    bad = head + '"last" "no colon"' + tail  # in the last record: far past the first window
    path = tmp_path / "bad.json"
    path.write_text(bad, encoding="utf-8")
    with pytest.raises(json.JSONDecodeError) as expected:
        json.loads(bad)
    e = expected.value
    with pytest.raises(DataError, match=re.escape(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})")):
        read_records(path)


def test_records_are_read_as_they_are_needed(tmp_path):
    path = tmp_path / "l.json"
    path.write_text('[{"a": 1}, {"b": 2}\n {"c": 3}]')  # a comma is missing after the second record
    stream = records_module.iter_records(records_module.open_source(path))
    assert [(str(where), record) for where, record in (next(stream), next(stream))] == \
           [("1 (record 1)", {"a": 1}), ("1 (record 2)", {"b": 2})]  # fmt: skip
    with pytest.raises(DataError, match=r"l\.json:2: malformed JSON \(expected ',' or '\]' after a record\)"):
        next(stream)


def test_not_utf8_is_told_at_the_position_python_names(tmp_path, monkeypatch):
    monkeypatch.setattr(records_module, "CHUNK", 4)  # the bad bytes fall past several chunk boundaries
    for raw in (b'{"a": "\xc3\xa9\xc3\xa9\xff"}\n', b'{"a": "abcdefgh\xe2\x82"}', b'{"a": "x"}\n\xe2\x82'):
        path = tmp_path / "bad.jsonl"
        path.write_bytes(raw)
        with pytest.raises(UnicodeDecodeError) as expected:
            raw.decode("utf-8")
        with pytest.raises(DataError, match=re.escape(f"{path}: not UTF-8 text ({expected.value})")):
            read_records(path)
