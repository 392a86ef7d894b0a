"""The PEFT integration end to end on tiny LLaMA / Qwen2 / GPT-2 models."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from safetensors.torch import load_file

import loramoe
from conftest import tiny_model
from loramoe import LoraMoeConfig

ARCHS = ["llama", "qwen2", "gpt2"]


def _peft(arch="llama", seed=0, **kw):
    kw.setdefault("lora_dropout", 0.0)
    model = peft.get_peft_model(tiny_model(arch), LoraMoeConfig(**kw))
    if not kw.get("init_weights", True):
        return model
    torch.manual_seed(seed)
    with torch.no_grad():  # as after some training: non-zero B so the experts matter
        for _, layer in loramoe.find_tuner(model).loramoe_layers():
            layer.loramoe_B["default"].normal_(0, 0.2)
    return model


@pytest.mark.parametrize("arch", ARCHS)
def test_zero_b_reproduces_base_logits_exactly(arch, batch):
    base_logits = tiny_model(arch)(input_ids=batch["input_ids"]).logits
    model = peft.get_peft_model(tiny_model(arch), LoraMoeConfig())
    assert isinstance(model, peft.PeftModelForCausalLM)
    assert len(loramoe.find_tuner(model).targeted_module_names) == 2 * (3 if arch != "gpt2" else 2)
    torch.testing.assert_close(model(input_ids=batch["input_ids"]).logits, base_logits, atol=0, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_training_changes_only_adapter_parameters(arch, batch):
    model = _peft(arch, init_weights=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all("loramoe_" in n for n, p in model.named_parameters() if p.requires_grad)
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    model.train()
    for _ in range(3):
        opt.zero_grad()
        model(**batch, task_types=torch.tensor([1, 0, 1])).loss.backward()
        opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    adapter_names = {n for n, p in model.named_parameters() if "loramoe_" in n}
    assert changed == adapter_names


def _independent_lbc(model, batch, task_types, count_padding, mode):
    """LBC recomputed outside the library: hook every wrapped layer's input, apply softmax(W_g x) ourselves."""
    inputs = {}
    hooks = [
        layer.register_forward_hook(lambda mod, args, out, name=name: inputs.__setitem__(name, args[0]))
        for name, layer in loramoe.find_tuner(model).loramoe_layers()
    ]
    out = model(**batch, task_types=task_types)
    for h in hooks:
        h.remove()
    cfg = model.peft_config["default"]
    total = 0.0
    for name, layer in loramoe.find_tuner(model).loramoe_layers():
        w = torch.softmax(inputs[name] @ layer.loramoe_router["default"].T, dim=-1)
        m = torch.ones(w.shape[:2]) if count_padding else batch["attention_mask"].float()
        q = (w * m[..., None]).sum(1)  # [M, N]
        n = q.shape[1]
        k = n // 2
        rows = []
        for i, t in enumerate(task_types.tolist()):
            if t < 0:
                continue
            own = 1 + cfg.blc_alpha if mode == "reference" else 1 - cfg.blc_alpha
            other = 1 - cfg.blc_alpha if mode == "reference" else 1 + cfg.blc_alpha
            coeff = [own if (j < k) == (t == 1) else other for j in range(n)]
            rows.append(q[i] * torch.tensor(coeff))
        z = torch.stack(rows).flatten()
        total = total + ((z - z.mean()) ** 2).sum() / (z.numel() - 1) / z.mean() ** 2
    return out, total


@pytest.mark.parametrize("count_padding, mode", [(True, "reference"), (False, "own_group")])
def test_lbc_in_loss_matches_independent_computation(batch, count_padding, mode):
    model = _peft(num_experts=4, blc_weight=0.3, blc_count_padding=count_padding, blc_mode=mode)
    task_types = torch.tensor([1, 0, 1])
    out, expected = _independent_lbc(model, batch, task_types, count_padding, mode)
    lm_only = model(**batch).loss
    torch.testing.assert_close(out.blc_loss, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.lm_loss, lm_only)
    torch.testing.assert_close(out.loss, lm_only + 0.3 * expected, atol=1e-6, rtol=1e-5)


def test_padding_switch_changes_lbc(batch):
    a = _peft(blc_count_padding=False)(**batch, task_types=torch.tensor([1, 0, 1])).blc_loss
    b = _peft(blc_count_padding=True)(**batch, task_types=torch.tensor([1, 0, 1])).blc_loss
    assert not torch.allclose(a, b)


def test_without_task_types_no_lbc(batch):
    model = _peft()
    out = model(**batch)
    assert "blc_loss" not in out
    torch.testing.assert_close(out.loss, model.get_base_model()(**batch).loss)


def test_lbc_gradient_reaches_routers(batch):
    model = _peft(blc_weight=1.0)
    model.train()
    model(**batch, task_types=torch.tensor([1, 0, 1])).blc_loss.backward()
    routers = [layer.loramoe_router["default"] for _, layer in loramoe.find_tuner(model).loramoe_layers()]
    assert all(r.grad is not None and r.grad.abs().sum() > 0 for r in routers)


