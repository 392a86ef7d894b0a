"""torch.compile: the layer compiles whole (fullgraph) and matches the per-expert loop forward and backward, in
fp32 and under bf16 autocast, with dropout; its operator passes torch.library's checks; a compiled training step
equals the eager one."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from conftest import NaiveLoraMoe
from loramoe import LoraMoeConfig
from loramoe.layer import Linear, _mix_experts_backward_op, _mix_experts_op
from loramoe.train import TrainConfig, config_from_args, configure_parser, train
from test_train import adapter_tensors, make_cfg, max_diff


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch (and no test runs into dynamo's per-function recompile limit)."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _layer(n: int = 3, r: int = 4, dropout: float = 0.0, d_in: int = 24, d_out: int = 40) -> Linear:
    torch.manual_seed(0)
    base = torch.nn.Linear(d_in, d_out).requires_grad_(False)
    layer = Linear(base, "default", LoraMoeConfig(num_experts=n, r=r, lora_alpha=32.0, lora_dropout=dropout,
                                                   init_weights=False)).train()  # fmt: skip
    with torch.no_grad():  # non-trivial B and router so every term matters
        layer.loramoe_B["default"].normal_(0, 0.3)
        layer.loramoe_router["default"].normal_(0, 0.5)
    return layer


def _naive(layer: Linear) -> NaiveLoraMoe:
    n, r = layer.num_experts["default"], layer.r["default"]
    A = layer.loramoe_A["default"].detach().view(n, r, -1)
    B = layer.loramoe_B["default"].detach().view(-1, n, r).permute(1, 0, 2)
    router = layer.loramoe_router["default"].detach()
    return NaiveLoraMoe(layer.base_layer, list(A), list(B), router, layer.scaling["default"])


def _run(module, x: torch.Tensor, weights_of, bf16: bool = False) -> list[torch.Tensor]:
    """Output, router weights, and the gradients of a loss on both (as the LM loss and the LBC use them)."""
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        y = module(x)
        w = weights_of(x)
    g = torch.Generator().manual_seed(5)
    loss = (y.float() * torch.randn(y.shape, generator=g)).sum() + (w * torch.randn(w.shape, generator=g)).sum()
    loss.backward()
    return [y.detach().float(), w.detach(), x.grad]


def _fused_run(layer: Linear, module, x: torch.Tensor, bf16: bool = False) -> list[torch.Tensor]:
    layer.zero_grad(set_to_none=True)
    layer._blc_sink = []
    try:
        out = _run(module, x, lambda _: layer._blc_sink[-1], bf16)
    finally:
        layer._blc_sink = None
    n, r = layer.num_experts["default"], layer.r["default"]
    grad_B = layer.loramoe_B["default"].grad.view(-1, n, r).permute(1, 0, 2)
    return out + [layer.loramoe_A["default"].grad.view(n, r, -1), grad_B, layer.loramoe_router["default"].grad]


def _naive_run(naive: NaiveLoraMoe, x: torch.Tensor) -> list[torch.Tensor]:
    out = _run(naive, x, lambda x: torch.softmax((x @ naive.router.T).float(), -1))
    return out + [torch.stack([a.grad for a in naive.A]), torch.stack([b.grad for b in naive.B]), naive.router.grad]


def test_compiled_layer_is_one_graph_and_matches_the_per_expert_loop():
    """fullgraph=True: any graph break would raise. Forward, router weights and every gradient (through y and
    through the weights, as the LBC's) against SPEC.md's loop."""
    layer = _layer()
    x = torch.randn(2, 5, 24)
    compiled = _fused_run(layer, torch.compile(layer, fullgraph=True), x)
    reference = _naive_run(_naive(layer), x)
    names = ["y", "weights", "grad x", "grad A", "grad B", "grad router"]
    for name, got, want in zip(names, compiled, reference):
        torch.testing.assert_close(got, want, atol=5e-5, rtol=1e-5, msg=name)


def test_compiled_layer_under_bf16_autocast_matches_eager():
    """Under autocast the compiled layer computes in bf16 as eager does: the same outputs and gradients up to
    bf16 rounding (inductor keeps elementwise intermediates in fp32), both within bf16 error of the fp32 loop."""
    layer = _layer()
    x = torch.randn(2, 5, 24)
    eager = _fused_run(layer, layer, x, bf16=True)
    compiled = _fused_run(layer, torch.compile(layer, fullgraph=True), x, bf16=True)
    reference = _naive_run(_naive(layer), x)
    assert layer.loramoe_A["default"].grad.dtype == torch.float32  # parameter gradients stay fp32
    for name, a, b, ref in zip(["y", "weights", "grad x", "grad A", "grad B", "grad router"], compiled, eager, reference):
        scale = ref.norm()
        assert (a - b).norm() / scale < 1e-2, name
        assert (a - ref).norm() / scale < 3e-2, name


def test_compiled_dropout_uses_one_mask_in_forward_and_backward():
    """With inductor's random numbers taken from torch's generator (fallback_random), the mask the compiled
    layer draws is torch.rand(x.shape) >= p from the seed: the loop with that mask applied to x must give the
    same outputs and gradients (and the router must read the un-dropped x)."""
    p = 0.3
    layer = _layer(dropout=p)
    x = torch.randn(2, 5, 24)
    naive = _naive(layer)
    torch.manual_seed(11)
    keep = (torch.rand(10, 24) >= p).float().view(2, 5, 24)
    scale = layer.scaling["default"] / (1 - p)

    class MaskedLoop(torch.nn.Module):  # SPEC.md's loop with the router on x and the experts on dropout(x)
        def forward(self, x):
            w = torch.softmax((x @ naive.router.T).float(), -1)
            y = naive.base(x)
            for i in range(len(naive.A)):
                y = y + scale * w[..., i : i + 1] * (((x * keep) @ naive.A[i].T) @ naive.B[i].T)
            return y

    with torch._inductor.config.patch(fallback_random=True):
        compiled = torch.compile(layer, fullgraph=True)
        torch.manual_seed(11)
        got = _fused_run(layer, compiled, x)
    want = _run(MaskedLoop(), x, lambda x: torch.softmax((x @ naive.router.T).float(), -1))
    want += [torch.stack([a.grad for a in naive.A]), torch.stack([b.grad for b in naive.B]), naive.router.grad]
    for name, a, b in zip(["y", "weights", "grad x", "grad A", "grad B", "grad router"], got, want):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-5, msg=name)


def test_compiled_layer_saves_no_more_for_backward_than_eager():
    """The operator's autograd formula decides what is kept (x, the 1-byte mask, h, the router weights); the
    compiler may not swap it for a dropped copy of x or a full-size intermediate."""
    from benchmarks.measure import saved_tensor_bytes

    layer = _layer(n=6, r=4, dropout=0.1, d_in=64, d_out=96)
    x = torch.randn(4, 32, 64, requires_grad=True)
    params = [layer.base_layer.weight, layer.base_layer.bias, *layer.parameters()]
    eager = saved_tensor_bytes(lambda: layer(x), params)
    compiled_layer = torch.compile(layer, fullgraph=True)
    compiled_layer(x).sum().backward()  # compile outside the measurement
    compiled = saved_tensor_bytes(lambda: compiled_layer(x), params)
    tokens = 4 * 32
    assert eager == tokens * (64 * 4 + 64 + 24 * 4 + 6 * 4)  # x, mask, h, weights
    assert compiled <= eager, (compiled, eager)


def test_compiled_backward_runs_the_layers_code(monkeypatch):
    """The compiled graph calls the backward operator at run time instead of a traced copy of the formula: PyTorch
    does not key its on-disk compile cache on a custom op's autograd formula (pytorch#144344), so a traced copy
    could outlive an edit of it. (Caches off here, so the check does not depend on what a cache holds.)"""
    import loramoe.layer

    layer = _layer(dropout=0.1)
    x = torch.randn(2, 5, 24, requires_grad=True)
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        compiled = torch.compile(layer, fullgraph=True)
        compiled(x).sum().backward()  # traced and compiled here
        calls = []
        backward = loramoe.layer._experts_backward
        monkeypatch.setattr(loramoe.layer, "_experts_backward", lambda *a: calls.append(1) or backward(*a))
        compiled(x).sum().backward()
    assert calls == [1]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_operators_pass_opcheck(dtype):
    """Schema, fake (meta) implementation, autograd registration and tracing of the forward and the backward
    operator, with and without a dropout mask, and with the input gradient not needed."""
    g = torch.Generator().manual_seed(0)
    x, router, A, B = (torch.randn(*s, generator=g, dtype=dtype) for s in [(10, 24), (3, 24), (12, 24), (40, 12)])
    for keep in (None, torch.rand(10, 24, generator=g) >= 0.3):
        inputs = [t.clone().requires_grad_() for t in (x, router, A, B)]
        torch.library.opcheck(_mix_experts_op, (*inputs, keep, 1.7))
        _, weights, h = _mix_experts_op(x, router, A, B, keep, 1.7)
        grads = (torch.randn(10, 40, generator=g, dtype=dtype), torch.randn(weights.shape, dtype=weights.dtype))
        for needs in ([True] * 4, [False, True, True, True]):
            args = (*grads, x, keep, router, A, B, h, weights, 1.7, needs)
            torch.library.opcheck(_mix_experts_backward_op, args)


def test_operator_gradients_against_finite_differences():
    """The operator's registered backward (shared with the eager Function) through both differentiable outputs."""
    g = torch.Generator().manual_seed(0)
    x, router, A, B = (torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)
                       for s in [(6, 5), (3, 5), (6, 5), (4, 6)])  # fmt: skip
    keep = torch.rand(6, 5, generator=g) >= 0.3
    assert torch.autograd.gradcheck(lambda *t: _mix_experts_op(*t, keep, 1.5)[:2], (x, router, A, B))


