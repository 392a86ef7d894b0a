"""Import of adapters in the reference code's format, checked against the per-expert oracle of conftest."""

from __future__ import annotations

import json
import pickle

import peft
import pytest
import torch
from safetensors.torch import load_file

import loramoe
from conftest import NaiveLoraMoe, tiny_model
from loramoe.cli import main as cli_main

N, R, ALPHA = 4, 2, 8


def _write_reference_adapter(path, seed=0):
    """A directory as the reference code saves it: PEFT-0.3 config + pickled per-expert state dict."""
    torch.manual_seed(seed)
    model = tiny_model("llama")
    state, experts = {}, {}
    for name, module in model.named_modules():
        if name.split(".")[-1] not in ("gate_proj", "up_proj", "down_proj"):
            continue
        A = [torch.randn(R, module.in_features) * 0.3 for _ in range(N)]
        B = [torch.randn(module.out_features, R) * 0.3 for _ in range(N)]
        router = torch.randn(N, module.in_features)
        experts[name] = (A, B, router)
        for i in range(N):
            state[f"base_model.model.{name}.lora_A{i}.weight"] = A[i]
            state[f"base_model.model.{name}.lora_B{i}.weight"] = B[i]
        state[f"base_model.model.{name}.lora_route.weight"] = router
    path.mkdir()
    torch.save(state, path / "adapter_model.bin")
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": R, "lora_alpha": ALPHA, "lora_dropout": 0.05,
              "lora_nums": N, "blc_alpha": 0.1, "blc_weight": 0.1, "base_model_name_or_path": "llama-tiny",
              "target_modules": ["gate_proj", "up_proj", "down_proj"], "bias": "none", "fan_in_fan_out": False}
    (path / "adapter_config.json").write_text(json.dumps(config))
    return experts


def _oracle_model(experts):
    model = tiny_model("llama")
    for name, (A, B, router) in experts.items():
        parent_name, child = name.rsplit(".", 1)
        parent = model.get_submodule(parent_name)
        setattr(parent, child, NaiveLoraMoe(getattr(parent, child), A, B, router, ALPHA / R))
    return model


def test_import_official_matches_per_expert_reference(tmp_path, batch):
    experts = _write_reference_adapter(tmp_path / "ref")
    dst = loramoe.import_official(tmp_path / "ref", tmp_path / "ours")
    assert sorted(p.name for p in dst.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.loads((dst / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["num_experts"], cfg["r"], cfg["blc_mode"]) == ("LORAMOE", N, R, "reference")
    assert cfg["blc_count_padding"] is True and cfg["knowledge_experts"] == N // 2

    model = peft.PeftModel.from_pretrained(tiny_model("llama"), dst).eval()
    expected = _oracle_model(experts)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    got = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_cli_import_official(tmp_path, capsys):
    _write_reference_adapter(tmp_path / "ref")
    assert cli_main(["import-official", str(tmp_path / "ref"), str(tmp_path / "out")]) == 0
    assert "adapter_model.safetensors" in capsys.readouterr().out
    tensors = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert tensors["base_model.model.model.layers.0.mlp.up_proj.loramoe_A"].shape == (N * R, 32)
    assert tensors["base_model.model.model.layers.0.mlp.up_proj.loramoe_B"].shape == (48, N * R)


class _Boom:
    def __reduce__(self):
        return (print, ("pickle code ran",))


def test_pickle_is_read_weights_only(tmp_path, capsys):
    _write_reference_adapter(tmp_path / "ref")
    with open(tmp_path / "ref" / "adapter_model.bin", "wb") as f:
        pickle.dump({"x": _Boom()}, f)
    with pytest.raises(pickle.UnpicklingError):
        loramoe.import_official(tmp_path / "ref", tmp_path / "out")
    assert "pickle code ran" not in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


def test_missing_expert_is_named(tmp_path):
    _write_reference_adapter(tmp_path / "ref")
    state = torch.load(tmp_path / "ref" / "adapter_model.bin", weights_only=True)
    del state["base_model.model.model.layers.1.mlp.down_proj.lora_B3.weight"]
    torch.save(state, tmp_path / "ref" / "adapter_model.bin")
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.down_proj: lora_B experts \[0, 1, 2\]"):
        loramoe.import_official(tmp_path / "ref", tmp_path / "out")


def test_not_a_reference_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        loramoe.import_official(tmp_path, tmp_path / "out")
