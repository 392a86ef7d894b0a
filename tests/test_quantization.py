"""LoRAMoE on bitsandbytes-quantized bases (NF4 / int8, Llama and GPT-2), against independent references: the
quantized base layer's own output plus SPEC.md's per-expert loop, the quantized base model's logits, a reload.

The fixtures save tiny models and load them back with a quantization config, as a user would: GPT-2's Conv1D
MLP becomes a bitsandbytes Linear4bit / Linear8bitLt there (transformers transposes its weight), which the tests
check before relying on it.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import peft
import pytest
import torch
import yaml
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from conftest import VOCAB, NaiveLoraMoe
from loramoe import LoraMoeConfig, cli
from loramoe.layer import LoraMoeLayer
from loramoe.loading import load_base_model
from loramoe.quantization import (
    check_base_layer,
    keep_weights_unpacked,
    layer_quantization,
    model_quantization,
    prepare_for_training,
    quantize_model,
)
from loramoe.reproduce.cli import methods_to_run
from loramoe.reproduce.pipeline import METHODS, Plan, load_base, run_experiment
from loramoe.reproduce.presets import tiny_preset
from loramoe.train import TrainConfig

bnb = pytest.importorskip("bitsandbytes")

# On a machine with a GPU the acceptance tests also run on CUDA, where bitsandbytes uses other kernels.
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
CASES = [(arch, q, d) for d in DEVICES for arch in ("llama", "gpt2") for q in ("nf4", "int8")]
CASES += [("llama", "fp4", d) for d in DEVICES]
IDS = ["-".join(case) for case in CASES]


def small_model(arch: str) -> nn.Module:
    """Hidden 64: every linear has at least one 64-entry quantization block per row, as real models do (with
    fewer, bitsandbytes' CPU inference repacking fails outright instead of corrupting the weights)."""
    torch.manual_seed(0)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                                      embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=1))  # fmt: skip


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, str]:
    """A small Llama and a small GPT-2, saved (the full-precision originals the quantized models are loaded from)."""
    root = tmp_path_factory.mktemp("bases")
    paths = {}
    for arch in ("llama", "gpt2"):
        small_model(arch).save_pretrained(root / arch)
        paths[arch] = str(root / arch)
    return paths


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(2, 64, (3, 9), generator=torch.Generator().manual_seed(3))


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids.to(device_of(model))).logits


def wrapped_layers(model: nn.Module) -> list[LoraMoeLayer]:
    return [m for m in model.modules() if isinstance(m, LoraMoeLayer)]


