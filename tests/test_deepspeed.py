"""DeepSpeed ZeRO-2 / ZeRO-3 (with and without CPU-offloaded Adam) through `loramoe train --deepspeed CONFIG` and
through transformers' Trainer (examples/hf_trainer.py), on CPU: 2 processes, gloo.

Against one process without DeepSpeed, same seed and data (the same global batch as 1 process x 4 accumulation):
the final adapters agree within 1e-5 (ZeRO-2 and ZeRO-3 use torch's AdamW, offload DeepSpeed's CPU Adam: float32
sums in another order); measured figures are in docs/training.md. The LBC is in the loss; a ZeRO-3 adapter
(partitioned, gathered to save) reloads to the same logits; a ZeRO run resumes from its checkpoint to the same
weights. Settings that cannot apply are refused with one line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loramoe.checkpoint import checkpoint_dirs, write_checksums
from loramoe.engines import deepspeed_config, optimizer_groups
from loramoe.loading import load_model
from loramoe.train import TrainConfig, train

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples" / "deepspeed"
TOLERANCE = 1e-5


def shipped(name: str, tmp_path: Path, offload: bool = True) -> str:
    """A shipped config, made to partition the tiny model's parameters under ZeRO-3 (DeepSpeed keeps parameters
    below ``stage3_param_persistence_threshold``, 1e5 elements by default, whole on every rank)."""
    config = json.loads((EXAMPLES / name).read_text())
    if config["zero_optimization"]["stage"] == 3:
        config["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        if not offload:
            del config["zero_optimization"]["offload_optimizer"], config["zero_optimization"]["offload_param"]
    path = tmp_path / f"{Path(name).stem}{'' if offload else '_no_offload'}.json"
    path.write_text(json.dumps(config))
    return str(path)


@pytest.fixture(scope="module")
def ds_data(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("ds") / "data.jsonl"
    rows = [{"instruction": "Capital?" if i % 2 == 0 else "Add", "input": f"land {i}" if i % 2 == 0 else f"{i}+{i}",
             "output": f"city {i}" if i % 2 == 0 else str(2 * i), "task_type": 1 - i % 2} for i in range(16)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def make_cfg(tiny_llama_dir, data: str, out: Path, **overrides) -> TrainConfig:
    """3 steps with warm-up and a cosine decay (the schedule must reach DeepSpeed's optimizer), checkpoint at 2."""
    values = dict(model=str(tiny_llama_dir), data=[data], output_dir=str(out), num_experts=4, r=2, lora_dropout=0.0,
                  max_seq_len=64, batch_size=2, grad_accum=2, max_steps=3, lr=1e-2, warmup_ratio=0.34, progress=False,
                  seed=0, save_every=2)  # fmt: skip
    return TrainConfig(**{**values, **overrides})


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def adapter(out: Path | str) -> dict[str, torch.Tensor]:
    return load_file(str(Path(out) / "adapter_model.safetensors"))


def metrics(out: Path | str) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


# ---- settings that cannot apply are refused --------------------------------------------------------------------


def test_config_takes_the_runs_settings_and_refuses_contradictions(tmp_path, tiny_llama_dir, ds_data):
    cfg = make_cfg(tiny_llama_dir, ds_data, tmp_path / "out", max_grad_norm=0.5, bf16=True)
    filled = deepspeed_config(str(EXAMPLES / "zero2.json"), cfg, world=2)
    assert (filled["train_micro_batch_size_per_gpu"], filled["gradient_accumulation_steps"], filled["train_batch_size"],
            filled["gradient_clipping"], filled["bf16"]["enabled"], filled["fp16"]["enabled"]) == (2, 2, 8, 0.5, True, False)
    cases = {
        "explicit": ({"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": 1},
                     "gradient_accumulation_steps is 1 but --grad-accum gives 2"),
        "optimizer": ({"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW"}}, "'optimizer': loramoe train builds"),
        "stage": ({"zero_optimization": {"stage": 1}}, "zero_optimization.stage is 1 (expected 2 or 3"),
        "fp16": ({"zero_optimization": {"stage": 3}, "fp16": {"enabled": True}}, "fp16.enabled is True"),
    }  # fmt: skip
    for name, (config, message) in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(config))
        with pytest.raises(ValueError) as e:
            deepspeed_config(str(path), cfg, world=2)
        assert str(e.value).startswith(f"{path}: ") and message in str(e.value), name
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"bad.json: not valid JSON"):
        deepspeed_config(str(tmp_path / "bad.json"), cfg, world=2)
    with pytest.raises(FileNotFoundError, match=r"missing.json: --deepspeed config not found"):
        deepspeed_config(str(tmp_path / "missing.json"), cfg, world=2)


