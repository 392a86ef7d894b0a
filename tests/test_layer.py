"""The fused layer against independent references: SPEC.md's per-expert loop, and PEFT's own LoRA."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from peft.tuners.lora import Linear as PeftLoraLinear
from transformers.pytorch_utils import Conv1D

from conftest import NaiveLoraMoe
from loramoe import LoraMoeConfig
from loramoe.layer import Linear, _dropout_keep, mix_experts


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
    for i in range(n):  # one GEMM vs a loop sums in another order: ~1.4e-5 apart on some CPUs (AMD EPYC)
        torch.testing.assert_close(grad_A[i], naive.A[i].grad, atol=5e-5, rtol=1e-5)
        torch.testing.assert_close(grad_B[i], naive.B[i].grad, atol=5e-5, rtol=1e-5)
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


# ---- the fused compute path: custom autograd Function, dropout, in-place residual, dtypes (compile: test_compile) ----


@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("residual", [False, True])
def test_custom_function_gradcheck_float64(dropout, residual):
    """Analytic gradients of both outputs (y and the router weights the LBC reads) against finite differences."""
    g = torch.Generator().manual_seed(0)
    x, router, A, B, res = (torch.randn(*s, dtype=torch.float64, generator=g, requires_grad=True)
                            for s in [(2, 3, 5), (3, 5), (6, 5), (4, 6), (6, 4)])
    drop = torch.nn.Dropout(dropout).train()

    def fn(x, router, A, B, res):
        torch.manual_seed(1)  # the same dropout mask on every evaluation
        # (res * 1).view(...) is shaped like a linear's output on 3-D input: a view of a 2-D product.
        base_out = (res * 1).view(2, 3, 4) if residual else None
        return mix_experts(x, A, B, router, 1.5, drop, residual=base_out)

    assert torch.autograd.gradcheck(fn, (x, router, A, B, res))


def test_dropout_training_path_matches_reference_with_the_same_mask():
    """Recover the mask the layer drew (identity experts expose it), then check outputs and every gradient of a
    general layer drawing that same mask against the formula written out with that mask."""
    p, n, r = 0.375, 2, 4  # a multiple of 2^-16, which the layer's mask uses exactly
    base = torch.nn.Linear(8, 8).requires_grad_(False)
    layer = Linear(base, "default", LoraMoeConfig(num_experts=n, r=r, lora_dropout=p, init_weights=False)).train()
    scaling = layer.scaling["default"]
    x = torch.randn(3, 16, 8)
    with torch.no_grad():
        layer.loramoe_A["default"].copy_(torch.eye(8))
        layer.loramoe_B["default"].copy_(torch.eye(8))
        w = torch.softmax(x @ layer.loramoe_router["default"].T, -1).repeat_interleave(r, dim=-1)
        torch.manual_seed(7)
        keep = (layer(x) - base(x)) * (1 - p) / (scaling * w * x)
    torch.testing.assert_close(keep, keep.round(), atol=1e-4, rtol=0)  # 0 or 1: dropped, or kept and scaled by 1/(1-p)
    keep = keep.round()
    assert 0.25 < 1 - keep.mean().item() < 0.55

    with torch.no_grad():
        layer.loramoe_A["default"].normal_(0, 0.3)
        layer.loramoe_B["default"].normal_(0, 0.3)
    naive = _naive_from(layer, base)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(7)
    y1 = layer(x1)
    wn = torch.softmax((x2 @ naive.router.T).float(), -1)  # the router reads the clean input
    xd = x2 * keep / (1 - p)
    y2 = base(x2) + sum(scaling * wn[..., i : i + 1] * (xd @ naive.A[i].T) @ naive.B[i].T for i in range(n))
    torch.testing.assert_close(y1, y2, atol=1e-5, rtol=1e-5)
    gy = torch.randn_like(y1)
    y1.backward(gy)
    y2.backward(gy)
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.loramoe_router["default"].grad, naive.router.grad, atol=1e-5, rtol=1e-5)
    grad_A = layer.loramoe_A["default"].grad.view(n, r, -1)
    grad_B = layer.loramoe_B["default"].grad.view(-1, n, r).permute(1, 0, 2)
    for i in range(n):
        torch.testing.assert_close(grad_A[i], naive.A[i].grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grad_B[i], naive.B[i].grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_dropout_mask_rate_and_independence(p):
    keep, p_used = _dropout_keep(torch.empty(1000, 1000), p)
    assert abs(p_used - p) <= 2**-17
    dropped = (~keep).float()
    sigma = (p * (1 - p) / keep.numel()) ** 0.5
    assert abs(dropped.mean().item() - p_used) < 5 * sigma
    for shift in (1, 2, 3, 4):  # neighbours share 64-bit draws: their masks must still be uncorrelated
        corr = torch.corrcoef(torch.stack([dropped.view(-1)[:-shift], dropped.view(-1)[shift:]]))[0, 1]
        assert abs(corr.item()) < 0.01
    torch.manual_seed(0)
    a = _dropout_keep(torch.empty(50), p)[0]
    torch.manual_seed(0)
    assert torch.equal(a, _dropout_keep(torch.empty(50), p)[0])  # reproducible under the global seed


def test_eval_no_grad_and_training_paths_agree():
    """Eval mode turns dropout off; the no-grad (inference) path computes exactly what the autograd path does."""
    base = torch.nn.Linear(24, 40)
    layer = Linear(base, "default", LoraMoeConfig(num_experts=4, r=2, lora_dropout=0.5, init_weights=False)).eval()
    reference = _fused(base, 4, r=2)  # same seed -> same weights, built without dropout
    x = torch.randn(2, 7, 24, requires_grad=True)
    y_grad = layer(x)
    with torch.no_grad():
        y_nograd = layer(x)
    torch.testing.assert_close(y_grad, y_nograd, atol=0, rtol=0)
    with torch.no_grad():
        for name in ("loramoe_A", "loramoe_B", "loramoe_router"):
            getattr(reference, name)["default"].copy_(getattr(layer, name)["default"])
    torch.testing.assert_close(y_grad, reference(x), atol=1e-6, rtol=1e-6)
    layer.train()
    assert not torch.allclose(layer(x), y_grad)


def test_empty_input():
    layer = _fused(torch.nn.Linear(24, 40), 3)
    x = torch.randn(2, 0, 24, requires_grad=True)
    y = layer(x)
    assert y.shape == (2, 0, 40)
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_base_output_is_updated_in_place():
    """The residual add rides on the output product: the result lives in the base layer's output buffer."""
    base = torch.nn.Linear(24, 40).requires_grad_(False)
    layer = _fused(base, 3)
    seen = []
    base.register_forward_hook(lambda mod, args, out: seen.append(out))
    x = torch.randn(2, 5, 24, requires_grad=True)
    y = layer(x)
    assert y.data_ptr() == seen[0].data_ptr()
    y.sum().backward()  # autograd accepts the in-place update (no version-counter error)
    assert x.grad is not None