def train_steps(model: nn.Module, ids: torch.Tensor, steps: int = 4) -> list[float]:
    """A few AdamW steps on one batch (LBC on); returns the losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    ids, task_types = ids.to(device_of(model)), torch.tensor([1, 0, 1], device=device_of(model))
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids, task_types=task_types).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def loramoe(base: nn.Module, **kwargs) -> peft.PeftModel:
    return peft.get_peft_model(base, LoraMoeConfig(num_experts=3, r=2, lora_dropout=0.0, **kwargs))


# ---- the base really is quantized where LoRAMoE goes ------------------------------------------------------------


@pytest.mark.parametrize(("arch", "quantize", "device"), CASES, ids=IDS)
def test_wrapped_mlp_linears_are_bitsandbytes_layers(saved, ids, arch, quantize, device):
    base = load_base_model(saved[arch], quantize=quantize, device=device)
    model = loramoe(base)
    layers = wrapped_layers(model)
    assert len(layers) == {"llama": 6, "gpt2": 4}[arch]  # 2 blocks x (gate, up, down) or (c_fc, c_proj)
    kinds = {layer_quantization(layer.get_base_layer()) for layer in layers}
    assert kinds == {quantize}
    assert model_quantization(model) == quantize


def test_quantized_gpt2_computes_the_conv1d_model(saved, ids):
    """transformers turns GPT-2's Conv1D (weight in x out) into bitsandbytes linears (out x in): the quantized
    model must still compute the original one, up to quantization error (int8: small)."""
    full, int8 = load_base_model(saved["gpt2"]), load_base_model(saved["gpt2"], quantize="int8")
    reference = logits(full, ids)
    err = (logits(int8, ids) - reference).abs().max()
    assert err < 0.05 * reference.abs().max()


# ---- acceptance: exactness, the hand-computed mixture, training, save/load --------------------------------------


@pytest.mark.parametrize(("arch", "quantize", "device"), CASES, ids=IDS)
def test_zero_b_loramoe_gives_the_quantized_base_logits_exactly(saved, ids, arch, quantize, device):
    base = load_base_model(saved[arch], quantize=quantize, device=device)
    expected = logits(base, ids)
    assert torch.equal(logits(loramoe(base), ids), expected)


@pytest.mark.parametrize(("arch", "quantize", "device"), CASES, ids=IDS)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_layer_is_the_quantized_base_output_plus_the_mixture(saved, arch, quantize, training, device):
    """Output and gradients of a wrapped quantized linear against its base layer called directly plus SPEC.md's
    per-expert loop (conftest.NaiveLoraMoe) on the same A_i, B_i and router."""
    torch.manual_seed(0)
    model = loramoe(load_base_model(saved[arch], quantize=quantize, device=device), init_weights=False)
    layer = wrapped_layers(model)[-1]  # a down-projection: in = intermediate size
    name, n, r = "default", layer.num_experts["default"], layer.r["default"]
    with torch.no_grad():
        layer.loramoe_B[name].normal_(0, 0.3)
        layer.loramoe_router[name].normal_(0, 0.5)
    A = layer.loramoe_A[name].detach().view(n, r, -1)
    B = layer.loramoe_B[name].detach().view(-1, n, r).permute(1, 0, 2)
    naive = NaiveLoraMoe(layer.get_base_layer(), list(A), list(B), layer.loramoe_router[name].detach(),
                         layer.scaling[name])  # fmt: skip
    model.train(training)
    naive.train(training)
    x = torch.randn(2, 5, layer.in_features, device=device)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = layer(x1), naive(x2)
    torch.testing.assert_close(y1, y2, atol=1e-5, rtol=1e-5)
    assert (y1 - layer.get_base_layer()(x)).abs().max() > 0.1  # the experts contribute
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    close = {"atol": 1e-4, "rtol": 1e-4}  # fp32 sums over up to 256 features, in another order than the loop's
    torch.testing.assert_close(x1.grad, x2.grad, **close)
    torch.testing.assert_close(layer.loramoe_router[name].grad, naive.router.grad, **close)
    for i in range(n):
        torch.testing.assert_close(layer.loramoe_A[name].grad.view(n, r, -1)[i], naive.A[i].grad, **close)
        torch.testing.assert_close(layer.loramoe_B[name].grad.view(-1, n, r)[:, i], naive.B[i].grad, **close)


@pytest.mark.parametrize(("arch", "quantize", "device"), CASES, ids=IDS)
def test_training_changes_only_adapters_and_save_load_gives_identical_logits(saved, ids, tmp_path, arch, quantize,
                                                                             device):  # fmt: skip
    """A few steps lower the loss; training, evaluating and saving change no base tensor (quantization state
    included); the adapter reloaded onto a freshly loaded base gives the trained model's logits exactly.

    The issue's NF4 case: the eval forward made bitsandbytes repack the 4-bit weights for CPU inference, and
    save_pretrained's state_dict() unpacked them with their scales scrambled (see `keep_weights_unpacked`)."""
    model = loramoe(load_base_model(saved[arch], quantize=quantize, device=device))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert any(".absmax" in k or ".SCB" in k for k in before)  # the quantization state is part of what is compared
    losses = train_steps(model, ids)
    assert losses[-1] < losses[0] - 0.05
    trained = logits(model, ids)
    model.save_pretrained(tmp_path)
    assert torch.equal(logits(model, ids), trained)  # saving left the trained model as it was
    after = model.state_dict()
    assert after.keys() == before.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("loramoe_" in k for k in changed)
    reloaded = peft.PeftModel.from_pretrained(load_base_model(saved[arch], quantize=quantize, device=device), tmp_path)
    assert torch.equal(logits(reloaded, ids), trained)


# ---- the cause of the NF4 save/load mismatch --------------------------------------------------------------------


