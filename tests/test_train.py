"""`loramoe train`: outputs, loss bookkeeping, LBC reaching the loss (our loop and transformers.Trainer), methods,
checkpoints, kill-and-resume equality, non-finite loss handling, config from YAML + flags."""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import shutil
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
from loramoe.data import DataError, InstructionCollator, load_instruction_data
from loramoe.loading import load_base_model, load_model, load_tokenizer
from loramoe.outputs import OutputDir
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
    assert {"trainable.safetensors", "optimizer.pt", "rng_state_0.pt", "trainer_state.json", "checksums.json", "adapter"} <= files
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
    # step 5 ran with checkpoint-4's weights and gave a NaN: checkpoint-4 is not known good, checkpoint-2 is (step 3)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 5.*last known-good checkpoint: \S*checkpoint-2 "):
        train(make_cfg(tiny_llama_dir, short_data, out, max_steps=8, save_every=2), model=model)
    assert [d.name for d in checkpoint_dirs(out)] == ["checkpoint-2", "checkpoint-4"]
    good = load_file(str(checkpoint_dirs(out)[0] / "trainable.safetensors"))
    assert all(torch.isfinite(t).all() for t in good.values())
    assert not (out / "adapter_model.safetensors").exists()
    events = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "non_finite_loss" and events[-1]["step"] == 5
    # resuming from the good checkpoint works (the poison is gone)
    result = train(make_cfg(tiny_llama_dir, short_data, out, max_steps=8, save_every=2, resume=True))
    assert result.resumed_from == 2 and all(torch.isfinite(t).all() for t in adapter_tensors(out).values())


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


def test_yaml_values_are_read_as_users_write_them_and_a_wrong_one_names_file_and_key(tmp_path):
    """PyYAML (YAML 1.1) reads `lr: 5e-3` as the string '5e-3': the README writes every lr that way."""
    config = tmp_path / "c.yaml"
    config.write_text("lr: 5e-3\nblc_weight: 1E-1\nepochs: 2\nmax_steps: 3\ndata: [{path: a.jsonl, weight: 5e-1}]\n")
    cfg = TrainConfig.from_yaml(config)
    assert (cfg.lr, cfg.blc_weight, cfg.epochs, cfg.max_steps, cfg.data[0]["weight"]) == (5e-3, 0.1, 2, 3, 0.5)
    assert TrainConfig.from_yaml(REPO / "examples" / "train_tiny.yaml").lr == 5e-3  # the shipped example writes so
    for text, message in [
        ("lr: fast\n", f"{config}: lr: 'fast' is a string (expected a number such as 5e-3)"),
        ('max_steps: "2"\n', f"{config}: max_steps: '2' is a string (expected an integer or null; write it without quotes)"),
        ("lr: -1e-3\n", f"{config}: lr: -0.001 is invalid (expected a finite number > 0)"),
        ("bf16: 1\n", f"{config}: bf16: 1 is invalid (expected true or false)"),
        ("target_modules: up_proj\n", f"{config}: target_modules: 'up_proj' is a string (expected a list or null)"),
        ("lr: [1e-3\nr: 2\n", f"{config}:2: not valid YAML (expected ',' or ']', but got ':'; expected a mapping"),
    ]:  # fmt: skip
        config.write_text(text)
        with pytest.raises(ValueError) as info:
            TrainConfig.from_yaml(config)
        assert str(info.value).startswith(message), str(info.value)
    config.write_text("lr: fast\n")
    assert TrainConfig.from_yaml(config, lr=1e-3).lr == 1e-3  # a flag given over the file's value replaces it
    with pytest.raises(ValueError, match=r"^TrainConfig\.lr=inf is invalid: expected a finite number > 0"):
        TrainConfig(lr=float("inf"))


