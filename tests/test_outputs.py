"""The output-folder rule (loramoe.outputs): loramoe writes only into new, empty or its own folders, replaces only
what its manifest lists, never writes into a protected folder, and leaves permissions to the umask."""

from __future__ import annotations

import json
import os

import pytest

from loramoe.outputs import MANIFEST, OutputDir, check_not_inside, respect_umask


def test_a_new_folder_gets_a_manifest_that_lists_what_was_written(tmp_path):
    out = OutputDir(tmp_path / "new" / "run", "--out").create()
    out.record(["a.json", "ckpts"])
    (out.path / "a.json").write_text("{}")
    (out.path / "a.json.tmp").write_text("{")  # an atomic write cut short: still ours
    (out.path / "theirs.txt").write_text("x")
    assert json.loads((out.path / MANIFEST).read_text()) == {"written_by": "loramoe", "entries": ["a.json", "ckpts"]}
    assert out.owned() == ["a.json"] and out.foreign() == ["theirs.txt"]
    out.remove_owned()
    assert sorted(p.name for p in out.path.iterdir()) == ["a.json.tmp", MANIFEST, "theirs.txt"]


def test_folders_with_files_loramoe_did_not_write_are_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    OutputDir(tmp_path / "empty", "--out").create()  # an empty folder is fine
    (tmp_path / "model").mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt"):
        (tmp_path / "model" / name).write_text("x")
    with pytest.raises(FileExistsError, match=r"model: holds files loramoe did not write \(config\.json, "
                                              r"model\.safetensors, tokenizer\.json and 1 more\)"):  # fmt: skip
        OutputDir(tmp_path / "model", "--out")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="file: exists and is not a folder"):
        OutputDir(tmp_path / "file", "--out")


def test_publish_refuses_to_replace_a_foreign_file_and_moves_nothing(tmp_path):
    out = OutputDir(tmp_path / "o", "--out").create()
    (out.path / "README.md").write_text("theirs")
    staging = out.staging()
    for name in ("README.md", "weights.bin"):
        (staging / name).write_text("new")
    with pytest.raises(FileExistsError, match=r"README\.md: exists and was not written by loramoe"):
        out.publish(staging)
    assert (out.path / "README.md").read_text() == "theirs" and not (out.path / "weights.bin").exists()
    (out.path / "README.md").unlink()
    assert out.publish(staging) == ["README.md", "weights.bin"] and not staging.exists()
    assert out.owned() == ["README.md", "weights.bin"]
    with pytest.raises(FileExistsError, match="eval.json: exists and was not written by loramoe"):
        (out.path / "eval.json").write_text("theirs")
        out.claim(["eval.json"])


def test_protected_folders_and_everything_inside_them(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "m.gguf").write_text("x")
    protected = {"--model": tmp_path / "base", "--gguf": tmp_path / "m.gguf", "--gone": tmp_path / "gone"}
    for dest in (tmp_path / "base", tmp_path / "base" / "sub" / "dir"):
        with pytest.raises(FileExistsError, match=r"the folder of --model"):
            check_not_inside(dest, protected)
    with pytest.raises(FileExistsError, match=r"the folder of --gguf"):  # a file's folder is protected
        check_not_inside(tmp_path, protected)
    check_not_inside(tmp_path / "elsewhere", {"--model": tmp_path / "base"})


def test_respect_umask(tmp_path):
    (tmp_path / "d").mkdir(mode=0o700)
    (tmp_path / "d" / "f").write_text("x")
    os.chmod(tmp_path / "d" / "f", 0o600)
    old = os.umask(0o027)
    try:
        respect_umask(tmp_path / "d")
    finally:
        os.umask(old)
    assert oct((tmp_path / "d").stat().st_mode & 0o777) == oct(0o750)
    assert oct((tmp_path / "d" / "f").stat().st_mode & 0o777) == oct(0o640)


