"""`loramoe train`: outputs, loss bookkeeping, LBC reaching the loss (our loop and transformers.Trainer), methods,
checkpoints, kill-and-resume equality, non-finite loss handling, config from YAML + flags."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import peft
import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file

import loramoe
from loramoe import cli
from loramoe.data import InstructionCollator, load_instruction_data
from loramoe.loading import load_base_model, load_model, load_tokenizer
from loramoe.train import (
    NonFiniteLossError,
    TrainConfig,
    checkpoint_dirs,
    config_from_args,
    configure_parser,
    train,
)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def short_data(tmp_path_factory) -> str:
    """16 short samples (<= ~30 byte tokens), alternating knowledge (1) and downstream (0)."""
    path = tmp_path_factory.mktemp("data") / "short.jsonl"
    rows = []
    for i in range(16):
        if i % 2:
            rows.append({"instruction": "Add", "input": f"{i}+{i}", "output": str(2 * i), "task_type": 0})
        else:
            rows.append({"instruction": "Capital?", "input": f"land {i}", "output": f"city {i}", "task_type": 1})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def make_cfg(tiny_llama_dir, data, out, **overrides) -> TrainConfig:
    values = dict(model=str(tiny_llama_dir), data=[data], output_dir=str(out), num_experts=4, r=2, lora_dropout=0.0,
                  max_seq_len=64, batch_size=4, max_steps=3, lr=1e-2, warmup_ratio=0.0, progress=False, seed=0)
    return TrainConfig(**{**values, **overrides})


def routers(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "loramoe_router" in n}


def adapter_tensors(out_dir) -> dict[str, torch.Tensor]:
    return load_file(str(Path(out_dir) / "adapter_model.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


# ---- outputs and bookkeeping -----------------------------------------------------------------------------------


def test_cli_run_writes_adapter_metrics_and_shows_progress(tiny_llama_dir, short_data, tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(["train", "--model", str(tiny_llama_dir), "--data", short_data, "--output-dir", str(out),
                     "--num-experts", "4", "--r", "2", "--max-steps", "3", "--batch-size", "4", "--max-seq-len", "64",
                     "--eval-file", short_data, "--eval-every", "2", "--lr", "1e-2"])  # fmt: skip
    assert code == 0
    err = capsys.readouterr().err
    assert "loramoe train (loramoe)" in err and "lm=" in err and "lbc=" in err and "tok_s=" in err  # tqdm bar
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3]
    assert {"lm_loss", "blc_loss", "loss", "lr", "grad_norm", "tokens_per_s", "epoch"} <= lines[0].keys()
    assert "eval_loss" in lines[1] and "eval_loss" in lines[2] and "eval_loss" not in lines[0]
    for x in lines:
        assert x["loss"] == pytest.approx(x["lm_loss"] + 0.1 * x["blc_loss"])
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORAMOE" and config["num_experts"] == 4
    assert (out / "adapter_model.safetensors").exists() and (out / "tokenizer.json").exists()
    assert yaml.safe_load((out / "train_config.yaml").read_text())["num_experts"] == 4
    # the saved adapter loads back through loramoe.loading with exactly the saved (trained) tensors
    reloaded = peft.get_peft_model_state_dict(load_model(str(tiny_llama_dir), str(out)))
    saved = adapter_tensors(out)
    assert max_diff(reloaded, saved) == 0.0
    assert all(t.abs().sum() > 0 for k, t in saved.items() if "loramoe_B" in k)  # B left zero init: it trained


def test_first_step_loss_matches_an_independent_computation(tiny_llama_dir, short_data, tmp_path, byte_tokenizer):
    """Step 1 starts from B = 0 (outputs = base model), so its LM loss is the base model's token-mean CE on the
    documented batch: the first 4 indices of torch.randperm(n, seed) (one process, no accumulation)."""
    result = train(make_cfg(tiny_llama_dir, short_data, tmp_path / "r", max_steps=1))
    first = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[0])
    data = load_instruction_data(short_data, byte_tokenizer, max_seq_len=64)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:4].tolist()
    base = load_base_model(str(tiny_llama_dir))
    ce, count = 0.0, 0
    with torch.no_grad():
        for i in order:
            s = data.samples[i]
            logits = base(input_ids=torch.tensor([s.input_ids])).logits[0, :-1]
            target = torch.tensor(s.labels[1:])
            ce += F.cross_entropy(logits, target, ignore_index=-100, reduction="sum").item()
            count += int((target != -100).sum())
    assert first["lm_loss"] == pytest.approx(ce / count, rel=1e-5)
    assert result.steps == 1 and result.trainable_params == 2 * (2 * (8 * 32 + 64 * 8 + 4 * 32) + (8 * 64 + 32 * 8 + 4 * 64))  # A, B, router
    assert first["tokens"] > 0 and result.tokens_per_s > 0


def test_lbc_reaches_the_loss_in_our_loop(tiny_llama_dir, short_data, tmp_path):
    """With B = 0 the LM loss does not depend on the routers at step 1, so only the LBC can move them."""
    cfg = dict(max_steps=1, max_grad_norm=0.0)
    no_lbc = train(make_cfg(tiny_llama_dir, short_data, tmp_path / "a", blc_weight=0.0, **cfg))
    with_lbc = train(make_cfg(tiny_llama_dir, short_data, tmp_path / "b", blc_weight=0.1, **cfg))
    untouched = train(make_cfg(tiny_llama_dir, short_data, tmp_path / "c", blc_weight=0.1, **{**cfg, "lr": 1e-12}))
    init = routers(untouched.model)
    assert max_diff(routers(no_lbc.model), init) == 0.0
    assert max_diff(routers(with_lbc.model), init) > 1e-3
    assert with_lbc.metrics["blc_loss"] > 0


def test_accumulation_equals_the_big_batch(tiny_llama_dir, short_data, tmp_path):
    """LM loss is normalised by the step's target tokens, so 2 x 2 accumulated = 1 x 4 (LBC off: it is per
    micro-batch by definition)."""
    big = train(make_cfg(tiny_llama_dir, short_data, tmp_path / "a", blc_weight=0.0, max_steps=2))
    acc = train(make_cfg(tiny_llama_dir, short_data, tmp_path / "b", blc_weight=0.0, max_steps=2, batch_size=2, grad_accum=2))
    assert max_diff(adapter_tensors(tmp_path / "a"), adapter_tensors(tmp_path / "b")) < 1e-6
    assert big.metrics["lm_loss"] == pytest.approx(acc.metrics["lm_loss"], rel=1e-6)


def test_eval_loss_is_the_token_mean_ce_of_the_final_model(tiny_llama_dir, short_data, tmp_path, byte_tokenizer):
    result = train(make_cfg(tiny_llama_dir, short_data, tmp_path / "e", eval_file=short_data, eval_batch_size=3))
    data = load_instruction_data(short_data, byte_tokenizer, max_seq_len=64)
    model = result.model.eval()
    ce, count = 0.0, 0
    with torch.no_grad():
        for s in data.samples:
            logits = model(input_ids=torch.tensor([s.input_ids])).logits[0, :-1]
            target = torch.tensor(s.labels[1:])
            ce += F.cross_entropy(logits, target, ignore_index=-100, reduction="sum").item()
            count += int((target != -100).sum())
    assert result.metrics["eval_loss"] == pytest.approx(ce / count, rel=1e-5)


# ---- other methods ---------------------------------------------------------------------------------------------


def test_lora_method_has_total_rank_n_r_on_the_same_modules(tiny_llama_dir, short_data, tmp_path):
    result = train(make_cfg(tiny_llama_dir, short_data, tmp_path / "l", method="lora", max_steps=2))
    config = json.loads((tmp_path / "l" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 32
    assert sorted(config["target_modules"]) == ["down_proj", "gate_proj", "up_proj"]
    # per layer: gate/up (32 -> 64) and down (64 -> 32), each r*(in + out)
    assert result.trainable_params == 2 * 3 * 8 * (32 + 64)
    assert "blc_loss" not in result.metrics


def test_full_method_saves_the_whole_model(tiny_llama_dir, short_data, tmp_path):
    result = train(make_cfg(tiny_llama_dir, short_data, tmp_path / "f", method="full", max_steps=2, lr=1e-3))
    assert result.trainable_params == result.total_params
    reloaded = load_base_model(str(tmp_path / "f"))
    original = load_base_model(str(tiny_llama_dir))
    w = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(reloaded.state_dict()[w], result.model.state_dict()[w])
    assert not torch.equal(reloaded.state_dict()[w], original.state_dict()[w])


# ---- transformers.Trainer ----------------------------------------------------------------------------------------


def test_loramoe_trains_under_transformers_trainer_with_lbc(tiny_llama_dir, short_data, tmp_path):
    from transformers import Trainer, TrainingArguments

    tok = load_tokenizer(str(tiny_llama_dir))
    data = load_instruction_data(short_data, tok, max_seq_len=64)

    def one_step(blc_weight: float, name: str):
        torch.manual_seed(0)
        model = peft.get_peft_model(load_base_model(str(tiny_llama_dir)), loramoe.LoraMoeConfig(
            num_experts=4, r=2, lora_dropout=0.0, blc_weight=blc_weight))
        before = routers(model)
        args = TrainingArguments(output_dir=str(tmp_path / name), per_device_train_batch_size=4, max_steps=1,
                                 learning_rate=1e-2, remove_unused_columns=False, label_names=["labels"],
                                 report_to=[], save_strategy="no", use_cpu=True, max_grad_norm=0.0,
                                 disable_tqdm=True)  # fmt: skip
        trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=InstructionCollator(tok.pad_token_id))
        trainer.train()
        return max_diff(routers(model), before), trainer

    moved_without, _ = one_step(0.0, "a")
    moved_with, trainer = one_step(0.1, "b")
    assert moved_without == 0.0  # B = 0: the LM loss alone gives the routers no gradient at step 1
    assert moved_with > 1e-3  # so the task types went through the collator and the LBC reached Trainer's loss
    assert trainer.state.global_step == 1


# ---- checkpoints, resume, failures ---------------------------------------------------------------------------------


def test_checkpoints_are_rotated_and_complete(tiny_llama_dir, short_data, tmp_path):
    out = tmp_path / "c"
    train(make_cfg(tiny_llama_dir, short_data, out, max_steps=5, save_every=1, keep_last=2))
    dirs = checkpoint_dirs(out)
    assert [d.name for d in dirs] == ["checkpoint-3", "checkpoint-4"]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp")]
    files = {p.name for p in dirs[-1].iterdir()}
    assert {"trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng_state_0.pt", "trainer_state.json", "adapter"} <= files
    assert json.loads((dirs[-1] / "trainer_state.json").read_text())["step"] == 4
    # an existing run is never overwritten by accident, and a changed setting refuses to resume
    with pytest.raises(FileExistsError, match="--resume"):
        train(make_cfg(tiny_llama_dir, short_data, out, max_steps=5))
    with pytest.raises(ValueError, match="settings changed.*seed"):
        train(make_cfg(tiny_llama_dir, short_data, out, max_steps=5, resume=True, seed=1))


DRIVER = textwrap.dedent("""
    import json, sys, time
    from loramoe.loading import load_base_model
    from loramoe.train import TrainConfig, train
    cfg = TrainConfig(**json.loads(sys.argv[1]))
    model = load_base_model(cfg.model)
    delay = float(sys.argv[2])
    if delay:
        model.register_forward_pre_hook(lambda *args: time.sleep(delay))
    train(cfg, model=model)