def test_cli_reports_bad_data_with_file_and_line(tiny_llama_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b", "task_type": 1}\n{"instruction": "a", "task_type": 1}\n')
    code = cli.main(["train", "--model", str(tiny_llama_dir), "--data", str(bad), "--output-dir", str(tmp_path / "o")])
    assert code == 2
    assert capsys.readouterr().err == f"loramoe train: error: {bad}:2: missing field 'output' (a record needs 'instruction', 'output' and 'task_type')\n"


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


# ---- data order and logged numbers that no other test pins down ---------------------------------------------------


def test_sample_stream_draws_a_new_permutation_each_epoch():
    """The stream is one torch.randperm per epoch, seeded seed + epoch (the module docstring's data order)."""
    from loramoe.train import SampleStream

    stream = SampleStream(10, seed=3)
    expected = [torch.randperm(10, generator=torch.Generator().manual_seed(3 + epoch)).tolist() for epoch in range(3)]
    assert expected[0] != expected[1] != expected[2]
    assert [stream[i] for i in range(30)] == expected[0] + expected[1] + expected[2]


def test_logged_blc_loss_is_the_mean_over_accumulated_micro_batches(tiny_llama_dir, short_data, tmp_path, byte_tokenizer):
    """One step of 2 micro-batches x 2 samples (the first 4 indices of torch.randperm(16, seed 0)): the logged LBC
    is the mean of the two micro-batches' LBC, computed here on the (1e-12-lr, so unchanged) model."""
    result = train(make_cfg(tiny_llama_dir, short_data, tmp_path / "r", max_steps=1, batch_size=2, grad_accum=2,
                            lr=1e-12))  # fmt: skip
    logged = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[0])["blc_loss"]
    data = load_instruction_data(short_data, byte_tokenizer, max_seq_len=64)
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:4].tolist()
    collate = InstructionCollator(byte_tokenizer.pad_token_id)
    with torch.no_grad():
        per_micro = [result.model(**collate([data[i] for i in order[k : k + 2]])).blc_loss.item() for k in (0, 2)]
    assert per_micro[0] != pytest.approx(per_micro[1], rel=1e-3)
    assert logged == pytest.approx((per_micro[0] + per_micro[1]) / 2, rel=1e-5)


# ---- resume: changed settings, known-good and corrupt checkpoints, finished runs -------------------------------------


def cosine(t: int, total: int) -> float:
    """transformers' cosine schedule without warm-up, at scheduler step t (the lr optimizer step t + 1 uses)."""
    return 0.5 * (1 + math.cos(math.pi * t / total))