def test_requests_that_cannot_apply_are_refused(tmp_path, tiny_llama_dir, ds_data, monkeypatch):
    with pytest.raises(ValueError, match=r"^fsdp: --fsdp and --deepspeed both shard"):
        make_cfg(tiny_llama_dir, ds_data, tmp_path / "a", fsdp=True, deepspeed=str(EXAMPLES / "zero2.json"))
    with pytest.raises(ValueError, match=r"^quantize: 'nf4' with --deepspeed"):
        make_cfg(tiny_llama_dir, ds_data, tmp_path / "b", quantize="nf4", deepspeed=str(EXAMPLES / "zero2.json"))
    with pytest.raises(ValueError, match=r"^dtype: 'bfloat16' with --deepspeed \(expected float32"):
        make_cfg(tiny_llama_dir, ds_data, tmp_path / "b", dtype="bfloat16", deepspeed=str(EXAMPLES / "zero2.json"))
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(ValueError, match=r"^deepspeed: DeepSpeed runs under a launcher"):
        train(make_cfg(tiny_llama_dir, ds_data, tmp_path / "c", deepspeed=str(EXAMPLES / "zero2.json")))
    # accelerate's launcher asking for DeepSpeed (accelerate launch --use_deepspeed) without the flag: the run
    # would otherwise be plain DDP on CPU
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ValueError, match=r"^ACCELERATE_USE_DEEPSPEED: accelerate's launcher asked for DeepSpeed"):
        train(make_cfg(tiny_llama_dir, ds_data, tmp_path / "d"))
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()


# ---- optimizer groups ------------------------------------------------------------------------------------------


def test_no_empty_optimizer_group():
    """DeepSpeed drops an empty group and a scheduler built on the optimizer keeps one group too many (`zip()
    argument 2 is longer than argument 1` at its first step): LoRA(MoE) trains matrices only."""
    matrix, vector = torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(2))
    assert [len(g["params"]) for g in optimizer_groups([matrix], 0.1)] == [1]
    assert [(len(g["params"]), g["weight_decay"]) for g in optimizer_groups([matrix, vector], 0.1)] == [(1, 0.1), (1, 0.0)]


def test_checkpoints_with_the_former_empty_group_still_resume(tiny_llama_dir, ds_data, tmp_path):
    """Checkpoints written before the empty group was dropped hold it in their optimizer state."""
    cfg = make_cfg(tiny_llama_dir, ds_data, tmp_path / "run", max_steps=4)
    ended = train(cfg)
    (ckpt,) = checkpoint_dirs(tmp_path / "run")
    state = torch.load(ckpt / "optimizer.pt", weights_only=True)
    state["param_groups"].append({**state["param_groups"][0], "params": [], "weight_decay": 0.0})
    torch.save(state, ckpt / "optimizer.pt")
    write_checksums(ckpt)
    resumed = train(TrainConfig(**{**cfg.to_dict(), "resume": True}))
    assert resumed.resumed_from == 2
    reference = {n: p.detach() for n, p in ended.model.named_parameters() if p.requires_grad}
    assert max_diff({n: p.detach() for n, p in resumed.model.named_parameters() if p.requires_grad}, reference) == 0.0


# ---- DeepSpeed runs (2 processes, gloo) ------------------------------------------------------------------------

# Run by torchrun: each TrainConfig in turn. "keep": first copy the adapter already in the output folder there (the
# run being resumed); "probe": after the run, the logits of the trained (partitioned) model on a fixed batch go
# there (a collective forward under ZeRO-3).
DRIVER = textwrap.dedent("""
    import json, os, shutil, sys
    from pathlib import Path
    import torch
    from loramoe.train import TrainConfig, train

    for values in json.loads(sys.argv[1]):
        keep, probe = values.pop("keep", None), values.pop("probe", None)
        if keep and int(os.environ["RANK"]) == 0:
            shutil.copy(Path(values["output_dir"]) / "adapter_model.safetensors", keep)
        result = train(TrainConfig(**values))
        if probe:
            with torch.no_grad():
                logits = result.model(input_ids=torch.arange(3, 40).view(1, -1)).logits
            if int(os.environ["RANK"]) == 0:
                torch.save(logits, probe)
""")


def torchrun(tmp_path: Path, script: Path, *args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200, cwd=tmp_path)


