"""Import of adapters in the reference code's format, checked against the per-expert oracle of conftest."""

from __future__ import annotations

import json
import os
import pickle

import peft
import pytest
import torch
from safetensors.torch import load_file

import loramoe
from conftest import VOCAB, NaiveLoraMoe, tiny_model
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
    assert sorted(p.name for p in dst.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "loramoe-manifest.json"]
    cfg = json.loads((dst / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["num_experts"], cfg["r"], cfg["blc_mode"]) == ("LORAMOE", N, R, "reference")
    assert cfg["blc_count_padding"] is True and cfg["knowledge_experts"] == N // 2

    model = peft.PeftModel.from_pretrained(tiny_model("llama"), dst).eval()
    expected = _oracle_model(experts)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    got = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(got, expected, atol=5e-5, rtol=1e-5)  # summation order: ~1.2e-5 apart on AMD EPYC


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
    with pytest.raises(ValueError, match=r"adapter_model\.bin: refused: the pickle holds objects other than tensors") as info:
        loramoe.import_official(tmp_path / "ref", tmp_path / "out")
    assert "weights_only=False" not in str(info.value)  # torch's own message suggests exactly that
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
    (tmp_path / "src").mkdir()
    with pytest.raises(FileNotFoundError, match="adapter_config.json: not found"):
        loramoe.import_official(tmp_path / "src", tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---- the destination: only files the tool wrote are ever replaced ---------------------------------------------------


def test_import_never_writes_into_its_source_or_over_others_files(tmp_path):
    _write_reference_adapter(tmp_path / "ref")
    source = {p.name: p.read_bytes() for p in (tmp_path / "ref").iterdir()}
    for dst in (tmp_path / "ref", tmp_path / "ref" / "converted"):  # `import-official X X` deleted X's weights
        with pytest.raises(FileExistsError, match=r"the folder of SRC"):
            loramoe.import_official(tmp_path / "ref", dst, overwrite=True)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match=r"theirs: holds files loramoe did not write \(keep\.txt\)"):
        loramoe.import_official(tmp_path / "ref", theirs, overwrite=True)
    assert [p.name for p in theirs.iterdir()] == ["keep.txt"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "ref").iterdir()} == source


def test_an_earlier_import_is_replaced_only_with_overwrite(tmp_path):
    _write_reference_adapter(tmp_path / "a")
    _write_reference_adapter(tmp_path / "b")
    weights = tmp_path / "b" / "adapter_model.bin"
    torch.save({k: 2 * v for k, v in torch.load(weights, weights_only=True).items()}, weights)
    dst = loramoe.import_official(tmp_path / "a", tmp_path / "out")
    first = load_file(dst / "adapter_model.safetensors")
    (dst / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="holds an earlier import"):
        loramoe.import_official(tmp_path / "b", dst)
    assert load_file(dst / "adapter_model.safetensors").keys() == first.keys()
    loramoe.import_official(tmp_path / "b", dst, overwrite=True)
    second = load_file(dst / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.mlp.up_proj.loramoe_A"
    assert torch.equal(second[key], 2 * first[key])
    assert (dst / "notes.txt").read_text() == "mine"


def test_imported_files_respect_the_umask(tmp_path):
    _write_reference_adapter(tmp_path / "ref")
    old = os.umask(0o022)
    try:
        dst = loramoe.import_official(tmp_path / "ref", tmp_path / "out")
    finally:
        os.umask(old)
    assert oct(dst.stat().st_mode & 0o777) == oct(0o755)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        assert oct((dst / name).stat().st_mode & 0o777) == oct(0o644), name


# ---- reference configs as they are found ------------------------------------------------------------------------------


@pytest.mark.parametrize("changes,message", [
    ({"r": None}, r"adapter_config\.json: 'r' is null \(expected an integer"),
    ({"lora_nums": "4"}, r"'lora_nums' is '4' \(expected an integer\)"),
    ({"lora_alpha": None}, r"'lora_alpha' is null \(expected a number"),
])  # fmt: skip
def test_bad_reference_config_values_are_named(tmp_path, changes, message):
    _write_reference_adapter(tmp_path / "ref")
    path = tmp_path / "ref" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    with pytest.raises(ValueError, match=message):
        loramoe.import_official(tmp_path / "ref", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_null_optional_values_take_their_defaults(tmp_path):
    _write_reference_adapter(tmp_path / "ref")
    path = tmp_path / "ref" / "adapter_config.json"
    nulls = {"lora_dropout": None, "blc_alpha": None, "blc_weight": None, "target_modules": None, "modules_to_save": None}
    path.write_text(json.dumps({**json.loads(path.read_text()), **nulls}))
    cfg = json.loads((loramoe.import_official(tmp_path / "ref", tmp_path / "out") / "adapter_config.json").read_text())
    assert (cfg["lora_dropout"], cfg["blc_alpha"], cfg["blc_weight"], cfg["modules_to_save"]) == (0.0, 0.0, 0.0, None)
    assert sorted(cfg["target_modules"]) == ["down_proj", "gate_proj", "up_proj"]


def test_modules_to_save_are_carried_over(tmp_path, batch):
    """A reference run that also trained lm_head whole (PEFT's modules_to_save): the import outputs what the
    per-expert oracle with that lm_head outputs."""
    experts = _write_reference_adapter(tmp_path / "ref")
    weights = tmp_path / "ref" / "adapter_model.bin"
    state = torch.load(weights, weights_only=True)
    torch.manual_seed(5)
    head = 0.05 * torch.randn(VOCAB, 32)
    torch.save({**state, "base_model.model.lm_head.weight": head}, weights)
    with pytest.raises(ValueError, match=r"base_model\.model\.lm_head\.weight: unexpected key .* modules_to_save"):
        loramoe.import_official(tmp_path / "ref", tmp_path / "out")
    path = tmp_path / "ref" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "modules_to_save": ["lm_head"]}))
    dst = loramoe.import_official(tmp_path / "ref", tmp_path / "out")
    assert json.loads((dst / "adapter_config.json").read_text())["modules_to_save"] == ["lm_head"]
    model = peft.PeftModel.from_pretrained(tiny_model("llama"), dst).eval()
    oracle = _oracle_model(experts)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    old_head = oracle(**inputs).logits
    with torch.no_grad():
        oracle.lm_head.weight.copy_(head)
    got = model(**inputs).logits
    torch.testing.assert_close(got, oracle(**inputs).logits, atol=5e-5, rtol=1e-5)
    assert (got - old_head).abs().max() > 0.1  # the imported lm_head is the one in use