@pytest.fixture
def lr_spy(monkeypatch) -> list[float]:
    """The lr of the first parameter group at every AdamW step, as the optimizer applies it (leaving out the
    lr-0 step torch's set_optimizer_state_dict takes to create the state it then loads)."""
    lrs: list[float] = []
    original = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        if self.param_groups[0]["lr"] != 0.0:
            lrs.append(self.param_groups[0]["lr"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    return lrs


def test_resume_applies_a_changed_lr_from_the_resume_step(tiny_llama_dir, short_data, tmp_path, lr_spy, capsys):
    out = tmp_path / "lr"
    train(make_cfg(tiny_llama_dir, short_data, out, max_steps=6, save_every=3, lr=1e-2))
    result = train(make_cfg(tiny_llama_dir, short_data, out, max_steps=6, save_every=3, lr=1e-3, resume=True))
    assert result.resumed_from == 3
    expected = [1e-2 * cosine(t, 6) for t in range(6)] + [1e-3 * cosine(t, 6) for t in range(3, 6)]
    assert lr_spy == pytest.approx(expected, rel=1e-9)
    assert "resume: settings changed since checkpoint-3, applied from step 4: lr 0.01 -> 0.001" in capsys.readouterr().out
    events = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events] == [1, 2, 3, 3, 4, 5, 6]
    assert events[3] == {"step": 3, "event": "resume", "checkpoint": str(checkpoint_dirs(out)[-1]), "changed": {"lr": [0.01, 0.001]}}
    assert yaml.safe_load((out / "train_config.yaml").read_text())["lr"] == 1e-3  # the config it now runs with
    # settings that fix what a step means are refused, each one listed
    with pytest.raises(ValueError, match=r"cannot resume: settings changed .*: r 2 -> 4, seed 0 -> 1 \(expected"):
        train(make_cfg(tiny_llama_dir, short_data, out, max_steps=6, resume=True, seed=1, r=4))


@pytest.fixture
def decay_spy(monkeypatch) -> list[tuple[float, float]]:
    """(weight decay of the matrices' group, of the vectors' group) at every AdamW step that applies an lr."""
    decays: list[tuple[float, float]] = []
    original = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        if self.param_groups[0]["lr"] != 0.0:
            decays.append(tuple(g["weight_decay"] for g in self.param_groups))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    return decays


def test_resume_applies_a_changed_weight_decay_from_the_resume_step(tiny_llama_dir, short_data, tmp_path, decay_spy):
    """Like the lr: the loaded optimizer state brings the saved weight decay; the one given now must apply from the
    resume step on (to the matrices; vectors never decay)."""
    out, settings = tmp_path / "wd", dict(max_steps=4, save_every=2, weight_decay=0.5)
    train(make_cfg(tiny_llama_dir, short_data, out, **settings))
    result = train(make_cfg(tiny_llama_dir, short_data, out, **{**settings, "weight_decay": 0.25}, resume=True))
    assert result.resumed_from == 2
    assert decay_spy == [(0.5,)] * 4 + [(0.25,)] * 2  # LoRAMoE trains matrices only: one (decaying) group
    events = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert events[2]["event"] == "resume" and events[2]["changed"] == {"weight_decay": [0.5, 0.25]}


def test_the_non_finite_loss_advice_followed_literally_works(tiny_llama_dir, short_data, tmp_path, lr_spy, capsys):
    """A NaN at step 5; then the same command with a lower --lr and --resume, as the message says."""
    out = tmp_path / "nan"
    flags = ["train", "--model", str(tiny_llama_dir), "--data", short_data, "--output-dir", str(out), "--num-experts",
             "4", "--r", "2", "--lora-dropout", "0", "--max-seq-len", "64", "--batch-size", "4", "--max-steps", "8",
             "--warmup-ratio", "0", "--seed", "0", "--save-every", "2", "--no-progress"]  # fmt: skip
    model = load_base_model(str(tiny_llama_dir))
    calls = []

    def poison(module, args, output):
        calls.append(1)
        if len(calls) == 5:
            output.loss = output.loss * float("nan")
        return output

    model.register_forward_hook(poison)
    cfg = config_from_args(_parse(flags[1:] + ["--lr", "1e-2"]))
    with pytest.raises(NonFiniteLossError) as info:
        train(cfg, model=model)
    assert "Lower --lr, check the data or --bf16, then --resume" in str(info.value)
    assert cli.main(flags + ["--lr", "1e-3", "--resume"]) == 0  # from checkpoint-2 (step 5 rejected checkpoint-4)
    assert lr_spy == pytest.approx([1e-2 * cosine(t, 8) for t in range(4)] + [1e-3 * cosine(t, 8) for t in range(2, 8)])
    assert "applied from step 3: lr 0.01 -> 0.001" in capsys.readouterr().out
    assert all(torch.isfinite(t).all() for t in adapter_tensors(out).values())


def test_after_a_divergence_that_reaches_the_weights_the_advice_finishes(tiny_llama_dir, short_data, tmp_path, capsys):
    """A healthy run with a checkpoint every step, then the same run resumed with --lr 1e10: one step of that
    wrecks the weights (its own loss, computed before the update, is still fine) and a later loss is NaN. The
    checkpoint named known good must hold weights that were seen to give an in-line loss, not the wrecked ones
    written after that step: the advised command (the same, with a lower --lr, and --resume) then finishes."""
    out = tmp_path / "diverged"
    flags = ["train", "--model", str(tiny_llama_dir), "--data", short_data, "--output-dir", str(out), "--num-experts",
             "4", "--r", "2", "--lora-dropout", "0", "--max-seq-len", "64", "--batch-size", "4", "--warmup-ratio", "0",
             "--seed", "0", "--save-every", "1", "--max-steps", "12", "--no-progress"]  # fmt: skip
    assert cli.main([*flags, "--max-steps", "6", "--lr", "1e-2"]) == 0
    healthy = max(t.abs().max().item() for t in adapter_tensors(out).values())
    capsys.readouterr()
    assert cli.main([*flags, "--lr", "1e10", "--resume"]) == 1
    err = capsys.readouterr().err
    assert "non-finite loss" in err and "Lower --lr, check the data or --bf16, then --resume" in err
    named = Path(re.search(r"last known-good checkpoint: (\S+) ", err).group(1))
    weights = load_file(str(named / "trainable.safetensors"))
    assert max(t.abs().max().item() for t in weights.values()) < 10 * healthy  # not the wrecked weights
    assert cli.main([*flags, "--lr", "1e-2", "--resume"]) == 0, capsys.readouterr().err
    assert f"resumed from {named} " in capsys.readouterr().out
    assert all(torch.isfinite(t).all() for t in adapter_tensors(out).values())
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in steps if "lm_loss" in x][-1] == 12


def _parse(argv: list[str]):
    import argparse

    parser = argparse.ArgumentParser()
    configure_parser(parser)
    return parser.parse_args(argv)