def _nf4_layer(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    plain = nn.Linear(128, 64)
    layer = bnb.nn.Linear4bit(128, 64, compute_dtype=torch.float32, quant_type="nf4", compress_statistics=False)
    layer.load_state_dict(plain.state_dict())
    return layer.to("cpu")  # quantizes


needs_repacking = pytest.mark.skipif(not bnb.functional.has_avx512bf16(),
                                     reason="bitsandbytes repacks 4-bit weights only on CPUs with AVX512-BF16")  # fmt: skip


@needs_repacking
def test_bitsandbytes_repacking_then_state_dict_scrambles_a_4bit_layer():
    """Where the cause lies (bitsandbytes 0.50.2, CPU): an eval forward without gradients repacks the weight;
    state_dict() converts it back but leaves the scales transposed. If this starts failing, bitsandbytes has fixed
    it and `keep_weights_unpacked` can go."""
    layer, x = _nf4_layer(), torch.randn(4, 128)
    with torch.no_grad():
        before = layer(x)  # training mode: the loading format
        layer.eval()(x)  # repacks
        layer.state_dict()
        after = layer.train()(x)
    assert layer.weight.quant_state.absmax.shape == (128 // 64, 64)  # was (128,): transposed, in bf16
    assert (after - before).abs().max() > 1e-2


def test_keep_weights_unpacked_stops_the_repacking():
    layer, x = _nf4_layer(), torch.randn(4, 128)
    keep_weights_unpacked(layer)
    with torch.no_grad():
        before = layer(x)
        evaluated = layer.eval()(x)
        layer.state_dict()
        after = layer.train()(x)
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    assert torch.equal(evaluated, before) and torch.equal(after, before)


@needs_repacking
def test_an_already_repacked_layer_is_restored_to_its_bf16_rounded_scales():
    """The repacking rounds the scales to bf16 and keeps no copy; restoring gives the weight those scales
    describe, in the loading layout (reference: bitsandbytes' dequantization with the scales rounded by hand)."""
    layer, x = _nf4_layer(), torch.randn(4, 128)
    state = copy.deepcopy(layer.weight.quant_state)
    state.absmax = state.absmax.to(torch.bfloat16).float()
    expected = x @ bnb.functional.dequantize_4bit(layer.weight.data.clone(), state).T + layer.bias.detach()
    with torch.no_grad():
        layer.eval()(x)
    assert layer.weight.quant_state.packing_format_for_cpu
    keep_weights_unpacked(layer)
    with torch.no_grad():
        restored = layer.train()(x)
    assert not layer.weight.quant_state.packing_format_for_cpu
    torch.testing.assert_close(restored, expected, atol=1e-5, rtol=1e-5)


# ---- the adapter on the full-precision base ----------------------------------------------------------------------


def rms(t: torch.Tensor) -> float:
    return t.pow(2).mean().sqrt().item()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_adapter_trained_on_nf4_loads_onto_the_full_precision_base(saved, ids, tmp_path, arch):
    """Expected difference: the adapted models differ by about what their bases differ (NF4's quantization
    error), while the adapter's own effect, many times larger, carries over."""
    model = loramoe(load_base_model(saved[arch], quantize="nf4"))
    train_steps(model, ids, steps=10)
    model.save_pretrained(tmp_path)
    on_nf4 = logits(model, ids)
    on_full = logits(peft.PeftModel.from_pretrained(load_base_model(saved[arch]), tmp_path), ids)
    base_nf4, base_full = logits(load_base_model(saved[arch], quantize="nf4"), ids), logits(load_base_model(saved[arch]), ids)
    quantization_error = rms(base_nf4 - base_full)
    assert 0 < rms(on_nf4 - on_full) < 2 * quantization_error
    effect = rms(on_nf4 - base_nf4)
    assert effect > 10 * quantization_error
    assert rms((on_full - base_full) - (on_nf4 - base_nf4)) < 0.2 * effect


# ---- QLoRA training: k-bit preparation, checkpointing, memory -------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_gradient_checkpointing_on_a_4bit_base_gives_the_same_loss_and_gradients(saved, ids, device):
    ids = ids.to(device)

    def loss_and_grads(checkpointing: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        base = prepare_for_training(load_base_model(saved["llama"], quantize="nf4", device=device), "loramoe", "nf4")
        torch.manual_seed(0)
        model = peft.get_peft_model(base, LoraMoeConfig(num_experts=3, r=2, lora_dropout=0.1, init_weights=False))
        if checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        torch.manual_seed(1)  # the same dropout masks
        loss = model(input_ids=ids, labels=ids, task_types=torch.tensor([1, 0, 1], device=device)).loss
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    (loss_a, grads_a), (loss_b, grads_b) = loss_and_grads(False), loss_and_grads(True)
    assert torch.equal(loss_a, loss_b)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) == 18  # A, B, router of 6 linears
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-6, rtol=1e-5)
        assert grads_a[name].abs().sum() > 0


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_no_dequantized_copy_of_a_base_weight_is_kept(saved, ids, quantize):
    """Neither the quantized layers nor autograd (for backward) hold a floating-point tensor of a quantized
    weight's size, other than the model's own parameters (embeddings, head)."""
    model = loramoe(load_base_model(saved["llama"], quantize=quantize))
    quantized = [m for m in model.modules() if layer_quantization(m)]
    sizes = {m.out_features * m.in_features for m in quantized}
    own = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    copies: list[tuple[int, ...]] = []

    def note(t: object) -> object:
        floating = isinstance(t, torch.Tensor) and t.dtype.is_floating_point
        if floating and t.numel() in sizes and t.untyped_storage().data_ptr() not in own:
            copies.append(tuple(t.shape))
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(note, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    for m in model.modules():  # what modules keep between calls: their attributes, bitsandbytes' int8 state
        state = getattr(m, "state", None) if m in quantized else None
        for t in (*vars(m).values(), *(vars(state).values() if state is not None else ())):
            note(t)
    assert len(quantized) == 14 and not copies


def test_k_bit_preparation_casts_half_precision_parts_to_fp32_and_freezes_them(saved):
    base = load_base_model(saved["llama"], dtype=torch.bfloat16, quantize="nf4")
    assert base.model.norm.weight.dtype == torch.bfloat16
    prepared = prepare_for_training(base, "loramoe", "nf4")
    assert prepared.model.norm.weight.dtype == prepared.lm_head.weight.dtype == torch.float32
    assert not any(p.requires_grad for p in prepared.parameters())
    assert {layer_quantization(m) for m in prepared.modules()} == {None, "nf4"}  # the 4-bit weights stay 4-bit


# ---- loading, refusing, the command line ------------------------------------------------------------------------


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_quantizing_in_memory_equals_loading_quantized(saved, ids, quantize):
    """The GGUF route (quantize the loaded plain model) gives exactly what from_pretrained with the config gives."""
    in_memory = quantize_model(load_base_model(saved["llama"]), quantize)
    loaded = load_base_model(saved["llama"], quantize=quantize)
    a, b = in_memory.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(logits(in_memory, ids), logits(loaded, ids))


class PackedLinear(nn.Module):
    """Stands for a quantized linear of a kind LoRAMoE does not know (HQQ, GPTQ, ... keep packed integers)."""

    def __init__(self, inner: nn.Linear) -> None:
        super().__init__()
        self.register_buffer("qweight", torch.zeros(inner.out_features, inner.in_features // 2, dtype=torch.uint8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("never called")


def test_an_unsupported_quantized_linear_is_named():
    model = small_model("llama")
    model.model.layers[1].mlp.up_proj = PackedLinear(model.model.layers[1].mlp.up_proj)
    with pytest.raises(TypeError, match=r"model\.layers\.1\.mlp\.up_proj: LoRAMoE cannot wrap a .*PackedLinear"):
        loramoe(model)
    int8 = nn.Linear(8, 4)
    int8.weight = nn.Parameter(torch.zeros(4, 8, dtype=torch.int8), requires_grad=False)
    with pytest.raises(TypeError, match=r"Linear with a torch\.int8 weight"):
        check_base_layer(int8, "x")


def test_settings_that_would_not_be_applied_are_refused(saved):
    with pytest.raises(ValueError, match=r"quantize: 'nf4' with method full"):
        TrainConfig(method="full", quantize="nf4")
    with pytest.raises(ValueError, match="bnb_compute_dtype"):
        TrainConfig(quantize="int8", bnb_compute_dtype="bfloat16")
    with pytest.raises(ValueError, match="quantize"):
        TrainConfig(quantize="nf3")
    with pytest.raises(ValueError, match=r"quantize: the run says 'nf4' but the model given is not quantized"):
        prepare_for_training(load_base_model(saved["llama"]), "loramoe", "nf4")
    with pytest.raises(ValueError, match=r"the run says None but the model given is int8"):
        prepare_for_training(load_base_model(saved["llama"], quantize="int8"), "lora", None)
    with pytest.raises(ValueError, match=r"--methods: sft"):
        methods_to_run(["sft", "lora"], "nf4")
    assert methods_to_run(None, "nf4") == [m for m in METHODS if m != "sft"]
    assert methods_to_run(None, None) == list(METHODS)


def test_cli_train_eval_and_routes_on_an_nf4_base(tiny_llama_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": "Capital?", "input": f"land {i}", "output": f"city {i}",
                                        "task_type": i % 2}) + "\n" for i in range(8)))  # fmt: skip
    out = tmp_path / "run"
    assert cli.main(["train", "--model", str(tiny_llama_dir), "--data", str(data), "--output-dir", str(out),
                     "--num-experts", "2", "--r", "2", "--max-steps", "2", "--batch-size", "4", "--max-seq-len", "32",
                     "--quantize", "nf4", "--no-progress"]) == 0  # fmt: skip
    assert yaml.safe_load((out / "train_config.yaml").read_text())["quantize"] == "nf4"
    tasks = tmp_path / "t.jsonl"
    tasks.write_text(json.dumps({"type": "generate", "prompt": "Capital?\nland 1", "answers": ["city 1"]}) + "\n")
    for command, result in (("eval", "eval.json"), ("routes", "routing.json")):
        assert cli.main([command, "--base", str(tiny_llama_dir), "--adapter", str(out), "--tasks", str(tasks),
                         "--out", str(tmp_path / command), "--no-progress", "--quantize", "nf4"]) == 0  # fmt: skip
        assert (tmp_path / command / result).is_file()
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["settings"]["quantize"] == "nf4"


def test_reproduce_quantizes_the_base_of_every_method(toy_base, tmp_path):
    path, _, _, _ = toy_base
    preset = tiny_preset(path, downstream_per_family=2, test_per_family=1, batch_size=4, eval_batch_size=16,
                         max_new_tokens=2, quantize="nf4")  # fmt: skip
    raw = run_experiment(Plan(preset, tmp_path, [0], [1], ["base", "lora", "loramoe"], steps=1), log=lambda line: None)
    assert [run["method"] for run in raw["runs"]] == ["base", "lora", "loramoe"]
    assert all(run["train_config"]["quantize"] == "nf4" for run in raw["runs"][1:])
    assert load_base(preset)[0].model.layers[0].mlp.up_proj.__class__ is bnb.nn.Linear4bit


def test_benchmark_counts_quantized_weight_bytes_by_hand():
    """benchmarks/quantized_bases.py's base-weight bytes on single layers, against the storage formats' sizes."""
    from benchmarks.quantized_bases import base_weight_bytes

    nf4 = _nf4_layer()  # 128 x 64: 8192 4-bit codes, 128 blocks of 64 with an fp32 scale, a 16-entry fp32 code
    assert base_weight_bytes(nf4) == 8192 // 2 + 128 * 4 + 16 * 4 + 64 * 4  # + fp32 bias
    int8 = bnb.nn.Linear8bitLt(128, 64, has_fp16_weights=False).to("cpu")
    assert base_weight_bytes(int8) == 8192 + 64 * 4 + 64 * 4  # int8 codes + fp32 row scales + fp32 bias
    int8(torch.randn(2, 128))  # the scales move into the layer's matmul state
    assert base_weight_bytes(int8) == 8192 + 64 * 4 + 64 * 4


@pytest.mark.slow
def test_smollm2_gguf_base_loads_in_nf4_and_still_knows_paris():
    """The GGUF file is dequantized by transformers, then quantized in memory (no copy written to disk)."""
    pytest.importorskip("gguf")
    from loramoe.loading import load_tokenizer, smollm2_gguf_path

    try:
        smollm2_gguf_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    base, tokenizer = load_base_model("smollm2", quantize="nf4"), load_tokenizer("smollm2")
    assert type(base.model.layers[0].mlp.up_proj) is bnb.nn.Linear4bit and type(base.lm_head) is nn.Linear
    assert base.config.name_or_path.endswith(".gguf")
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    expected = logits(base, ids)
    assert tokenizer.decode(expected[0, -1].argmax()) == " Paris"
    assert torch.equal(logits(loramoe(base), ids), expected)


@pytest.mark.parametrize("quantize", ["nf4", "int8"])
def test_a_quantized_load_lets_go_of_the_checkpoint_and_keeps_ties(tmp_path, quantize):
    """Full-precision parts get memory of their own: the checkpoint file is no longer mapped (else the pages
    quantization read stay resident); GPT-2's tied embedding and head stay one tensor."""
    small_model("gpt2").save_pretrained(tmp_path)
    model = load_base_model(str(tmp_path), quantize=quantize)
    assert model.lm_head.weight is model.transformer.wte.weight
    maps = Path("/proc/self/maps")
    if maps.exists():
        assert str(tmp_path / "model.safetensors") not in maps.read_text()
    plain = load_base_model(str(tmp_path))
    shared = {t.untyped_storage().data_ptr() for t in plain.state_dict().values()}
    copied = quantize_model(plain, quantize)
    assert not any(t.untyped_storage().data_ptr() in shared for t in copied.state_dict().values())


def test_4bit_layers_compute_in_the_chosen_dtype(saved, ids):
    base = load_base_model(saved["llama"], quantize="nf4", bnb_compute_dtype="bfloat16")
    assert {m.compute_dtype for m in base.modules() if layer_quantization(m)} == {torch.bfloat16}
    expected = logits(base, ids)
    assert not torch.equal(expected, logits(load_base_model(saved["llama"], quantize="nf4"), ids))  # it is applied
    prepare_for_training(base, "loramoe", "nf4", "bfloat16")
    with pytest.raises(ValueError, match=r"bnb_compute_dtype: the run says 'float16'"):
        prepare_for_training(base, "loramoe", "nf4", "float16")
    assert torch.equal(logits(loramoe(base), ids), expected)


def test_4bit_layers_compute_in_the_loaded_dtype_by_default(saved):
    """No --bnb-compute-dtype: a 4-bit layer computes in the dtype the model was loaded in (its input's dtype), from
    a saved folder and in memory (the GGUF path); a chosen one wins over it."""
    for dtype in (torch.bfloat16, torch.float32):
        loaded = load_base_model(saved["llama"], dtype=dtype, quantize="nf4")
        assert {m.compute_dtype for m in loaded.modules() if layer_quantization(m)} == {dtype}
    in_memory = quantize_model(load_base_model(saved["llama"], dtype=torch.bfloat16), "fp4")
    assert {m.compute_dtype for m in in_memory.modules() if layer_quantization(m)} == {torch.bfloat16}
    chosen = load_base_model(saved["llama"], dtype=torch.bfloat16, quantize="nf4", bnb_compute_dtype="float32")
    assert {m.compute_dtype for m in chosen.modules() if layer_quantization(m)} == {torch.float32}


def test_a_compute_dtype_without_4bit_quantization_is_refused_naming_the_key(saved, tiny_llama_dir, tmp_path, capsys):
    """--bnb-compute-dtype without --quantize nf4/fp4 would not be applied: every way in refuses it, in one line."""
    message = r"^bnb_compute_dtype: set to 'bfloat16' with quantize=None \(expected it only with nf4 or fp4"
    with pytest.raises(ValueError, match=message):
        load_base_model(saved["llama"], bnb_compute_dtype="bfloat16")
    with pytest.raises(ValueError, match=message):
        TrainConfig(bnb_compute_dtype="bfloat16")
    with pytest.raises(ValueError, match=message):
        tiny_preset(bnb_compute_dtype="bfloat16")
    tasks = tmp_path / "t.jsonl"
    tasks.write_text(json.dumps({"type": "generate", "prompt": "Capital?", "answers": ["city"]}) + "\n")
    assert cli.main(["eval", "--base", str(tiny_llama_dir), "--tasks", str(tasks), "--out", str(tmp_path / "eval"),
                     "--no-progress", "--bnb-compute-dtype", "bfloat16"]) == 2  # routes loads through the same code
    assert capsys.readouterr().err.startswith("loramoe eval: error: bnb_compute_dtype: set to 'bfloat16' with quantize=None")
    assert not (tmp_path / "eval").exists()
