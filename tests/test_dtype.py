"""`--dtype`: a bf16 base trains with fp32 adapters (master weights), and what it saves loads onto an fp32 base.
The layer's maths on a half-precision base against the per-expert loop: tests/test_layer.py."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from loramoe.loading import load_base_model, load_model
from loramoe.train import TrainConfig, config_from_args, configure_parser, train


@pytest.fixture(scope="module")
def eight_samples(tmp_path_factory) -> str:
    """Eight samples: with batch 8 every step sees all of them, so the step losses are comparable."""
    path = tmp_path_factory.mktemp("data") / "eight.jsonl"
    rows = [{"instruction": "Capital?", "input": f"land {i}", "output": f"city {i} is big", "task_type": i % 2}
            for i in range(8)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def cfg(model_dir, data, out, **overrides) -> TrainConfig:
    values = dict(model=str(model_dir), data=[data], output_dir=str(out), num_experts=4, r=2, lora_dropout=0.0,
                  max_seq_len=64, batch_size=8, max_steps=6, lr=2e-2, scheduler="constant", warmup_ratio=0.0,
                  progress=False, seed=0)
    return TrainConfig(**{**values, **overrides})


def test_bf16_base_trains_with_fp32_adapters_and_loads_on_fp32(tiny_llama_dir, eight_samples, tmp_path):
    losses = {}
    for dtype in ("float32", "bfloat16"):
        result = train(cfg(tiny_llama_dir, eight_samples, tmp_path / dtype, dtype=dtype))
        losses[dtype] = [json.loads(ln)["lm_loss"] for ln in (tmp_path / dtype / "metrics.jsonl").read_text().splitlines()]
    model = result.model
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    trained = {p.dtype for p in model.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trained == {torch.float32}  # fp32 master weights on a bf16 base
    bf16, fp32 = losses["bfloat16"], losses["float32"]
    assert len(bf16) == 6 and bf16[-1] < bf16[0] - 0.25, bf16  # it learns (seen: 5.58 -> 5.18)
    assert all(abs(a - b) < 0.03 * b for a, b in zip(bf16, fp32)), losses  # as on the fp32 base (seen: <= 1 %)
    saved = load_file(str(tmp_path / "bfloat16" / "adapter_model.safetensors"))
    assert {t.dtype for t in saved.values()} == {torch.float32}

    on_fp32 = load_model(str(tiny_llama_dir), adapter=str(tmp_path / "bfloat16"))  # an fp32 base, the saved adapter
    assert {p.dtype for p in on_fp32.parameters()} == {torch.float32}
    ids = torch.tensor([[5, 70, 71, 9, 33, 40, 41, 42]])
    with torch.no_grad():
        want = model(input_ids=ids).logits.float()
        got = on_fp32(input_ids=ids).logits
        base = load_base_model(str(tiny_llama_dir))(input_ids=ids).logits
    assert (got - want).norm() / want.norm() < 2e-2  # the same adapter; the bases differ by bf16 rounding
    assert (got - base).norm() / base.norm() > 0.05  # and the adapter does change the model (seen: ~0.3)


def test_dtype_refusals_and_flag(tiny_llama_dir, eight_samples, tmp_path):
    for bad, match in (
        (dict(dtype="float64"), r"^TrainConfig.dtype='float64' is invalid"),
        (dict(dtype="bfloat16", method="full"), r"^dtype: 'bfloat16' with method full"),
        (dict(dtype="bfloat16", quantize="nf4"), r"^dtype: 'bfloat16' with quantize 'nf4'"),
        (dict(dtype="float16", bf16=True), r"^dtype: 'float16' with --bf16"),
    ):
        with pytest.raises(ValueError, match=match):
            cfg(tiny_llama_dir, eight_samples, tmp_path / "x", **bad)
    fp32_model = load_base_model(str(tiny_llama_dir))
    with pytest.raises(ValueError, match=r"^dtype: the run says 'bfloat16' but the model given is float32"):
        train(cfg(tiny_llama_dir, eight_samples, tmp_path / "y", dtype="bfloat16"), model=fp32_model)
    import argparse

    parser = argparse.ArgumentParser()
    configure_parser(parser)
    args = parser.parse_args(["--data", eight_samples, "--dtype", "bfloat16", "--packing"])
    parsed = config_from_args(args)
    assert (parsed.dtype, parsed.packing) == ("bfloat16", True)