def test_a_checkpoint_whose_weights_gave_a_jumped_loss_is_not_known_good(tiny_llama_dir, short_data, tmp_path):
    """Steps 7 and 8 have a finite loss x1000, step 9 a NaN. Step 7 ran with checkpoint-6's weights, step 9 with
    checkpoint-8's: neither is known good. The run names checkpoint-4 (step 5 was in line), keeps it despite
    keep_last=1, and --resume continues from it."""
    out = tmp_path / "jump"
    model = load_base_model(str(tiny_llama_dir))
    calls = []

    def poison(module, args, output):
        calls.append(1)
        if len(calls) in (7, 8):
            output.loss = output.loss * 1000.0
        if len(calls) == 9:
            output.loss = output.loss * float("nan")
        return output

    model.register_forward_hook(poison)
    settings = dict(max_steps=12, save_every=2, keep_last=1)
    with pytest.raises(NonFiniteLossError, match=r"step 9.*last known-good checkpoint: \S*checkpoint-4 "):
        train(make_cfg(tiny_llama_dir, short_data, out, **settings), model=model)
    assert [d.name for d in checkpoint_dirs(out)] == ["checkpoint-4", "checkpoint-8"]
    confirmed = [json.loads((d / "confirmed.json").read_text()) if (d / "confirmed.json").exists() else None
                 for d in checkpoint_dirs(out)]  # fmt: skip
    assert [c and c["step"] for c in confirmed] == [5, None]
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x.get("unstable")] == [7, 8]
    assert confirmed[0]["lm_loss"] == next(x["lm_loss"] for x in lines if x.get("step") == 5)
    result = train(make_cfg(tiny_llama_dir, short_data, out, **settings, resume=True))
    assert result.resumed_from == 4
    assert (out / "checkpoints" / "set-aside" / "checkpoint-8.unstable" / "trainable.safetensors").is_file()


@pytest.mark.parametrize("legacy", [False, True], ids=["checksum", "no-checksums-file"])
def test_a_corrupt_newest_checkpoint_falls_back_to_the_older_intact_one(tiny_llama_dir, short_data, tmp_path, capsys, legacy):
    out = tmp_path / "corrupt"
    settings = dict(max_steps=6, save_every=2, keep_last=2)
    train(make_cfg(tiny_llama_dir, short_data, out, **settings))
    finished = adapter_tensors(out)
    newest = checkpoint_dirs(out)[-1]
    assert newest.name == "checkpoint-4"
    weights = newest / "trainable.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a write cut short
    if legacy:  # a checkpoint from before checksums: judged by whether it loads
        (newest / "checksums.json").unlink()
    capsys.readouterr()
    result = train(make_cfg(tiny_llama_dir, short_data, out, **settings, resume=True))
    assert result.resumed_from == 2
    printed = capsys.readouterr().out
    assert f"warning: checkpoint {newest} is corrupt ({newest if legacy else weights}" in printed
    assert "falling back to the next older one" in printed
    assert (out / "checkpoints" / "set-aside" / "checkpoint-4.corrupt").is_dir()
    assert max_diff(adapter_tensors(out), finished) <= 1e-6  # step 2 onwards is the same run again


def test_a_checkpoint_set_aside_twice_under_the_same_name_falls_back_again(tiny_llama_dir, short_data, tmp_path, capsys):
    """Corrupt checkpoint-4, resume (it goes to set-aside/checkpoint-4.corrupt), train past step 4 again (a new
    checkpoint-4), corrupt that one too and resume again: it is set aside under the same name, replacing the
    first, and the run falls back to checkpoint-2 again."""
    out, settings = tmp_path / "twice", dict(max_steps=5, save_every=2, keep_last=2)
    train(make_cfg(tiny_llama_dir, short_data, out, **settings))
    finished = adapter_tensors(out)
    set_aside = out / "checkpoints" / "set-aside" / "checkpoint-4.corrupt"
    for attempt in range(2):
        weights = out / "checkpoints" / "checkpoint-4" / "trainable.safetensors"
        weights.write_bytes(weights.read_bytes()[:100] + bytes([attempt]) * (weights.stat().st_size - 100))
        corrupt = weights.read_bytes()
        result = train(make_cfg(tiny_llama_dir, short_data, out, **settings, resume=True))
        assert result.resumed_from == 2, attempt
        assert (set_aside / "trainable.safetensors").read_bytes() == corrupt  # the latest one set aside
        assert [d.name for d in checkpoint_dirs(out)] == ["checkpoint-2", "checkpoint-4"]
        assert max_diff(adapter_tensors(out), finished) <= 1e-6
    assert sorted(p.name for p in set_aside.parent.iterdir()) == ["checkpoint-4.corrupt"]


def test_a_checkpoint_written_by_an_older_version_resumes_and_says_what_it_cannot_check(tiny_llama_dir, short_data,
                                                                                         tmp_path, capsys):  # fmt: skip
    """trainer_state.json as the first loramoe wrote it: no config, stability record or known-good flag, and
    invariants without those added since. It resumes to the same weights (no KeyError), naming what it could not
    check."""
    from loramoe.checkpoint import write_checksums

    out, settings = tmp_path / "old", dict(max_steps=4, save_every=2)
    train(make_cfg(tiny_llama_dir, short_data, out, **settings))
    finished = adapter_tensors(out)
    (checkpoint,) = checkpoint_dirs(out)
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    first = ("method", "data", "seed", "max_seq_len", "grad_accum", "num_experts", "r", "knowledge_experts",
             "target_modules", "global_micro_batch")  # the invariants of the first version (f92a310)
    old = {"step": 2, "total_steps": 4, "tokens_seen": state["tokens_seen"],
           "invariants": {k: state["invariants"][k] for k in first}}  # fmt: skip
    (checkpoint / "trainer_state.json").write_text(json.dumps(old))
    write_checksums(checkpoint)
    capsys.readouterr()
    result = train(make_cfg(tiny_llama_dir, short_data, out, **settings, resume=True))
    assert result.resumed_from == 2 and max_diff(adapter_tensors(out), finished) <= 1e-6
    assert (f"warning: {checkpoint} does not record bnb_compute_dtype, data_fingerprint, data_split, lora_alpha, "
            "quantize (written by an older loramoe), so they were not checked") in capsys.readouterr().out