def test_zero_stages_through_loramoe_train(tiny_llama_dir, ds_data, tmp_path):
    """ZeRO-2 (examples/deepspeed/zero2.json), ZeRO-3 and ZeRO-3 with CPU-offloaded Adam
    (examples/deepspeed/zero3_offload.json): each run, then resumed from its checkpoint at step 2, in one launch."""
    pytest.importorskip("deepspeed")
    configs = {"zero2": shipped("zero2.json", tmp_path), "zero3": shipped("zero3_offload.json", tmp_path, offload=False),
               "zero3_offload": shipped("zero3_offload.json", tmp_path)}  # fmt: skip
    runs = []
    evaluated = dict(eval_file=ds_data, eval_batch_size=3)  # ZeRO-3: every rank runs the same forwards
    for name, config in configs.items():
        cfg = make_cfg(tiny_llama_dir, ds_data, tmp_path / name, deepspeed=config, **evaluated).to_dict()
        runs += [cfg, {**cfg, "resume": True, "keep": str(tmp_path / f"{name}.first.safetensors"),
                       "probe": str(tmp_path / f"{name}.logits.pt")}]  # fmt: skip
    (tmp_path / "driver.py").write_text(DRIVER)
    proc = torchrun(tmp_path, tmp_path / "driver.py", json.dumps(runs))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("resumed from") == 3 and proc.stdout.count("(step 2 of 3)") == 3

    train(make_cfg(tiny_llama_dir, ds_data, tmp_path / "single", grad_accum=4, **evaluated))
    single_adapter, single_metrics = adapter(tmp_path / "single"), metrics(tmp_path / "single")
    train(make_cfg(tiny_llama_dir, ds_data, tmp_path / "no-lbc", grad_accum=4, blc_weight=0.0))
    for name in configs:
        out, first = tmp_path / name, load_file(str(tmp_path / f"{name}.first.safetensors"))
        assert max_diff(first, single_adapter) < TOLERANCE, name
        assert max_diff(first, adapter(tmp_path / "no-lbc")) > 1e-3, name  # the LBC moved the weights
        for a, b in zip(metrics(out), single_metrics, strict=True):  # the LBC is in the loss, as in one process
            assert a["blc_loss"] > 0 and a["loss"] == pytest.approx(a["lm_loss"] + 0.1 * a["blc_loss"], rel=1e-9), name
            keys = ("lm_loss", "blc_loss", "lr", "grad_norm")  # DeepSpeed's norm: of the same gradient, before clipping
            assert [a[k] for k in keys] == pytest.approx([b[k] for k in keys], rel=1e-5), name
        assert metrics(out)[-1]["eval_loss"] == pytest.approx(single_metrics[-1]["eval_loss"], rel=1e-5), name
        # resumed from checkpoint-2: the same weights (offload: DeepSpeed's CPU Adam re-derives its bias correction)
        assert max_diff(adapter(out), first) <= (1e-6 if "offload" in name else 0.0), name
    # a ZeRO-3 adapter, gathered from its partitions and saved, reloads to the logits of the model that trained it
    ids = torch.arange(3, 40).view(1, -1)
    for name in ("zero3", "zero3_offload"):
        trained = torch.load(tmp_path / f"{name}.logits.pt", weights_only=True)
        with torch.no_grad():
            reloaded = load_model(str(tiny_llama_dir), str(tmp_path / name))(input_ids=ids).logits
        assert torch.equal(reloaded, trained), name


def test_trainer_example_with_the_shipped_zero3_offload_config(tiny_llama_dir, ds_data, tmp_path):
    """examples/hf_trainer.py as docs/training.md runs it: `LoraMoeTrainer` under the shipped
    examples/deepspeed/zero3_offload.json on 2 CPU processes equals the same script in one process without
    DeepSpeed (same global batch), and its adapter (gathered by the Trainer) loads."""
    pytest.importorskip("deepspeed")
    script = REPO / "examples" / "hf_trainer.py"
    common = ["--model", str(tiny_llama_dir), "--data", ds_data, "--max-steps", "3", "--batch-size", "2", "--lr", "1e-2",
              "--num-experts", "4", "--lora-r", "2", "--max-seq-len", "64", "--lora-dropout", "0"]  # fmt: skip
    proc = torchrun(tmp_path, script, *common, "--output-dir", str(tmp_path / "zero3"), "--grad-accum", "2",
                    "--deepspeed", str(EXAMPLES / "zero3_offload.json"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = subprocess.run([sys.executable, str(script), *common, "--output-dir", str(tmp_path / "one"), "--grad-accum", "4"],
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert single.returncode == 0, single.stderr[-3000:]
    assert "'blc_loss'" in proc.stdout
    assert max_diff(adapter(tmp_path / "zero3"), adapter(tmp_path / "one")) < TOLERANCE
    ids = torch.arange(3, 40).view(1, -1)
    with torch.no_grad():
        logits = [load_model(str(tiny_llama_dir), str(tmp_path / out))(input_ids=ids).logits for out in ("zero3", "one")]
    assert torch.allclose(*logits, atol=1e-5)
