"""Layer level: one frozen linear with each method around it, forward+backward (training) and forward (inference)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .measure import peak_bytes, saved_tensor_bytes, time_interleaved
from .methods import METHODS, build_layer

PAIRS = [("loramoe", "base"), ("loramoe", "lora"), ("loramoe", "loop"), ("lora", "base"), ("loop", "base")]


@dataclass(frozen=True)
class LayerCase:
    n_experts: int
    tokens: int
    d_in: int
    d_out: int
    r: int = 4
    dropout: float = 0.05


def _zero_grads(module: nn.Module, x: torch.Tensor) -> None:
    x.grad = None
    for p in module.parameters():
        p.grad = None


def run_layer_case(case: LayerCase, rounds: int, min_seconds: float) -> dict:
    """Time, count saved bytes and peak memory of every method on one case; check loramoe == loop first."""
    torch.manual_seed(0)
    base = nn.Linear(case.d_in, case.d_out, bias=False).requires_grad_(False)
    layers = {m: build_layer(m, base, case.n_experts, case.r, case.dropout) for m in METHODS}
    # x requires grad, as inside a network whose earlier layers carry adapters too.
    x = torch.randn(1, case.tokens, case.d_in, requires_grad=True)
    grad = torch.randn(1, case.tokens, case.d_out)

    with torch.no_grad():
        for layer in layers.values():
            layer.eval()
        ref, fused = layers["loop"](x), layers["loramoe"](x)
        err = ((fused - ref).norm() / ref.norm()).item()
        if err > 1e-4:
            raise AssertionError(f"loramoe and loop disagree on {case}: relative error {err:.2e}")

    def forward(layer: nn.Module):
        def run() -> None:
            with torch.no_grad():
                layer(x)
        return run

    forward_timing = time_interleaved({m: forward(layers[m]) for m in METHODS}, rounds, min_seconds, PAIRS)

    def train_step(layer: nn.Module):
        def run() -> None:
            _zero_grads(layer, x)
            layer(x).backward(grad)
        return run

    for layer in layers.values():
        layer.train()
    timing = time_interleaved({m: train_step(layers[m]) for m in METHODS}, rounds, min_seconds, PAIRS)
    frozen = [base.weight]
    saved = {m: saved_tensor_bytes(lambda m=m: layers[m](x), frozen + list(layers[m].parameters())) for m in METHODS}
    peak = {m: peak_bytes(train_step(layers[m])) for m in METHODS}
    return {
        "n_experts": case.n_experts,
        "tokens": case.tokens,
        "d_in": case.d_in,
        "d_out": case.d_out,
        "r": case.r,
        "dropout": case.dropout,
        "ms": timing.ms,
        "ratios": timing.ratios,
        "ms_forward": forward_timing.ms,
        "ratios_forward": forward_timing.ratios,
        "saved_bytes": saved,
        "peak_bytes": peak,
        "rounds": timing.rounds,
        "loop_vs_loramoe_rel_err": err,
    }