# ---- a whole training step ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def same_length_data(tmp_path_factory) -> str:
    """8 samples of one length (one compiled shape), alternating knowledge (1) and downstream (0)."""
    path = tmp_path_factory.mktemp("data") / "same_length.jsonl"
    rows = [{"instruction": "Capital?", "input": f"land {i}", "output": f"city {i}", "task_type": i % 2} for i in range(8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_training_equals_eager(tiny_llama_dir, same_length_data, tmp_path, checkpointing):
    """`train(compile=True)`: the causal LM (LoRAMoE layers, attention, loss) runs as one graph with no graph
    break, the LBC is in the loss, and 3 steps land on the eager run's adapter within fp32 rounding (inductor
    sums in other orders; measured 3.7e-7). With gradient checkpointing the only break is PEFT's hook that
    makes the embeddings' output require grad: the checkpointed blocks compile too."""
    cfg = {"lora_dropout": 0.0, "gradient_checkpointing": checkpointing}
    eager = train(make_cfg(tiny_llama_dir, same_length_data, tmp_path / "eager", **cfg))
    counters.clear()
    compiled = train(make_cfg(tiny_llama_dir, same_length_data, tmp_path / "compiled", compile=True, **cfg))
    breaks = dict(counters["graph_break"])
    if checkpointing:
        assert breaks and all("requires_grad_" in reason for reason in breaks), breaks
    else:
        assert counters["stats"]["unique_graphs"] == 1 and not breaks, breaks
    for key in ("lm_loss", "blc_loss"):
        assert compiled.metrics[key] == pytest.approx(eager.metrics[key], rel=1e-5), key
    assert compiled.metrics["blc_loss"] > 0
    assert max_diff(adapter_tensors(tmp_path / "compiled"), adapter_tensors(tmp_path / "eager")) < 1e-5


def test_compile_with_fsdp_is_refused():
    with pytest.raises(ValueError, match="^compile: not supported with --fsdp"):
        TrainConfig(data=["x.jsonl"], compile=True, fsdp=True)


def test_compile_flag_reaches_the_config():
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    assert config_from_args(parser.parse_args(["--data", "x.jsonl", "--compile"])).compile is True
    assert config_from_args(parser.parse_args(["--data", "x.jsonl"])).compile is False