""")


def test_killed_run_resumes_to_the_same_weights(tiny_llama_dir, short_data, tmp_path):
    """SIGKILL a training process after its step-4 checkpoint, resume, and end where an uninterrupted run ends
    (dropout on, so the RNG state must be restored too; 12 steps x 4 samples cross epoch boundaries)."""
    settings = dict(max_steps=12, save_every=4, keep_last=3, lora_dropout=0.1, lr=5e-3)
    out = tmp_path / "killed"
    cfg = make_cfg(tiny_llama_dir, short_data, out, **settings).to_dict()
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, str(driver), json.dumps(cfg), "0.1"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.time() + 120
    while not (out / "checkpoints" / "checkpoint-4").exists():
        assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
        assert time.time() < deadline, "no checkpoint written"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "adapter_model.safetensors").exists()  # it really was interrupted

    resumed = train(make_cfg(tiny_llama_dir, short_data, out, resume=True, **settings))
    assert resumed.resumed_from == 4 and resumed.steps == 12
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 13))  # lines the killed run wrote after step 4 were dropped

    uninterrupted = train(make_cfg(tiny_llama_dir, short_data, tmp_path / "ref", **settings))
    assert uninterrupted.resumed_from is None
    assert max_diff(adapter_tensors(out), adapter_tensors(tmp_path / "ref")) <= 1e-6
    # and the run did learn something: the final weights differ from the step-4 checkpoint
    step4 = load_file(str(checkpoint_dirs(out)[0] / "adapter" / "adapter_model.safetensors"))
    assert max_diff(adapter_tensors(out), step4) > 1e-4


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_llama_dir, short_data, tmp_path):
    out = tmp_path / "nan"
    model = load_base_model(str(tiny_llama_dir))
    calls = []

    def poison(module, args, output):  # the 5th forward (step 5) returns a NaN LM loss
        calls.append(1)
        if len(calls) == 5:
            output.loss = output.loss * float("nan")
        return output

    model.register_forward_hook(poison)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 5.*last good checkpoint: .*checkpoint-4"):
        train(make_cfg(tiny_llama_dir, short_data, out, max_steps=8, save_every=2), model=model)
    assert [d.name for d in checkpoint_dirs(out)] == ["checkpoint-2", "checkpoint-4"]
    good = load_file(str(checkpoint_dirs(out)[-1] / "trainable.safetensors"))
    assert all(torch.isfinite(t).all() for t in good.values())
    assert not (out / "adapter_model.safetensors").exists()
    events = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "non_finite_loss" and events[-1]["step"] == 5
    # resuming from the good checkpoint works (the poison is gone)
    result = train(make_cfg(tiny_llama_dir, short_data, out, max_steps=8, save_every=2, resume=True))
    assert result.resumed_from == 4 and all(torch.isfinite(t).all() for t in adapter_tensors(out).values())


# ---- configuration ---------------------------------------------------------------------------------------------


def test_yaml_config_with_cli_overrides(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"model": "m", "data": ["a.jsonl", {"path": "b.jsonl", "weight": 2}],
                                      "num_experts": 8, "lr": 1e-3, "task_type_names": {"cbqa": 1}}))
    import argparse

    parser = argparse.ArgumentParser()
    configure_parser(parser)
    args = parser.parse_args(["--config", str(config), "--lr", "5e-4", "--no-progress", "--task-type-names", "nli=0",
                              "--data", "c.jsonl:0.5"])  # fmt: skip
    cfg = config_from_args(args)
    assert (cfg.model, cfg.num_experts, cfg.lr, cfg.progress) == ("m", 8, 5e-4, False)
    assert cfg.data == ["c.jsonl:0.5"] and cfg.task_type_names == {"nli": 0}
    config.write_text("num_expert: 3\n")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['num_expert'\]"):
        TrainConfig.from_yaml(config)
    with pytest.raises(ValueError, match="TrainConfig.method='adapter' is invalid"):
        TrainConfig(method="adapter")


def test_cli_reports_bad_data_with_file_and_line(tiny_llama_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b", "task_type": 1}\n{"instruction": "a", "task_type": 1}\n')
    code = cli.main(["train", "--model", str(tiny_llama_dir), "--data", str(bad), "--output-dir", str(tmp_path / "o")])
    assert code == 1
    assert f"{bad}:2: missing field 'output'" in capsys.readouterr().err


# ---- a real model --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_short_loramoe_run_on_smollm2(tmp_path):
    """5 LoRAMoE steps on SmolLM2-135M-Instruct (the `smollm2` GGUF shorthand) with the bundled example data."""
    from loramoe.loading import smollm2_gguf_path

    try:
        smollm2_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    out = tmp_path / "smollm2"
    data = REPO / "examples" / "data" / "tiny_instructions.jsonl"
    result = train(TrainConfig(model="smollm2", data=[str(data)], output_dir=str(out), max_steps=5, batch_size=4,
                               max_seq_len=64, lr=1e-3, warmup_ratio=0.0, progress=False, seed=0))  # fmt: skip
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4, 5]
    assert all(0 < x["lm_loss"] < 20 and x["blc_loss"] > 0 for x in lines)
    # 30 layers x (gate, up: 576 -> 1536; down: 1536 -> 576), 6 experts of rank 4 plus a router each
    per_layer = 2 * (24 * 576 + 1536 * 24 + 6 * 576) + (24 * 1536 + 576 * 24 + 6 * 1536)
    assert result.trainable_params == 30 * per_layer
    reloaded = load_model("smollm2", str(out))
    tok = load_tokenizer("smollm2")
    ids = tok("What is the capital of France?", return_tensors="pt").input_ids
    with torch.no_grad():
        new = reloaded.generate(ids, max_new_tokens=4, do_sample=False)
    assert ids.shape[1] < new.shape[1] <= ids.shape[1] + 4  # generate() needs no task types


def test_gradient_checkpointing_and_bf16_keep_the_gradient(tiny_llama_dir, short_data, tmp_path):
    """Non-reentrant checkpointing recomputes the same graph, LBC included (the reference code's reentrant
    checkpointing lost it); bf16 autocast trains to nearly the fp32 result."""
    plain = train(make_cfg(tiny_llama_dir, short_data, tmp_path / "a", max_steps=2))
    checkpointed = train(make_cfg(tiny_llama_dir, short_data, tmp_path / "b", max_steps=2, gradient_checkpointing=True))
    assert max_diff(adapter_tensors(tmp_path / "a"), adapter_tensors(tmp_path / "b")) < 1e-6
    assert checkpointed.metrics["blc_loss"] == pytest.approx(plain.metrics["blc_loss"], rel=1e-5)
    assert any(getattr(m, "gradient_checkpointing", False) for m in checkpointed.model.modules())
    assert not any(getattr(m, "gradient_checkpointing", False) for m in plain.model.modules())
    train(make_cfg(tiny_llama_dir, short_data, tmp_path / "c", max_steps=2, bf16=True))
    first = [json.loads((tmp_path / d / "metrics.jsonl").read_text().splitlines()[0]) for d in ("a", "c")]
    assert first[1]["lm_loss"] == pytest.approx(first[0]["lm_loss"], rel=2e-2)  # same batch, same start
    assert first[1]["lm_loss"] != first[0]["lm_loss"]  # ... computed in bf16
    assert all(torch.isfinite(t).all() for t in adapter_tensors(tmp_path / "c").values())


def test_saving_an_adapter_never_asks_the_hub(tiny_llama_dir, short_data, tmp_path, monkeypatch):
    """A base recorded by a Hub id (here a made-up one): PEFT's "auto" embedding check would query the Hub."""

    def no_network(*args, **kwargs):
        raise AssertionError("save_pretrained asked the Hub whether the base has a config.json")

    monkeypatch.setattr(peft.utils.save_and_load, "check_file_exists_on_hf_hub", no_network)
    cfg = make_cfg(tiny_llama_dir, short_data, tmp_path / "r", max_steps=2, save_every=1)
    cfg.model = "some-org/not-a-local-dir"
    result = train(cfg, model=load_base_model(tiny_llama_dir), tokenizer=load_tokenizer(tiny_llama_dir))
    saved = json.loads((result.output_dir / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == "some-org/not-a-local-dir"
