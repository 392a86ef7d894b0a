"""Smoke test of the benchmark harness: the tiny plan runs end to end and writes the documented schema.

Timings on minuscule shapes mean nothing and are not checked; the memory counters are deterministic and are.
"""

from __future__ import annotations

import json

import pytest
import torch
from benchmarks import run
from benchmarks.measure import peak_bytes, saved_tensor_bytes
from benchmarks.methods import METHODS


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "latest.json"
    threads = torch.get_num_threads()
    try:
        assert run.main(["--tiny", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    assert (out.parent / "latest.md").read_text().startswith("Command:")
    assert (out.parent / "time_vs_n.png").stat().st_size > 1000
    return json.loads(out.read_text())


def test_layer_cases_schema(results):
    assert len(results["layer"]) == 2
    for case in results["layer"]:
        assert {"n_experts", "tokens", "d_in", "d_out", "ms", "saved_bytes"} <= case.keys()
        for key in ("ms", "ms_forward", "saved_bytes", "peak_bytes"):
            assert set(case[key]) == set(METHODS)
        assert all(v > 0 for v in case["ms"].values())
        assert case["loop_vs_loramoe_rel_err"] < 1e-4
        assert case["saved_bytes"]["loramoe"] < case["saved_bytes"]["loop"]


def test_model_section_schema(results):
    model = results["model"]
    for key in ("train_step_ms", "generate_tokens_per_s", "saved_bytes", "peak_bytes"):
        assert set(model[key]) == set(METHODS)
    assert all(v > 0 for v in model["generate_tokens_per_s"].values())
    assert set(model["n_sweep"]["train_step_ms"]) == {"loramoe", "loop"}
    assert len(results["targets"]) == 7 and all(isinstance(t["met"], bool) for t in results["targets"])
    assert results["machine"]["torch_threads"] == 1


def test_saved_bytes_deduplicates_storages_and_skips_excluded():
    w = torch.randn(3, 4, requires_grad=True)
    x = torch.randn(5, 3, requires_grad=True)

    def forward():
        y = x @ w  # saves x (60 bytes) and w (excluded below)
        return (y * y).sum() + (y.view(-1) * y.view(-1)).sum()  # y (80 bytes) saved four times: counted once

    assert saved_tensor_bytes(forward, exclude=[w]) == (5 * 3 + 5 * 4) * 4
    assert saved_tensor_bytes(forward) == (5 * 3 + 5 * 4 + 3 * 4) * 4


def test_peak_bytes_counts_live_tensors_only():
    x = torch.randn(1000)

    def step():
        a = x * 2  # 4000 bytes
        b = a + 1  # 8000 live
        del a  # 4000
        return (b * 3).sum()  # b, b * 3 and the 4-byte sum: 8004 at the peak

    assert peak_bytes(step) == 8004