def test_overwrite_unlinks_a_symlinked_entry_and_never_follows_it(tmp_path):
    """Owned entries that are symlinks (to a folder, to a file, to nothing): --overwrite removes the links only, and
    publishing a new folder under such a name replaces the link, writing nothing where it pointed."""
    outside = tmp_path / "outside"
    (outside / "ckpts").mkdir(parents=True)
    (outside / "ckpts" / "theirs.bin").write_text("keep")
    (outside / "log.txt").write_text("keep")
    out = OutputDir(tmp_path / "o", "--out").create()
    out.record(["checkpoints", "metrics.jsonl", "gone", "adapter"])
    os.symlink(outside / "ckpts", out.path / "checkpoints")
    os.symlink(outside / "log.txt", out.path / "metrics.jsonl")
    os.symlink(tmp_path / "nowhere", out.path / "gone")
    os.symlink(outside / "ckpts", out.path / "adapter")
    staging = out.staging()
    (staging / "adapter").mkdir()
    (staging / "adapter" / "new.bin").write_text("new")
    out.publish(staging)
    assert not (out.path / "adapter").is_symlink() and (out.path / "adapter" / "new.bin").read_text() == "new"
    out.remove_owned()
    assert sorted(p.name for p in out.path.iterdir()) == [MANIFEST]
    assert sorted(p.name for p in (outside / "ckpts").iterdir()) == ["theirs.bin"]
    assert (outside / "log.txt").read_text() == "keep"


def test_a_name_recorded_twice_is_one_entry_and_removes_once(tmp_path):
    out = OutputDir(tmp_path / "o", "--out").create()
    out.record(["a.json", "a.json"])
    assert json.loads((out.path / MANIFEST).read_text())["entries"] == ["a.json"]
    out.record(["a.json", "b.json"])
    assert json.loads((out.path / MANIFEST).read_text())["entries"] == ["a.json", "b.json"]
    (out.path / MANIFEST).write_text(json.dumps({"written_by": "loramoe", "entries": ["c", "a.json", "c"]}))
    (out.path / "a.json").write_text("{}")
    (out.path / "c").mkdir()
    assert out.entries() == ["c", "a.json"] and out.owned() == ["c", "a.json"]
    out.remove_owned()
    assert sorted(p.name for p in out.path.iterdir()) == [MANIFEST]


def test_a_foreign_dangling_symlink_is_not_replaced(tmp_path):
    out = OutputDir(tmp_path / "o", "--out").create()
    os.symlink(tmp_path / "nowhere", out.path / "eval.json")
    with pytest.raises(FileExistsError, match="eval.json: exists and was not written by loramoe"):
        out.claim(["eval.json"])
    staging = out.staging()
    (staging / "eval.json").write_text("{}")
    with pytest.raises(FileExistsError, match="eval.json: exists and was not written by loramoe"):
        out.publish(staging)
    assert (out.path / "eval.json").is_symlink()


def test_each_command_overwrites_only_what_it_wrote(tmp_path):
    """`eval --out` into a training run's folder, then `train --overwrite` there: the evaluation stays."""
    train = OutputDir(tmp_path / "run", "--output-dir", owner="train").create()
    train.record(["metrics.jsonl", "checkpoints"])
    (train.path / "metrics.jsonl").write_text("{}")
    (train.path / "checkpoints").mkdir()
    evaluation = OutputDir(tmp_path / "run", "--out", owner="eval")
    evaluation.record(["eval.json"])
    (train.path / "eval.json").write_text("{}")
    assert json.loads((train.path / MANIFEST).read_text()) == {
        "written_by": "loramoe", "entries": ["metrics.jsonl", "checkpoints", "eval.json"],
        "owners": {"metrics.jsonl": "train", "checkpoints": "train", "eval.json": "eval"}}  # fmt: skip
    assert OutputDir(tmp_path / "run", "--output-dir", owner="train").remove_owned() == ["eval.json"]
    assert sorted(p.name for p in train.path.iterdir()) == ["eval.json", MANIFEST]
    # entries listed before owners were recorded go with whichever command overwrites them, as they did
    (train.path / MANIFEST).write_text(json.dumps({"written_by": "loramoe", "entries": ["eval.json"]}))
    assert OutputDir(tmp_path / "run", "--output-dir", owner="train").remove_owned() == []
    assert sorted(p.name for p in train.path.iterdir()) == [MANIFEST]


def test_a_locked_folder_refuses_a_second_holder_until_released(tmp_path):
    first = OutputDir(tmp_path, "--output-dir")
    first.lock("train")
    second = OutputDir(tmp_path, "--output-dir")
    with pytest.raises(FileExistsError, match=rf"^{tmp_path}: in use by loramoe train \(pid {os.getpid()} on "):
        second.lock("train")
    assert second.foreign() == []  # the lock file is loramoe's
    first.unlock()
    second.lock("train")
    second.unlock()