def test_resuming_with_max_steps_equal_to_the_checkpoints_step_is_refused_naming_it(tiny_llama_dir, short_data,
                                                                                     tmp_path):  # fmt: skip
    """checkpoint-4 of a 6-step run, resumed with --max-steps 4: nothing is left to train; refused in one line (the
    checkpoint's adapter/ holds that step). One step more resumes from it."""
    out = tmp_path / "equal"
    train(make_cfg(tiny_llama_dir, short_data, out, max_steps=6, save_every=2))
    with pytest.raises(ValueError, match=r"^max_steps: the run would end at step 4, but \S*checkpoint-4 is at step 4 "
                                         r"\(expected more steps than the checkpoint's"):  # fmt: skip
        train(make_cfg(tiny_llama_dir, short_data, out, max_steps=4, save_every=2, resume=True))
    assert train(make_cfg(tiny_llama_dir, short_data, out, max_steps=5, save_every=2, resume=True)).resumed_from == 4


def test_resume_on_a_finished_run_without_checkpoints_is_refused(tiny_llama_dir, short_data, tmp_path):
    out = tmp_path / "done"
    train(make_cfg(tiny_llama_dir, short_data, out, max_steps=2))
    finished = adapter_tensors(out)
    with pytest.raises(FileExistsError, match="finished and kept no checkpoint"):
        train(make_cfg(tiny_llama_dir, short_data, out, max_steps=2, resume=True))
    assert max_diff(adapter_tensors(out), finished) == 0.0


# ---- the output folder: only loramoe's files are ever replaced ----------------------------------------------------


def test_the_base_model_folder_is_never_an_output_folder(tiny_llama_dir, short_data, tmp_path):
    weights = Path(tiny_llama_dir) / "model.safetensors"
    before = weights.read_bytes()
    for out in (tiny_llama_dir, Path(tiny_llama_dir) / "runs"):
        with pytest.raises(FileExistsError, match=r"the folder of --model"):
            train(make_cfg(tiny_llama_dir, short_data, out, method="full", overwrite=True, max_steps=1))
    assert weights.read_bytes() == before and not (Path(tiny_llama_dir) / "runs").exists()


def test_overwrite_replaces_only_what_loramoe_wrote(tiny_llama_dir, short_data, tmp_path):
    foreign = tmp_path / "theirs"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"theirs: holds files loramoe did not write \(notes\.txt\)"):
        train(make_cfg(tiny_llama_dir, short_data, foreign, overwrite=True))
    assert sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]

    out = tmp_path / "ours"
    train(make_cfg(tiny_llama_dir, short_data, out, max_steps=1, save_every=1))
    (out / "notes.txt").write_text("mine")  # put beside the run afterwards
    train(make_cfg(tiny_llama_dir, short_data, out, max_steps=2, overwrite=True))
    assert (out / "notes.txt").read_text() == "mine"
    assert not checkpoint_dirs(out)  # the earlier run's checkpoints went with it
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    # a new output that would replace a file loramoe did not write is refused; the trained files are kept aside
    other = OutputDir(tmp_path / "other", "--out").create().path  # e.g. a folder `loramoe eval` wrote
    (other / "README.md").write_text("their readme")
    with pytest.raises(FileExistsError, match=r"README\.md: exists and was not written by loramoe"):
        train(make_cfg(tiny_llama_dir, short_data, other, max_steps=2))
    assert (other / "README.md").read_text() == "their readme"
    assert (other / ".loramoe-staging" / "adapter_model.safetensors").is_file()


