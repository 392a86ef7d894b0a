"""What the vLLM plugin agrees to serve (loramoe.vllm.adapter) and the command `loramoe serve` builds
(loramoe.vllm.serve): adapters as loramoe saves or imports them are accepted; a missing, extra or mis-shaped tensor,
a target outside the FFN, another PEFT method or an unsupported base is refused by name. No vLLM needed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

import loramoe
from conftest import tiny_model
from loramoe import cli
from loramoe.vllm import serve
from loramoe.vllm.adapter import FFN, AdapterPlan, plan_adapter
from test_interop import N as REF_N
from test_interop import R as REF_R
from test_interop import _write_reference_adapter


def _save(model, config, path):
    peft.get_peft_model(model, config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    tiny_model("llama").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def base(llama_dir):
    return AutoConfig.from_pretrained(llama_dir)


@pytest.fixture
def adapter(tmp_path):
    return _save(tiny_model("llama"), loramoe.LoraMoeConfig(num_experts=2, r=2, lora_alpha=8), tmp_path / "adapter")


def _rewrite(adapter, change):
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


def test_a_saved_adapter_is_planned_layer_by_layer(adapter, base):
    plan = plan_adapter(adapter, base)
    assert (plan.num_experts, plan.r, plan.scaling) == (2, 2, 4.0)
    assert plan.targets == {0: FFN, 1: FFN}
    expected = {plan.key(layer, linear, part) for layer in (0, 1) for linear in FFN for part in ("A", "B", "router")}
    assert set(plan.tensors()) == expected


def test_only_the_layers_and_linears_the_config_adapts(tmp_path, base):
    config = loramoe.LoraMoeConfig(num_experts=2, r=2, target_modules=["up_proj", "down_proj"], layers_to_transform=[1])
    plan = plan_adapter(_save(tiny_model("llama"), config, tmp_path / "a"), base)
    assert plan.targets == {1: ("up_proj", "down_proj")}


KEY = AdapterPlan.key


@pytest.mark.parametrize("change,named", [
    (lambda t: t.pop(KEY(1, "down_proj", "router")), f"tensor {KEY(1, 'down_proj', 'router')} is missing"),
    (lambda t: t.update({KEY(0, "q_proj", "A").replace("mlp", "self_attn"): torch.zeros(4, 32)}),
     f"unexpected tensor {KEY(0, 'q_proj', 'A').replace('mlp', 'self_attn')}"),
    (lambda t: t.update({KEY(0, "gate_proj", "A"): torch.zeros(3, 32)}),
     f"tensor {KEY(0, 'gate_proj', 'A')} has shape [3, 32] (expected [4, 32]"),
    (lambda t: t.update({KEY(1, "up_proj", "B"): torch.zeros(4, 48)}),
     f"tensor {KEY(1, 'up_proj', 'B')} has shape [4, 48] (expected [48, 4]"),
], ids=["missing", "extra", "mis-shaped A", "transposed B"])  # fmt: skip
def test_a_tensor_that_does_not_fit_is_named(adapter, base, change, named):
    _rewrite(adapter, change)
    with pytest.raises(ValueError, match="adapter_model.safetensors: ") as e:
        plan_adapter(adapter, base)
    assert named in str(e.value)


def test_an_adapter_for_another_base_is_refused_by_shape(adapter, tiny_llama_dir):
    wider = AutoConfig.from_pretrained(tiny_llama_dir)  # conftest's other tiny Llama: intermediate size 64, not 48
    with pytest.raises(ValueError, match=r"gate_proj.loramoe_B has shape \[48, 4\] \(expected \[64, 4\]"):
        plan_adapter(adapter, wider)


def test_targets_outside_the_ffn_are_refused_by_name(tmp_path, base):
    config = loramoe.LoraMoeConfig(num_experts=2, r=2, target_modules=["q_proj", "gate_proj"])
    with pytest.raises(ValueError, match=r"adapter_config.json: target_modules adapts model.layers.0.self_attn.q_proj "
                                         r"\(and 1 more\), outside the feed-forward block"):  # fmt: skip
        plan_adapter(_save(tiny_model("llama"), config, tmp_path / "a"), base)


def test_modules_trained_whole_are_refused(tmp_path, base):
    config = loramoe.LoraMoeConfig(num_experts=2, r=2, modules_to_save=["lm_head"])
    with pytest.raises(ValueError, match=r"modules_to_save=\['lm_head'\]"):
        plan_adapter(_save(tiny_model("llama"), config, tmp_path / "a"), base)


def test_a_plain_lora_adapter_is_named(tmp_path, base):
    lora = _save(tiny_model("llama"), peft.LoraConfig(r=2, target_modules=["up_proj"]), tmp_path / "lora")
    with pytest.raises(ValueError, match="adapter_config.json: peft_type is 'LORA' \\(expected 'LORAMOE'"):
        plan_adapter(lora, base)


def test_an_unsupported_architecture_is_named(adapter, tmp_path):
    gpt2 = tiny_model("gpt2")
    gpt2.save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match=r"architectures=\['GPT2LMHeadModel'\]: not served .*LlamaForCausalLM"):
        plan_adapter(adapter, AutoConfig.from_pretrained(tmp_path / "gpt2"))


def test_an_adapter_of_the_reference_code_is_served_once_imported(tmp_path, base):
    _write_reference_adapter(tmp_path / "ref")
    with pytest.raises(FileNotFoundError, match="ref/adapter_model.safetensors: not found"):
        plan_adapter(tmp_path / "ref", base)  # its pickled .bin: refused, with the way out
    plan = plan_adapter(loramoe.import_official(tmp_path / "ref", tmp_path / "imported"), base)
    assert (plan.num_experts, plan.r, plan.targets) == (REF_N, REF_R, {0: FFN, 1: FFN})


def test_qwen2_is_served(tmp_path):
    model = tiny_model("qwen2")
    model.save_pretrained(tmp_path / "qwen2")
    adapter = _save(model, loramoe.LoraMoeConfig(num_experts=2, r=2), tmp_path / "a")
    assert plan_adapter(adapter, AutoConfig.from_pretrained(tmp_path / "qwen2")).targets == {0: FFN, 1: FFN}


# ---- loramoe serve ---------------------------------------------------------------------------------------------
def test_serve_command_points_vllm_at_the_plugin_and_the_adapter(adapter, llama_dir):
    argv = serve.serve_command(str(llama_dir), str(adapter), max_model_len=128, vllm_args=["--seed", "1"])
    assert argv[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    options = dict(zip(argv[3::2], argv[4::2]))
    assert json.loads(options["--hf-overrides"]) == {"architectures": ["LoraMoeLlamaForCausalLM"],
                                                     "loramoe_adapter": str(adapter.resolve())}  # fmt: skip
    assert options["--host"] == "127.0.0.1" and options["--max-model-len"] == "128" and options["--seed"] == "1"
    assert options["--served-model-name"] == "adapter"


def test_serve_refuses_a_gguf_base(adapter, tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="model.gguf: a GGUF file"):
        serve.serve_command(str(tmp_path / "model.gguf"), str(adapter))


def _plain_file(d: Path) -> Path:
    (d / "some.txt").write_text("not a model")
    return d / "some.txt"


@pytest.mark.parametrize("make", [lambda d: d / "missing", lambda d: (d / "empty").mkdir() or d / "empty", _plain_file])
def test_serve_names_only_what_it_accepts_for_a_bad_base(adapter, tmp_path, make):
    """A missing base, one without config.json or a plain file: the refusal asks for a folder, never for the GGUF
    file that `loramoe train` accepts but vLLM does not."""
    with pytest.raises((FileNotFoundError, ValueError), match="expected a Hugging Face model folder, which vLLM") as e:
        serve.serve_command(str(make(tmp_path)), str(adapter))
    assert "gguf" not in str(e.value)


def test_serve_without_vllm_is_one_line(adapter, llama_dir, monkeypatch, capsys):
    monkeypatch.setattr(serve.importlib.util, "find_spec", lambda name: None)
    assert cli.main(["serve", "--base", str(llama_dir), "--adapter", str(adapter)]) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("loramoe serve: error: vLLM is not installed"), err


def test_serve_replaces_itself_with_vllms_server(adapter, llama_dir, monkeypatch, capsys):
    monkeypatch.setattr(serve.importlib.util, "find_spec", lambda name: object())
    started = []
    monkeypatch.setattr(serve.os, "execv", lambda path, argv: started.append(argv))
    argv = ["serve", "--base", str(llama_dir), "--adapter", str(adapter), "--port", "8123", "--",
            "--tensor-parallel-size", "2"]  # fmt: skip
    assert cli.main(argv) == 0
    assert started[0][-2:] == ["--tensor-parallel-size", "2"] and "8123" in started[0]
    assert capsys.readouterr().out.startswith("starting: ")
