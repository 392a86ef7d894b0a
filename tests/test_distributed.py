"""Multi-process training on CPU (gloo): `torchrun --nproc_per_node 2` with DDP, and with torch FSDP2 (`--fsdp`),
equals one process with the same global batch; both ranks end with identical adapters; only rank 0 writes to the
output directory; a multi-process run resumes exactly from its checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import peft
import pytest
import torch
from safetensors.torch import load_file

from loramoe.train import TrainConfig, checkpoint_dirs, train

# Run by torchrun: trains, then leaves each rank's final trainable tensors and the list of writes it made inside
# the output directory (audited on ranks > 0) in a side directory for the test to compare.
DRIVER = textwrap.dedent('''
    import builtins, io, json, os, shutil, sys
    from pathlib import Path
    import safetensors.torch, torch
    from loramoe.train import TrainConfig, train

    cfg, side = TrainConfig(**json.loads(sys.argv[1])), Path(sys.argv[2])
    rank, out = int(os.environ["RANK"]), str(Path(cfg.output_dir).resolve())
    writes = []

    def audit(fn, name, arg=0, write_mode=None):
        def wrapper(*a, **k):
            target = a[arg] if len(a) > arg else None
            mode = (a[1] if len(a) > 1 else k.get("mode", "r")) if write_mode else "w"
            if target is not None and str(Path(str(target)).resolve()).startswith(out) and set(mode) & set("wax+"):
                writes.append(f"{name} {target}")
            return fn(*a, **k)
        return wrapper

    if rank != 0:
        builtins.open = io.open = audit(io.open, "open", write_mode=True)
        torch.save = audit(torch.save, "torch.save", 1)
        safetensors.torch.save_file = audit(safetensors.torch.save_file, "save_file", 1)
        for name in ("replace", "rename", "mkdir", "makedirs", "remove", "unlink", "rmdir"):
            setattr(os, name, audit(getattr(os, name), "os." + name))
        shutil.rmtree = audit(shutil.rmtree, "rmtree")
    result = train(cfg)
    full = lambda p: p.full_tensor() if hasattr(p, "full_tensor") else p  # FSDP2 shard -> whole (collective)
    state = {n: full(p.detach()).contiguous() for n, p in result.model.named_parameters() if p.requires_grad}
    safetensors.torch.save_file(state, str(side / f"rank{rank}.safetensors"))
    (side / f"writes{rank}.json").write_text(json.dumps(writes))
''')


@pytest.fixture(scope="module")
def short_data(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("data") / "short.jsonl"
    rows = [{"instruction": "Add", "input": f"{i}+{i}", "output": str(2 * i), "task_type": 0} if i % 2 else
            {"instruction": "Capital?", "input": f"land {i}", "output": f"city {i}", "task_type": 1} for i in range(16)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def run_torchrun(tmp_path, cfg: TrainConfig, side_name: str = "side", nproc: int = 2) -> subprocess.CompletedProcess:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    side = tmp_path / side_name
    side.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(driver),
               json.dumps(cfg.to_dict()), str(side)]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def test_ddp_two_processes_equal_one_process_with_the_same_global_batch(tiny_llama_dir, short_data, tmp_path):
    common = dict(model=str(tiny_llama_dir), data=[short_data], num_experts=4, r=2, lora_dropout=0.0, max_seq_len=64,
                  max_steps=3, lr=1e-2, warmup_ratio=0.0, progress=False, seed=0, save_every=2)  # fmt: skip
    ddp_cfg = TrainConfig(output_dir=str(tmp_path / "ddp"), batch_size=2, grad_accum=1, **common)
    proc = run_torchrun(tmp_path, ddp_cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]

    side = tmp_path / "side"
    rank0, rank1 = load_file(str(side / "rank0.safetensors")), load_file(str(side / "rank1.safetensors"))
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)  # DDP kept the replicas identical
    assert json.loads((side / "writes1.json").read_text()) == []  # rank 1 wrote nothing in the output dir
    assert json.loads((side / "writes0.json").read_text()) == []  # (rank 0 is not audited)
    out = tmp_path / "ddp"
    assert (out / "adapter_model.safetensors").exists()
    (ckpt,) = checkpoint_dirs(out)
    assert {p.name for p in ckpt.glob("rng_state_*.pt")} == {"rng_state_0.pt", "rng_state_1.pt"}
    ddp_lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in ddp_lines] == [1, 2, 3]

    # one process, batch 2 x 2 accumulation: the same micro-batches (each with its own LBC), the same global batch
    single = train(TrainConfig(output_dir=str(tmp_path / "single"), batch_size=2, grad_accum=2, **common))
    single_lines = [json.loads(x) for x in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(ddp_lines, single_lines):
        assert a["lm_loss"] == pytest.approx(b["lm_loss"], rel=1e-5)
        assert a["blc_loss"] == pytest.approx(b["blc_loss"], rel=1e-4)
        assert a["tokens"] == b["tokens"]
    reference = {k: v for k, v in single.model.named_parameters() if v.requires_grad}
    assert max((rank0[k] - reference[k].detach()).abs().max().item() for k in rank0) < 1e-5
    # ... and a different global batch gives a visibly different result (the comparison can fail)
    other = train(TrainConfig(output_dir=str(tmp_path / "other"), batch_size=2, grad_accum=1, **common))
    changed = {k: v for k, v in other.model.named_parameters() if v.requires_grad}
    assert max((rank0[k] - changed[k].detach()).abs().max().item() for k in rank0) > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_multi_process_resume_and_fsdp(tiny_llama_dir, short_data, tmp_path, fsdp):
    """Run 4 steps (checkpoint at 2), then resume from that checkpoint: the weights and optimizer state must load
    into the (sharded) model exactly, so steps 3-4 end where the first run ended."""
    cfg = TrainConfig(model=str(tiny_llama_dir), data=[short_data], output_dir=str(tmp_path / "run"), num_experts=4, r=2,
                      lora_dropout=0.1, max_seq_len=64, batch_size=2, max_steps=4, lr=1e-2, warmup_ratio=0.0,
                      progress=False, seed=0, save_every=2, fsdp=fsdp, eval_file=short_data, eval_batch_size=3)  # fmt: skip
    first = run_torchrun(tmp_path, cfg, "first")
    assert first.returncode == 0, first.stderr[-3000:]
    ended = load_file(str(tmp_path / "run" / "adapter_model.safetensors"))
    second = run_torchrun(tmp_path, TrainConfig(**{**cfg.to_dict(), "resume": True}), "second")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stdout and "step 2 of 4" in second.stdout
    resumed = load_file(str(tmp_path / "run" / "adapter_model.safetensors"))
    assert max((ended[k] - resumed[k]).abs().max().item() for k in ended) <= 1e-6
    for side in ("first", "second"):
        assert json.loads((tmp_path / side / "writes1.json").read_text()) == []
        rank0 = load_file(str(tmp_path / side / "rank0.safetensors"))
        rank1 = load_file(str(tmp_path / side / "rank1.safetensors"))
        assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    if fsdp:  # sharded training computes what one process computes with the same global batch
        single = train(TrainConfig(**{**cfg.to_dict(), "output_dir": str(tmp_path / "single"), "fsdp": False,
                                      "grad_accum": 2, "lora_dropout": 0.0}))  # fmt: skip
        no_dropout = run_torchrun(tmp_path, TrainConfig(**{**cfg.to_dict(), "output_dir": str(tmp_path / "fsdp0"),
                                                           "lora_dropout": 0.0}), "third")  # fmt: skip
        assert no_dropout.returncode == 0, no_dropout.stderr[-3000:]
        sharded = load_file(str(tmp_path / "fsdp0" / "adapter_model.safetensors"))
        reference = peft.get_peft_model_state_dict(single.model)
        assert max((sharded[k] - reference[k]).abs().max().item() for k in sharded) < 1e-5
        metrics = json.loads((tmp_path / "fsdp0" / "metrics.jsonl").read_text().splitlines()[-1])
        assert metrics["eval_loss"] == pytest.approx(single.metrics["eval_loss"], rel=1e-5)
