"""The command line's failure contract (loramoe.cli): every command, over bad inputs, prints one line
``loramoe <command>: error: <path or key>: ...`` naming what is wrong, exits with 2 and shows no traceback
(unless --debug / LORAMOE_DEBUG=1). The cases are keyed by command: a command added to loramoe.cli.COMMANDS
without cases here fails `test_every_command_has_bad_input_cases`."""

from __future__ import annotations

import errno
import json
import os
import pickle
import socket
import subprocess
import sys
from collections.abc import Iterator

import datasets
import peft
import pytest
import torch

import loramoe
from conftest import tiny_model
from loramoe import cli
from loramoe.errors import RunStopped
from loramoe.loading import load_base_model
from loramoe.outputs import OutputDir


@pytest.fixture(scope="module")
def paths(tiny_llama_dir, tmp_path_factory) -> Iterator[dict[str, str]]:
    root = tmp_path_factory.mktemp("bad_inputs")
    (root / "empty").mkdir()
    (root / "theirs").mkdir()
    (root / "theirs" / "notes.txt").write_text("not loramoe's")
    data = root / "data.jsonl"
    data.write_text(json.dumps({"instruction": "Add", "input": "1+1", "output": "2", "task_type": 0}) + "\n")
    tasks = root / "tasks.jsonl"
    tasks.write_text(json.dumps({"type": "generate", "prompt": "1+1=", "answers": ["2"]}) + "\n")
    (root / "broken.jsonl").write_text('{"type": "generate", "prompt": "x"\n')
    adapter = root / "adapter"
    peft.get_peft_model(load_base_model(str(tiny_llama_dir)), loramoe.LoraMoeConfig(num_experts=2, r=2)).save_pretrained(adapter)
    (adapter / "adapter_model.safetensors").unlink()
    # reference-code adapters: one with a null rank, one whose pickle holds more than tensors
    model = tiny_model("llama")
    state = {}
    for name, module in model.named_modules():
        if name.endswith("mlp.up_proj"):
            state.update({f"base_model.model.{name}.lora_A0.weight": torch.zeros(2, module.in_features),
                          f"base_model.model.{name}.lora_B0.weight": torch.zeros(module.out_features, 2),
                          f"base_model.model.{name}.lora_route.weight": torch.zeros(1, module.in_features)})  # fmt: skip
    config = {"r": 2, "lora_alpha": 4, "lora_nums": 1, "target_modules": ["up_proj"]}
    for name, changes in (("ref", {}), ("ref_null", {"r": None}), ("ref_pickle", {})):
        (root / name).mkdir()
        (root / name / "adapter_config.json").write_text(json.dumps({**config, **changes}))
        torch.save(state, root / name / "adapter_model.bin")
    with open(root / "ref_pickle" / "adapter_model.bin", "wb") as f:
        pickle.dump({"x": _Code()}, f)
    # round 2 (issue 19): YAML as users write it, datasets edge cases, a plain LoRA adapter, a folder in use
    for name, text in (("lr_fast", "lr: fast\n"), ("quoted", 'max_steps: "2"\n'), ("broken", "lr: [1e-3\nr: 2\n")):
        (root / f"{name}.yaml").write_text(text)
    datasets.Dataset.from_list([]).save_to_disk(str(root / "empty_ds"))
    good = {"instruction": "Add", "input": "1+1", "output": "2", "task_type": 0}
    (root / "surrogate.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [good] * 3 + [{**good, "input": "\ud800"}]))
    (root / "surrogate_tasks.jsonl").write_text(json.dumps({"type": "generate", "prompt": "\ud800", "answers": ["2"]}))
    (root / "list.json").write_text(json.dumps([good] * 6 + [{"instruction": "x", "task_type": 1}] + [good] * 9))
    lora = peft.LoraConfig(r=2, target_modules=["up_proj"])
    peft.get_peft_model(load_base_model(str(tiny_llama_dir)), lora).save_pretrained(root / "lora")
    (root / "busy").mkdir()
    busy = OutputDir(root / "busy", "--output-dir")
    busy.lock("train")  # as a run in progress holds it
    yield {"root": str(root), "model": str(tiny_llama_dir), "data": str(data), "tasks": str(tasks)}
    busy.unlock()


class _Code:
    def __reduce__(self):
        return (print, ("pickle code ran",))


T = ["--data", "{data}", "--output-dir", "{root}/run"]  # a good train command's other flags
E = ["--tasks", "{tasks}", "--out", "{root}/eval"]

# command -> [(case id, argv, what the line must name)]; placeholders are the `paths` fixture's keys
CASES: dict[str, list[tuple[str, list[str], str]]] = {
    "import-official": [
        ("missing source", ["{root}/nowhere", "{root}/dst"], "{root}/nowhere: not a folder"),
        ("not an adapter", ["{root}/empty", "{root}/dst"], "{root}/empty/adapter_config.json: not found"),
        ("into its source", ["{root}/ref", "{root}/ref"], "{root}/ref: is the folder of SRC"),
        ("null rank", ["{root}/ref_null", "{root}/dst"], "{root}/ref_null/adapter_config.json: 'r' is null"),
        ("code in the pickle", ["{root}/ref_pickle", "{root}/dst"], "{root}/ref_pickle/adapter_model.bin: refused"),
        ("someone's folder", ["{root}/ref", "{root}/theirs", "--overwrite"], "{root}/theirs: holds files loramoe did not write"),
        ("no arguments", [], "the following arguments are required: src, dst"),
    ],
    "train": [
        ("missing model", ["--model", "{root}/nowhere", *T], "{root}/nowhere: not found"),
        ("empty model folder", ["--model", "{root}/empty", *T], "{root}/empty: the folder has no tokenizer.json"),
        ("a folder as data", ["--model", "{model}", "--data", "{root}", "--output-dir", "{root}/run"], "{root}: is a folder"),
        ("missing data", ["--model", "{model}", "--data", "{root}/no.jsonl", "--output-dir", "{root}/run"], "{root}/no.jsonl: file not found"),
        ("into the base model", ["--model", "{model}", "--data", "{data}", "--output-dir", "{model}", "--method", "full",
                                 "--overwrite"], "{model}: is the folder of --model"),
        ("someone's folder", ["--model", "{model}", "--data", "{data}", "--output-dir", "{root}/theirs", "--overwrite"],
         "{root}/theirs: holds files loramoe did not write"),
        ("a number as a name", ["--model", "{model}", *T, "--task-type-names", "0=1"], "task_type_names: '0' is not a name"),
        ("bad number", ["--model", "{model}", *T, "--lr", "fast"], "argument --lr: invalid float value: 'fast'"),
        ("bad setting", ["--model", "{model}", *T, "--max-seq-len", "1"], "TrainConfig.max_seq_len=1 is invalid"),
        ("missing config", ["--config", "{root}/no.yaml"], "{root}/no.yaml: No such file or directory"),
        ("yaml: a word as lr", ["--config", "{root}/lr_fast.yaml", "--model", "{model}", *T],
         "{root}/lr_fast.yaml: lr: 'fast' is a string (expected a number such as 5e-3)"),
        ("yaml: a quoted integer", ["--config", "{root}/quoted.yaml", "--model", "{model}", *T],
         "{root}/quoted.yaml: max_steps: '2' is a string (expected an integer or null; write it without quotes)"),
        ("yaml: broken", ["--config", "{root}/broken.yaml", "--model", "{model}", *T], "{root}/broken.yaml:2: not valid YAML"),
        ("infinite lr", ["--model", "{model}", *T, "--lr", "inf"], "TrainConfig.lr=inf is invalid: expected a finite number"),
        ("empty dataset folder", ["--model", "{model}", "--data", "{root}/empty_ds", "--output-dir", "{root}/run"],
         "{root}/empty_ds: the dataset is empty (0 rows)"),
        ("lone surrogate", ["--model", "{model}", "--data", "{root}/surrogate.jsonl", "--output-dir", "{root}/run"],
         "{root}/surrogate.jsonl:4: field 'input' holds '\\ud800', a lone UTF-16 surrogate"),
        ("negative weight", ["--model", "{model}", "--data", "{data}:-1", "--output-dir", "{root}/run"],
         "{data}: mixing weight must be a finite number > 0, got -1.0"),
        ("a JSON list on one line", ["--model", "{model}", "--data", "{root}/list.json", "--output-dir", "{root}/run"],
         "{root}/list.json:1 (record 7): missing field 'output'"),
        ("a step larger than the data", ["--model", "{model}", *T, "--batch-size", "1000"],
         "batch_size: 1000 samples a step (1 process(es) x batch_size 1000 x grad_accum 1) from 1 training samples"),
        ("a folder in use", ["--model", "{model}", "--data", "{data}", "--output-dir", "{root}/busy"],
         f"{{root}}/busy: in use by loramoe train (pid {os.getpid()} on {socket.gethostname()}, since "),
    ],
    "eval": [
        ("missing base", ["--base", "{root}/nowhere", *E], "{root}/nowhere: not found"),
        ("missing tasks", ["--base", "{model}", "--tasks", "{root}/no.jsonl", "--out", "{root}/eval"], "{root}/no.jsonl: not found"),
        ("a folder as tasks", ["--base", "{model}", "--tasks", "{root}", "--out", "{root}/eval"], "{root}: is a folder"),
        ("broken tasks", ["--base", "{model}", "--tasks", "{root}/broken.jsonl", "--out", "{root}/eval"],
         "{root}/broken.jsonl:1: malformed JSON"),
        ("adapter without weights", ["--base", "{model}", "--adapter", "{root}/adapter", *E],
         "{root}/adapter: no adapter_model.safetensors"),
        ("into the base model", ["--base", "{model}", "--tasks", "{tasks}", "--out", "{model}"], "{model}: is the folder of --base"),
        ("someone's folder", ["--base", "{model}", "--tasks", "{tasks}", "--out", "{root}/theirs"],
         "{root}/theirs: holds files loramoe did not write"),
        ("lone surrogate", ["--base", "{model}", "--tasks", "{root}/surrogate_tasks.jsonl", "--out", "{root}/eval"],
         "{root}/surrogate_tasks.jsonl:1: holds '\\ud800', a lone UTF-16 surrogate"),
    ],
    "routes": [
        ("missing adapter", ["--base", "{model}", "--adapter", "{root}/nowhere", *E], "{root}/nowhere: not a folder"),
        ("adapter without weights", ["--base", "{model}", "--adapter", "{root}/adapter", *E],
         "{root}/adapter: no adapter_model.safetensors"),
        ("empty base folder", ["--base", "{root}/empty", "--adapter", "{root}/ref", *E], "{root}/empty: the folder has no config.json"),
        ("missing tasks", ["--base", "{model}", "--adapter", "{root}/adapter", "--tasks", "{root}/no.jsonl", "--out",
                           "{root}/r"], "{root}/no.jsonl: not found"),
        ("a plain LoRA adapter", ["--base", "{model}", "--adapter", "{root}/lora", *E],
         "{root}/lora: a LORA adapter, which has no router to profile (expected a LoRAMoE adapter"),
    ],
    "reproduce": [
        ("missing base", ["--base", "{root}/nowhere", "--out", "{root}/repro"], "{root}/nowhere"),
        ("no seeds", ["--seeds", "0", "--out", "{root}/repro"], "--seeds: must be >= 1"),
        ("bad method", ["--methods", "magic"], "argument --methods: invalid choice: 'magic'"),
        ("bad lr grid", ["--lr-grid", "lora=fast", "--out", "{root}/repro"], "'lora=fast': learning rates must be numbers"),
        ("lr grid of no method", ["--lr-grid", "base=1e-3", "--out", "{root}/repro"], "'base=1e-3': expected METHOD=LR"),
        ("infinite lr in the grid", ["--lr-grid", "sft=inf", "--out", "{root}/repro"],
         "'sft=inf': expected finite learning rates > 0"),
        ("infinite --lr-full", ["--lr-full", "inf", "--out", "{root}/repro"],
         "argument --lr-full: 'inf': expected a finite learning rate > 0"),
        ("missing knowledge test", ["--knowledge-test", "{root}/facts.jsonl", "--scales", "1", "--out", "{root}/repro"],
         "{root}/facts.jsonl"),
        ("knowledge test in a sweep", ["--sweep", "rank", "--knowledge-test", "{tasks}", "--out", "{root}/repro"],
         "--knowledge-test: not used by --sweep"),
        ("someone's folder", ["--out", "{root}/theirs"], "{root}/theirs: holds files loramoe did not write"),
    ],
    "serve": [
        ("missing base", ["--base", "{root}/nowhere", "--adapter", "{root}/ref"], "{root}/nowhere: not found"),
        ("adapter without weights", ["--base", "{model}", "--adapter", "{root}/adapter"],
         "{root}/adapter: no adapter_model.safetensors"),
        ("reference adapter not imported", ["--base", "{model}", "--adapter", "{root}/ref"],
         "{root}/ref/adapter_model.safetensors: not found"),
        ("no --adapter", ["--base", "{model}"], "the following arguments are required: --adapter"),
    ],
    "lm-eval": [
        ("missing task file", ["make-task", "{root}/no.jsonl", "--out", "{root}/lm"], "{root}/no.jsonl: not found"),
        ("someone's folder", ["make-task", "{tasks}", "--out", "{root}/theirs"], "{root}/theirs: holds files loramoe did not write"),
        ("no --out", ["make-task", "{tasks}"], "the following arguments are required: --out"),
    ],
}


def test_every_command_has_bad_input_cases():
    assert sorted(CASES) == sorted(cli.COMMANDS), "give every command in loramoe.cli.COMMANDS bad-input CASES here"


@pytest.mark.parametrize("command,argv,named", [(c, a, n) for c, cases in CASES.items() for _, a, n in cases],
                         ids=[f"{c}: {i}" for c, cases in CASES.items() for i, _, _ in cases])  # fmt: skip
def test_bad_input_is_one_line_naming_it_and_exit_2(command, argv, named, paths, capsys):
    code = cli.main([command, *(a.format(**paths) for a in argv)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"loramoe {command}: error: ") and named.format(**paths) in err
    assert "Traceback" not in err and "pickle code ran" not in err and "get_peft_model" not in err  # no Python advice
    assert not os.path.exists(os.path.join(paths["root"], "dst")) and not os.path.exists(os.path.join(paths["model"], "runs"))


def test_a_run_that_stops_or_a_bug_is_one_line_exit_1(monkeypatch, capsys):
    from loramoe import interop

    for error, code, text in [(RunStopped("non-finite loss at step 3"), 1, "error: non-finite loss at step 3"),
                              (OSError(errno.ENOSPC, "No space left on device", "/x/a"), 1, "error: /x/a: No space left"),
                              (RuntimeError("Error while serializing: No space left on device (os error 28)"), 1,
                               "error: Error while serializing: No space left on device"),  # safetensors' words
                              (OSError(errno.EROFS, "Read-only file system", "/x"), 2, "error: /x: Read-only file system"),
                              (KeyError("x"), 1, "error: internal error (KeyError: 'x'); rerun with --debug")]:  # fmt: skip
        def fail(args, error=error):
            raise error

        monkeypatch.setattr(interop, "run", fail)
        assert cli.main(["import-official", "a", "b"]) == code
        err = capsys.readouterr().err
        assert err.startswith(f"loramoe import-official: {text}") and len(err.splitlines()) == 1
    with pytest.raises(KeyError):
        cli.main(["import-official", "a", "b", "--debug"])


# A library that prints at import, every way there is: sitecustomize (on PYTHONPATH) runs before loramoe is imported
# and makes the first import of each of these modules print, as bitsandbytes' `kernels` hook does on some CPUs.
NOISY_IMPORTS = """
import importlib.abc, logging, os, sys, warnings

class Noisy(importlib.abc.MetaPathFinder):
    pending = {"torch", "transformers", "peft", "accelerate"}

    def find_spec(self, name, path=None, target=None):
        if name in self.pending:
            self.pending.discard(name)
            print(f"print at import of {name}", file=sys.stderr)
            logging.getLogger(f"noisy.{name}").warning("logging at import of %s", name)
            warnings.warn(f"warning at import of {name}")
            os.write(2, f"C-level write at import of {name}\\n".encode())
        return None

sys.meta_path.insert(0, Noisy())
"""


@pytest.mark.parametrize("command", sorted(CASES))
def test_from_a_shell_one_line_whatever_libraries_print_at_import(command, paths, tmp_path):
    """The installed extras (bitsandbytes among them) with the Hub offline, plus a library printing at import in
    every way: the failure is still the one line; --debug shows what was held."""
    (tmp_path / "sitecustomize.py").write_text(NOISY_IMPORTS)
    case_argv = [a.format(**paths) for a in CASES[command][0][1]]
    argv = [sys.executable, "-m", "loramoe.cli", command, *case_argv]
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), *filter(None, [os.environ.get("PYTHONPATH")])])}  # fmt: skip
    env.pop("LORAMOE_DEBUG", None)
    plain = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert plain.returncode == 2
    assert plain.stderr.startswith(f"loramoe {command}: error: ") and len(plain.stderr.splitlines()) == 1, plain.stderr
    if command == "train":
        debug = subprocess.run([*argv, "--debug"], env=env, capture_output=True, text=True, timeout=300)
        assert "C-level write at import of torch" in debug.stderr and "logging at import of peft" in debug.stderr


def test_from_a_shell_no_traceback_unless_asked_for(paths):
    argv = [sys.executable, "-m", "loramoe.cli", "train", "--model", f"{paths['root']}/nowhere", "--data", paths["data"],
            "--output-dir", f"{paths['root']}/run"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("LORAMOE_DEBUG", None)
    plain = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert plain.returncode == 2
    assert plain.stderr == f"loramoe train: error: {paths['root']}/nowhere: not found (expected a Hugging Face model " \
                           "folder, a .gguf file or 'smollm2'; nothing is downloaded)\n"
    debug = subprocess.run(argv, env={**env, "LORAMOE_DEBUG": "1"}, capture_output=True, text=True, timeout=300)
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr and "FileNotFoundError" in debug.stderr