def test_saved_for_backward_is_only_what_backward_needs():
    """With dropout: x, the 1-byte mask, h (T x N*r) and the fp32 weights (T x N); without: x, the joint
    h and the weights. Parameters are not counted."""
    n, r, t, d_in = 6, 4, 10, 24
    for p, expected in [(0.1, t * d_in * 4 + t * d_in + t * n * r * 4 + t * n * 4),
                        (0.0, t * d_in * 4 + t * n * r * 4 + t * n * 4)]:
        base = torch.nn.Linear(d_in, 40).requires_grad_(False)
        layer = Linear(base, "default", LoraMoeConfig(num_experts=n, r=r, lora_dropout=p)).train()
        params = {q.untyped_storage().data_ptr() for q in layer.parameters()}
        saved = {}

        def pack(tensor, saved=saved, params=params):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in params:
                saved[storage.data_ptr()] = storage.nbytes()
            return tensor

        x = torch.randn(1, t, d_in, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            layer(x)
        assert sum(saved.values()) == expected, (p, saved)


def test_bf16_autocast_backward_close_to_fp32():
    base = torch.nn.Linear(64, 96).requires_grad_(False)
    layer = _fused(base, 6)
    x = torch.randn(4, 16, 64)
    grads = []
    for autocast in (False, True):
        layer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = layer(x)
        (y.float() ** 2).mean().backward()
        grads.append({name: q.grad for name, q in layer.named_parameters() if q.requires_grad})
    for name, g32 in grads[0].items():
        g16 = grads[1][name]
        assert g16.dtype == torch.float32  # the parameters' dtype, whatever the compute dtype
        assert (g16 - g32).norm() / g32.norm() < 3e-2, name


# Relative error (in norm) of a half-precision base against the fp32 loop on the same rounded weights and input:
# about five units of the format's epsilon (bf16 2^-8, fp16 2^-11). Seen: bf16 <= 8e-3, fp16 <= 1.1e-3 (the
# router's and the input's gradients; the output 5e-3 and 6e-4).
HALF_TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 3e-3}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_base_with_fp32_adapter_matches_per_expert_loop(dtype):
    """A bf16/fp16 base (``--dtype``) with fp32 adapters (master weights): the experts run in the base's dtype, the
    output is in it, the gradients reach the fp32 adapters as fp32, all within the format's tolerance of the
    per-expert loop computed in fp32 on the same (rounded) base weights and input."""
    base = torch.nn.Linear(64, 96).requires_grad_(False)
    fused = _fused(base, 6)
    base.to(dtype)
    rounded = torch.nn.Linear(64, 96).requires_grad_(False)
    rounded.load_state_dict({k: v.float() for k, v in base.state_dict().items()})
    naive = _naive_from(fused, rounded)
    x = torch.randn(4, 16, 64).to(dtype)
    x1, x2 = x.clone().requires_grad_(), x.float().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y1 = fused(x1)
    y2 = naive(x2)
    assert y1.dtype == dtype
    h = [t for t in saved if t.shape == (64, 6 * fused.r["default"])]  # h = x A^T, kept for backward
    assert [t.dtype for t in h] == [dtype]  # computed (and kept) in the base's dtype, not upcast to fp32

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a.float() - b).norm() / b.norm()).item()

    tol = HALF_TOLERANCE[dtype]
    assert rel(y1, y2) < tol
    g = torch.randn_like(y2)
    y1.backward(g.to(dtype))
    y2.backward(g)
    n, r = 6, fused.r["default"]
    grad_A = fused.loramoe_A["default"].grad
    grad_B = fused.loramoe_B["default"].grad
    assert {p.grad.dtype for p in fused.parameters() if p.requires_grad} == {torch.float32}
    assert rel(grad_A, torch.cat([a.grad for a in naive.A])) < tol
    assert rel(grad_B, torch.stack([b.grad for b in naive.B], 1).view(-1, n * r)) < tol
    assert rel(fused.loramoe_router["default"].grad, naive.router.grad) < tol
    assert rel(x1.grad, x2.grad) < tol


def test_conv1d_gradients_match_linear():
    conv = Conv1D(40, 24)
    linear = torch.nn.Linear(24, 40)
    with torch.no_grad():
        linear.weight.copy_(conv.weight.T)
        linear.bias.copy_(conv.bias)
    a, b = _fused(conv.requires_grad_(False), 3), _fused(linear.requires_grad_(False), 3)
    x1, x2 = (torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(3)).requires_grad_() for _ in range(2))
    a(x1).sum().backward()
    b(x2).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=1e-5)
    for name in ("loramoe_A", "loramoe_B", "loramoe_router"):
        torch.testing.assert_close(getattr(a, name)["default"].grad, getattr(b, name)["default"].grad,
                                   atol=1e-5, rtol=1e-5)