def test_overwrite_keeps_an_evaluation_written_into_the_run_folder(tiny_llama_dir, short_data, tmp_path, capsys):
    """`eval --out <a training run>` then `train --overwrite` there: the training run is replaced, the
    evaluation (another command's outputs) is kept, and the run says so."""
    out, tasks = tmp_path / "run", tmp_path / "tasks.jsonl"
    tasks.write_text(json.dumps({"type": "generate", "prompt": "1+1=", "answers": ["2"]}) + "\n")
    train(make_cfg(tiny_llama_dir, short_data, out, max_steps=1))
    assert cli.main(["eval", "--base", str(tiny_llama_dir), "--adapter", str(out), "--tasks", str(tasks), "--out",
                     str(out), "--max-new-tokens", "2", "--no-progress"]) == 0  # fmt: skip
    evaluation = (out / "eval.json").read_text()
    capsys.readouterr()
    train(make_cfg(tiny_llama_dir, short_data, out, max_steps=2, overwrite=True))
    assert (out / "eval.json").read_text() == evaluation and (out / "predictions.jsonl").is_file()
    assert "--overwrite: kept eval.json (written by loramoe eval)" in capsys.readouterr().out
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_a_second_run_into_a_folder_in_use_fails_at_once_naming_the_first(tiny_llama_dir, short_data, tmp_path, capsys):
    """Two `train` runs into one folder: the second fails before it loads anything, naming the first's pid and
    host; the first runs on alone (each step once in metrics.jsonl)."""
    import socket

    out = tmp_path / "busy"
    cfg = make_cfg(tiny_llama_dir, short_data, out, max_steps=4, save_every=2)
    first = subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(cfg.to_dict()), "0.5"], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        deadline = time.time() + 240
        while not (out / "metrics.jsonl").exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert first.poll() is None, first.stdout.read()
        for resume in (False, True):
            code = cli.main(["train", "--model", str(tiny_llama_dir), "--data", short_data, "--output-dir", str(out),
                             "--max-steps", "4"] + (["--resume"] if resume else []))  # fmt: skip
            err = capsys.readouterr().err
            assert code == 2 and len(err.splitlines()) == 1, err
            assert err.startswith(f"loramoe train: error: {out}: in use by loramoe train (pid {first.pid} on "
                                  f"{socket.gethostname()}, since ")  # fmt: skip
        assert first.wait(timeout=300) == 0, first.stdout.read()
    finally:
        first.kill()
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    train(make_cfg(tiny_llama_dir, short_data, out, max_steps=5, save_every=2, resume=True))  # released at its end


