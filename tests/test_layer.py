"""The fused layer against independent references: SPEC.md's per-expert loop, and PEFT's own LoRA."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from peft.tuners.lora import Linear as PeftLoraLinear
from transformers.pytorch_utils import Conv1D

from conftest import NaiveLoraMoe
from loramoe import LoraMoeConfig
from loramoe.layer import Linear


def _fused(base: torch.nn.Module, n: int, r: int = 4, alpha: float = 32.0, seed: int = 0) -> Linear:
    torch.manual_seed(seed)
    layer = Linear(base, "default", LoraMoeConfig(num_experts=n, r=r, lora_alpha=alpha, lora_dropout=0.0,
                                                   init_weights=False))
    with torch.no_grad():  # non-trivial B and router so every term matters
        layer.loramoe_B["default"].normal_(0, 0.3)
        layer.loramoe_router["default"].normal_(0, 0.5)
    return layer


def _naive_from(layer: Linear, base: torch.nn.Module) -> NaiveLoraMoe:
    n, r = layer.num_experts["default"], layer.r["default"]
    A = layer.loramoe_A["default"].detach().view(n, r, -1)
    B = layer.loramoe_B["default"].detach().view(-1, n, r).permute(1, 0, 2)
    return NaiveLoraMoe(base, list(A), list(B), layer.loramoe_router["default"].detach(), layer.scaling["default"])


@pytest.mark.parametrize("n", [1, 2, 3, 6, 8])
def test_fused_equals_per_expert_loop_outputs_and_gradients(n):
    base = torch.nn.Linear(24, 40)
    base.requires_grad_(False)
    fused = _fused(base, n)
    naive = _naive_from(fused, base)
    x = torch.randn(3, 7, 24)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()

    y1, y2 = fused(x1), naive(x2)
    torch.testing.assert_close(y1, y2, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)

    r = fused.r["default"]
    grad_A = fused.loramoe_A["default"].grad.view(n, r, -1)
    grad_B = fused.loramoe_B["default"].grad.view(-1, n, r).permute(1, 0, 2)
    for i in range(n):
        torch.testing.assert_close(grad_A[i], naive.A[i].grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grad_B[i], naive.B[i].grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused.loramoe_router["default"].grad, naive.router.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=1e-5)


def test_conv1d_base_is_wrapped_like_linear():
    """GPT-2's Conv1D stores the weight transposed; the adapter must still see in -> out."""
    conv = Conv1D(40, 24)  # nf=out, nx=in
    linear = torch.nn.Linear(24, 40)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.T)
        linear.bias.copy_(conv.bias)
    a, b = _fused(conv, 3), _fused(linear, 3)
    x = torch.randn(2, 5, 24)
    torch.testing.assert_close(a(x), b(x), atol=1e-5, rtol=1e-5)


def test_single_expert_equals_peft_lora():
    """N = 1: the softmax over one expert is exactly 1, so LoRAMoE is LoRA with the same A, B and scaling."""
    base = torch.nn.Linear(24, 40)
    ours = _fused(base, 1, r=8, alpha=16)
    peft_lora = PeftLoraLinear(base, "default", r=8, lora_alpha=16, lora_dropout=0.0, config=LoraConfig())
    with torch.no_grad():
        peft_lora.lora_A["default"].weight.copy_(ours.loramoe_A["default"])
        peft_lora.lora_B["default"].weight.copy_(ours.loramoe_B["default"])
    x = torch.randn(4, 6, 24)
    assert peft_lora.scaling["default"] == ours.scaling["default"] == 2.0
    torch.testing.assert_close(ours(x), peft_lora(x), atol=1e-6, rtol=1e-6)


def test_base_weight_is_shared_not_copied():
    base = torch.nn.Linear(24, 40)
    layer = _fused(base, 6)
    assert layer.get_base_layer().weight.data_ptr() == base.weight.data_ptr()
    n, r = 6, 4
    adapter = n * r * 24 + 40 * n * r + n * 24
    assert sum(p.numel() for p in layer.parameters()) == base.weight.numel() + base.bias.numel() + adapter


def test_init_matches_reference_recipe():
    """B zero (identity at step 0); A and router kaiming-uniform(a=sqrt(5)) -> bound 1/sqrt(in)."""
    base = torch.nn.Linear(100, 30)
    layer = Linear(base, "default", LoraMoeConfig(num_experts=6, r=4))
    bound = 1 / 100**0.5
    assert torch.count_nonzero(layer.loramoe_B["default"]) == 0
    for p in (layer.loramoe_A["default"], layer.loramoe_router["default"]):
        assert p.abs().max() <= bound and p.abs().max() > 0.8 * bound
    x = torch.randn(2, 3, 100)
    torch.testing.assert_close(layer(x), base(x), atol=0, rtol=0)


def test_dropout_only_on_expert_branch():
    """With dropout on in training, the router still reads the clean input (its weights are deterministic)."""
    base = torch.nn.Linear(24, 40)
    layer = Linear(base, "default", LoraMoeConfig(num_experts=3, r=2, lora_dropout=0.5)).train()
    layer._capture_sink = []
    x = torch.randn(2, 5, 24)
    layer(x)
    layer(x)
    w1, w2 = layer._capture_sink
    torch.testing.assert_close(w1, w2)
    torch.testing.assert_close(w1, torch.softmax(x @ layer.loramoe_router["default"].T, -1))


def test_bf16_autocast_close_to_fp32():
    base = torch.nn.Linear(64, 96)
    layer = _fused(base, 6)
    x = torch.randn(4, 16, 64)
    ref = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    rel = (out.float() - ref).norm() / ref.norm()
    assert rel < 2e-2, rel