def _loss_and_grads(model, batch):
    model.zero_grad()
    loss = model(**batch, task_types=torch.tensor([1, 0, -1])).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_gradient_checkpointing_same_loss_and_gradients(arch, batch):
    model = _peft(arch, blc_weight=0.5)
    model.train()
    loss1, grads1 = _loss_and_grads(model, batch)
    model.activation_checkpointing_enable()  # transformers' default: non-reentrant
    assert model.get_base_model().is_activation_checkpointing
    loss2, grads2 = _loss_and_grads(model, batch)
    torch.testing.assert_close(loss1, loss2, atol=1e-5, rtol=1e-5)
    assert grads1.keys() == grads2.keys()
    for name in grads1:
        torch.testing.assert_close(grads1[name], grads2[name], atol=1e-5, rtol=1e-5)


def test_reentrant_checkpointing_is_refused_not_silently_wrong(batch):
    model = _peft()
    model.train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    model.enable_input_require_grads()
    with pytest.raises(RuntimeError, match="use_reentrant"):
        model(**batch, task_types=torch.tensor([1, 0, 1]))


def test_save_load_round_trip(tmp_path, batch):
    model = _peft(num_experts=3, r=2, knowledge_experts=1, blc_mode="reference")
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert tensors and all(".loramoe_" in k for k in tensors)  # adapter tensors only
    assert not (tmp_path / "adapter_model.bin").exists()
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORAMOE" and cfg["num_experts"] == 3 and cfg["blc_mode"] == "reference"

    loaded = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path)
    assert isinstance(loaded.peft_config["default"], LoraMoeConfig)
    assert loaded.peft_config["default"].knowledge_experts == 1
    torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, atol=0, rtol=0)


def test_load_onto_other_dimensions_fails_clearly(tmp_path):
    _peft().save_pretrained(tmp_path)
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(ValueError, match="shape mismatch"):
        peft.PeftModel.from_pretrained(other, tmp_path)


def test_load_onto_deeper_model_fails_on_missing_keys(tmp_path):
    _peft().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="missing from the file"):
        peft.PeftModel.from_pretrained(tiny_model("llama", layers=3), tmp_path)


def test_wrong_targets_list_existing_modules():
    with pytest.raises(ValueError, match=r"matches no nn.Linear.*gate_proj"):
        peft.get_peft_model(tiny_model("llama"), LoraMoeConfig(target_modules=["ffn_up"]))


@pytest.mark.parametrize(
    "kwargs, key",
    [({"num_experts": 2, "knowledge_experts": 3}, "knowledge_experts"), ({"r": 0}, "r"),
     ({"num_experts": 0}, "num_experts"), ({"blc_mode": "up"}, "blc_mode"), ({"lora_dropout": 1.5}, "lora_dropout")],
)
def test_invalid_config_names_the_key(kwargs, key):
    with pytest.raises(ValueError, match=f"LoraMoeConfig.{key}="):
        LoraMoeConfig(**kwargs)


@pytest.mark.parametrize(
    "task_types, message",
    [(torch.tensor([1, 0]), "2 entries but the batch has 3"), (torch.tensor([1, 2, 0]), "got \\[2\\]"),
     (torch.tensor([[1, 0, 1]]), "shape \\[batch\\]"), (torch.tensor([1.0, 0.0, 1.0]), "integer")],
)
def test_bad_task_types(batch, task_types, message):
    with pytest.raises(ValueError, match=message):
        _peft()(**batch, task_types=task_types)


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_with_kv_cache_matches_full_recompute(arch):
    model = _peft(arch).eval()
    prompt = torch.tensor([[5, 9, 13, 2, 7]])
    cached = model.generate(input_ids=prompt, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
    uncached = model.generate(input_ids=prompt, max_new_tokens=8, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)
    base = tiny_model(arch).generate(input_ids=prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert not torch.equal(cached, base)  # the experts do act during generation


def test_disable_adapter_gives_exact_base_outputs(batch):
    model = _peft()
    base_logits = tiny_model("llama")(**batch).logits
    with model.disable_adapter():
        out = model(**batch, task_types=torch.tensor([1, 0, 1]))
        torch.testing.assert_close(out.logits, base_logits, atol=0, rtol=0)
    assert not torch.allclose(model(**batch).logits, base_logits)


def test_eval_train_modes_toggle_dropout(batch):
    model = _peft(lora_dropout=0.3)
    model.eval()
    a, b = model(**batch).logits, model(**batch).logits
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    model.train()
    assert not torch.allclose(model(**batch).logits, model(**batch).logits)


def test_bf16_autocast_forward_backward(batch):
    model = _peft()
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**batch, task_types=torch.tensor([1, 0, 1]))
    out.loss.backward()
    ref = _peft()(**batch, task_types=torch.tensor([1, 0, 1]))
    assert abs(out.loss.item() - ref.loss.item()) < 0.05 * ref.loss.item()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_routing_capture_records_masked_shares(batch):
    model = _peft(num_experts=4)
    assert all(layer._capture_sink is None for _, layer in loramoe.find_tuner(model).loramoe_layers())
    with loramoe.capture_routing(model) as rec:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert all(layer._capture_sink is None for _, layer in loramoe.find_tuner(model).loramoe_layers())
    name = "model.layers.1.mlp.down_proj"
    w = rec.weights[name][0]
    assert w.shape == (3, 9, 4)
    torch.testing.assert_close(w.sum(-1), torch.ones(3, 9))
    per_sample = rec.sample_shares()[name]
    torch.testing.assert_close(per_sample[1], w[1, :6].mean(0))  # padding left out
    overall = rec.expert_shares()[name]
    torch.testing.assert_close(overall, w[batch["attention_mask"].bool()].mean(0))
    torch.testing.assert_close(overall.sum(), torch.tensor(1.0))