def test_the_logged_lr_is_the_one_each_step_applied(tiny_llama_dir, short_data, tmp_path, lr_spy):
    out = tmp_path / "lr"
    result = train(make_cfg(tiny_llama_dir, short_data, out, max_steps=4, lr=1e-2))
    logged = [json.loads(x)["lr"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert lr_spy == pytest.approx([1e-2 * cosine(t, 4) for t in range(4)])  # the last step's is not 0
    assert logged == lr_spy and result.metrics["lr"] == lr_spy[-1]
    assert json.loads((out / "train_result.json").read_text())["metrics"]["lr"] == lr_spy[-1]


def test_a_step_larger_than_the_data_is_refused_for_epochs_and_warned_for_steps(tiny_llama_dir, short_data, tmp_path,
                                                                                  capsys):  # fmt: skip
    """16 samples, batch 40, one epoch asked: one step would be 2.5 epochs. Asked for 2 steps: trained, warned."""
    with pytest.raises(ValueError, match=r"^batch_size: 40 samples a step .* from 16 training samples: each step sees "
                                         r"every sample about 2.5 times, so the run would be 2.5 epochs, not the 1 "
                                         r"asked for"):  # fmt: skip
        train(make_cfg(tiny_llama_dir, short_data, tmp_path / "epochs", batch_size=40, max_steps=None, epochs=1.0))
    assert not (tmp_path / "epochs").exists()
    result = train(make_cfg(tiny_llama_dir, short_data, tmp_path / "steps", batch_size=40, max_steps=2))
    assert result.steps == 2 and "warning: batch_size: 40 samples a step" in capsys.readouterr().out


def _disk_full_at(monkeypatch, method: str, hit) -> None:
    """Make ``Path.<method>`` (write_bytes / write_text) fail as a full disk does for the paths ``hit`` picks:
    half the data written, then ENOSPC without a file name."""
    original = getattr(Path, method)

    def write(self, data, *args, **kwargs):
        if not hit(self):
            return original(self, data, *args, **kwargs)
        original(self, data[: len(data) // 2], *args, **kwargs)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, method, write)


def test_a_full_disk_names_the_file_leaves_nothing_half_written_and_resumes(tiny_llama_dir, short_data, tmp_path,
                                                                           monkeypatch, capsys):  # fmt: skip
    """ENOSPC (simulated at Python's writes; `test_a_real_full_disk_...` uses a real one) while checkpoint-3 is
    written, then while --resume rewrites metrics.jsonl: one line naming the file, exit 1, no half-written
    checkpoint and no .tmp left; with space again the resume ends where an uninterrupted run ends."""
    settings = dict(max_steps=4, save_every=1, keep_last=5)
    train(make_cfg(tiny_llama_dir, short_data, tmp_path / "whole", **settings))
    out = tmp_path / "full"
    argv = ["train", "--model", str(tiny_llama_dir), "--data", short_data, "--output-dir", str(out), "--num-experts",
            "4", "--r", "2", "--lora-dropout", "0", "--max-seq-len", "64", "--batch-size", "4", "--max-steps", "4",
            "--lr", "1e-2", "--warmup-ratio", "0", "--seed", "0", "--save-every", "1", "--keep-last", "5", "--no-progress"]
    with monkeypatch.context() as patch:
        _disk_full_at(patch, "write_bytes", lambda p: p.name == "optimizer.pt" and p.parent.name == ".tmp-checkpoint-3")
        assert cli.main(argv) == 1
    err = capsys.readouterr().err.splitlines()[-1]  # after transformers' "Loading weights" bar
    assert err == (f"loramoe train: error: {out}/checkpoints/.tmp-checkpoint-3/optimizer.pt: no space left on the "
                   "device (free some space, then run the same command with --resume: it continues from the newest "
                   "checkpoint)")  # fmt: skip
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-1", "checkpoint-2"]
    with monkeypatch.context() as patch:
        _disk_full_at(patch, "write_text", lambda p: p.name == "metrics.jsonl.tmp")
        assert cli.main([*argv, "--resume"]) == 1
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith(f"loramoe train: error: {out}/metrics.jsonl.tmp: no space left on the device")
    assert not list(out.glob("*.tmp"))
    assert cli.main([*argv, "--resume"]) == 0
    assert max_diff(adapter_tensors(out), adapter_tensors(tmp_path / "whole")) <= 1e-6


def test_a_real_full_disk_and_a_read_only_folder(tiny_llama_dir, short_data, tmp_path, capsys):
    """The same on a 1 MB tmpfs (mounting one needs root: skipped elsewhere), then the folder made read-only."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)],
                                           capture_output=True).returncode:  # fmt: skip
        pytest.skip("needs root to mount a tmpfs")
    try:
        out = disk / "run"
        argv = ["train", "--model", str(tiny_llama_dir), "--data", short_data, "--output-dir", str(out), "--num-experts",
                "4", "--r", "2", "--max-seq-len", "64", "--batch-size", "4", "--max-steps", "10", "--save-every", "1",
                "--keep-last", "10", "--no-progress"]  # fmt: skip
        assert cli.main(argv) == 1  # 10 checkpoints (164 kB each) do not fit
        err = capsys.readouterr().err.splitlines()[-1]
        assert re.fullmatch(rf"loramoe train: error: {out}/checkpoints/\.tmp-checkpoint-\d+/\S+: no space left on the "
                            r"device \(free some space, .*\)", err), err  # fmt: skip
        assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".tmp")]
        with contextlib.suppress(OSError), open(disk / "filler", "wb", buffering=0) as f:  # now nothing is left
            while True:
                f.write(b"\0" * 4096)
        assert cli.main([*argv, "--resume"]) == 1
        err = capsys.readouterr().err.splitlines()[-1]
        assert err.startswith(f"loramoe train: error: {out}/") and "no space left on the device" in err, err
        assert not list(out.glob("*.tmp"))
        (disk / "filler").unlink()
        for old in checkpoint_dirs(out)[:-1]:
            shutil.rmtree(old)
        assert cli.main([*argv, "--keep-last", "1", "--resume"]) == 0, capsys.readouterr().err
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        assert cli.main([*argv, "--max-steps", "12", "--resume"]) == 2
        assert capsys.readouterr().err.splitlines()[-1] == (f"loramoe train: error: {out}: Read-only file system "
                                                            "(expected a folder that can be written, for --output-dir)")
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_outputs_respect_the_umask(tiny_llama_dir, short_data, tmp_path):
    old = os.umask(0o022)
    try:
        train(make_cfg(tiny_llama_dir, short_data, tmp_path / "u", max_steps=2, save_every=1))
    finally:
        os.umask(old)
    out = tmp_path / "u"
    for path in [out / "adapter_model.safetensors", out / "adapter_config.json",
                 checkpoint_dirs(out)[-1] / "trainable.safetensors"]:  # fmt: skip
        assert oct(path.stat().st_mode & 0o777) == oct(0o644), path
    assert oct(checkpoint_dirs(out)[-1].stat().st_mode & 0o777) == oct(0o755)


# ---- nothing dropped or ignored without a word ------------------------------------------------------------------


def test_records_skipped_from_the_eval_file_are_reported(tiny_llama_dir, short_data, tmp_path, capsys):
    bad_eval = tmp_path / "eval.jsonl"
    bad_eval.write_text(Path(short_data).read_text() + '{"instruction": "a", "task_type": 1}\n')
    out = tmp_path / "e"
    train(make_cfg(tiny_llama_dir, short_data, out, max_steps=1, eval_file=str(bad_eval), skip_bad=True))
    assert "eval data: 16 samples from 17 records in 1 file(s)" in capsys.readouterr().out
    report = json.loads((out / "data_report.json").read_text())
    assert report["eval"]["files"][0]["skipped"] == [f"{bad_eval}:17: missing field 'output' (a record needs "
                                                     "'instruction', 'output' and 'task_type')"]  # fmt: skip
    assert report["eval"]["task_types"]["knowledge"]["skipped"] == 1  # its task type was readable
    assert report["files"][0]["skipped"] == []


def test_a_task_type_name_no_record_uses_is_refused(tiny_llama_dir, short_data, tmp_path):
    with pytest.raises(ValueError, match=r"task_type_names: \['cbqa'\] name\(s\) no record's task_type"):
        train(make_cfg(tiny_llama_dir, short_data, tmp_path / "n", task_type_names={"cbqa": 1}))
    with pytest.raises(ValueError, match="'0' is not a name"):
        make_cfg(tiny_llama_dir, short_data, tmp_path / "n", task_type_names={"0": 1})


# ---- the reference code's data ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference_data(tmp_path_factory) -> tuple[Path, Path]:
    """Two files shaped like the reference code's training data: JSON lists (indent 4) of {"instruction",
    "input", "output", "task_type"}: reading-comprehension instructions with passages of up to ~8.6k characters
    and the question last (downstream), and short closed-book questions (knowledge)."""
    import random

    rng = random.Random(0)
    words = ["the", "river", "city", "museum", "was", "built", "by", "a", "king", "in", "year", "of", "stone",
             "bridge", "north", "old", "market", "their", "people", "trade", "route", "harbour", "tower"]
    downstream = []
    for i in range(24):
        passage = " ".join(rng.choice(words) for _ in range(rng.choice([30, 150, 400, 900, 1500])))
        downstream.append({"instruction": f"Read the passage, then answer the question.\nPassage: {passage}\n"
                                          f"Question: which tower is number {i}?",
                           "input": "" if i % 3 else f"(answer in two words, record {i})",
                           "output": f"tower {i}", "task_type": 0})  # fmt: skip
    knowledge = [{"instruction": f"What is the capital of land {i}?", "input": "", "output": f"city {i}", "task_type": 1}
                 for i in range(8)]  # fmt: skip
    root = tmp_path_factory.mktemp("reference_data")
    for name, records in (("downstream.json", downstream), ("knowledge.json", knowledge)):
        (root / name).write_text(json.dumps(records, indent=4))
    return root / "downstream.json", root / "knowledge.json"


def test_the_reference_codes_data_trains_under_default_flags(tiny_llama_dir, reference_data, tmp_path, capsys):
    downstream, knowledge = reference_data
    records = json.loads(downstream.read_text())
    # byte tokenizer, no BOS: prompt (+ "\n" + input) + EOS, output + EOS; more than 1024 tokens must be cut
    sizes = [len((r["instruction"] + ("\n" + r["input"] if r["input"] else "")).encode()) + len(r["output"].encode()) + 2
             for r in records]  # fmt: skip
    too_long = [i for i, n in enumerate(sizes) if n > 1024]
    assert max(len(r["instruction"]) for r in records) > 8000 and 0 < len(too_long) < len(records)
    out = tmp_path / "ref"
    train(TrainConfig(model=str(tiny_llama_dir), data=[str(downstream), str(knowledge)], output_dir=str(out),
                      max_steps=2, progress=False))  # fmt: skip
    report = json.loads((out / "data_report.json").read_text())
    per_file = [f["task_types"] for f in report["files"]]
    assert per_file[0] == {"downstream": {"records": 24, "valid": 24, "used": 24, "skipped": 0,
                                          "prompt_cut": len(too_long), "truncated": 0}}  # fmt: skip
    assert per_file[1]["knowledge"]["prompt_cut"] == 0 and per_file[1]["knowledge"]["used"] == 8
    assert report["files"][0]["prompt_tokens_cut"] == sum(sizes[i] - 1024 for i in too_long)
    assert f"{len(too_long)} prompts cut in the middle" in capsys.readouterr().out
    # the strict behaviour stops at the first over-long record (a JSON list written with indent 4: 6 lines each)
    first = too_long[0]
    with pytest.raises(DataError, match=rf"downstream\.json:{2 + 6 * first} \(record {first + 1}\): the response is truncated"):
        load_instruction_data(downstream, load_tokenizer(str(tiny_llama_dir)), max_seq_len=1024, fit_prompt=False)
