"""`loramoe reproduce --sweep`: a two-point sweep at toy size (outputs' schema, resume skips finished runs, a
changed configuration is refused) and the summary numbers by hand."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from conftest import toy_pretrain_config
from loramoe.reproduce import pipeline, sweep
from loramoe.reproduce.pipeline import Plan, train_config
from loramoe.reproduce.presets import tiny_preset
from loramoe.reproduce.tasks import FAMILIES

TOY = toy_pretrain_config()


@pytest.fixture(scope="module")
def toy_preset(toy_base):
    path = toy_base[0]
    return tiny_preset(path, downstream_per_family=4, test_per_family=2, batch_size=4, eval_batch_size=16,
                       max_new_tokens=4, scales=(1, 2))  # fmt: skip


@pytest.fixture
def counted_train(monkeypatch):
    """The sweep's training (pipeline.train) wrapped: counts calls; ``fail_at`` = the call number that raises (an interrupted sweep)."""
    state = {"calls": 0, "fail_at": None}
    real = pipeline.train

    def wrapped(cfg, **kwargs):
        state["calls"] += 1
        if state["calls"] == state["fail_at"]:
            raise KeyboardInterrupt
        return real(cfg, **kwargs)

    monkeypatch.setattr(pipeline, "train", wrapped)
    monkeypatch.setitem(sweep.SWEEPS, "experts", ("experts N (K = N/2)", [{"num_experts": 2}, {"num_experts": 4}]))
    return state


def test_two_point_sweep_schema_and_resume(toy_preset, tmp_path, counted_train):
    out = tmp_path / "sweep_experts"
    quiet = {"steps": 1, "log": lambda line: None}
    counted_train["fail_at"] = 2
    with pytest.raises(KeyboardInterrupt):
        sweep.run_sweep("experts", toy_preset, out, seeds=[0], **quiet)
    assert sorted(p.name for p in (out / "results").iterdir()) == ["num_experts2_seed0.json"]
    partial = json.loads((out / "sweep.json").read_text())  # written after the first finished run
    assert [r["seeds_done"] for r in partial["settings"]] == [[0], []]

    counted_train.update(calls=0, fail_at=None)
    sweep.run_sweep("experts", toy_preset, out, seeds=[0], **quiet)
    assert counted_train["calls"] == 1  # only N=4 was left
    counted_train["calls"] = 0
    summary = sweep.run_sweep("experts", toy_preset, out, seeds=[0, 1], **quiet)
    assert counted_train["calls"] == 2  # seed 1 of both settings; seed 0 is read back

    saved = json.loads((out / "sweep.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    assert saved["sweep"] == "experts" and saved["seeds"] == [0, 1] and saved["scale"] == 2 and saved["steps"] == 1
    assert saved["downstream_tasks"] == list(FAMILIES)
    assert [r["setting"] for r in saved["settings"]] == ["N=2", "N=4"]
    for row in saved["settings"]:
        assert row["method"] == "loramoe_lbc" and row["seeds_done"] == [0, 1]
        for key in ("world_knowledge", "downstream_mean", "average", "routing_gap", "wall_seconds"):
            assert key in row and key + "_std" in row and row[key + "_std"] >= 0
        assert 0 <= row["world_knowledge"] <= 1 and -1 <= row["routing_gap"] <= 1
        assert row["average"] == pytest.approx((row["world_knowledge"] + row["downstream_mean"]) / 2)
    # N experts of rank r on the FFN linears + a router (N x in) each: parameters grow linearly in N
    p2, p4 = (r["trainable_params"] for r in saved["settings"])
    ffn = (32 + 48) + (32 + 48) + (48 + 32)  # (in + out) of gate, up, down per layer, for one rank-1 expert
    router_in = 32 + 32 + 48
    assert p4 - p2 == 2 * TOY.num_layers * (toy_preset.r * ffn + router_in)
    run = json.loads((out / "results" / "num_experts4_seed1.json").read_text())
    assert run["train_config"]["num_experts"] == 4 and run["train_config"]["seed"] == 1
    assert set(run["inputs"]["data_sha256"]) == {"knowledge_train.jsonl", "downstream_x2.jsonl"}
    md = (out / "sweep.md").read_text()
    assert "| N=2 | loramoe_lbc | 2 |" in md and "| base model |" in md
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"

    with pytest.raises(ValueError, match=r"num_experts2_seed0.json.*different training configuration"):
        sweep.run_sweep("experts", toy_preset, out, seeds=[0], steps=2, log=lambda line: None)
    base, tokenizer = toy_preset.load()
    with torch.no_grad():
        base.lm_head.weight[0, 0] += 1.0  # the same path, other weights: a re-trained base

    with pytest.raises(ValueError, match=r"num_experts2_seed0.json.*another base model"):
        sweep.run_sweep("experts", replace(toy_preset, load=lambda: (base, tokenizer)), out, seeds=[0], **quiet)
    assert counted_train["calls"] == 2


def test_lbc_sweep_turns_the_lbc_off_at_beta_zero(toy_preset, tmp_path):
    points = sweep.settings("lbc", toy_preset)
    assert [p.label for p in points] == ["beta=0, delta=0", "beta=0.1, delta=0.1", "beta=0.3, delta=0.1",
                                         "beta=0.1, delta=0.3"]  # fmt: skip
    assert [p.method for p in points] == ["loramoe", "loramoe_lbc", "loramoe_lbc", "loramoe_lbc"]
    data = type("D", (), {"train_files": {2: []}})()
    cfgs = [train_config(Plan(p.preset, tmp_path, [0], [2], [p.method]), p.method, 2, p.preset.lr_adapter, 0, data, 1)
            for p in points]
    assert [(c.blc_weight, c.blc_alpha) for c in cfgs] == [(0.0, 0.0), (0.1, 0.1), (0.3, 0.1), (0.1, 0.3)]
    assert [p.key for p in sweep.settings("rank", toy_preset)] == ["r2", "r4", "r8", "r16"]
    with pytest.raises(ValueError, match="Unknown sweep 'depth'"):
        sweep.settings("depth", toy_preset)


def test_summary_numbers_by_hand():
    def run(seed, wk, a, b, share_wk, share_a, share_b):
        return {"seed": seed, "scores": {"world_knowledge": wk, "a": a, "b": b}, "trainable_params": 7,
                "knowledge_share": {"world_knowledge_in_format": share_wk, "a": share_a, "b": share_b},
                "train_seconds": 1.0, "wall_seconds": 2.0 + seed}  # fmt: skip

    point = sweep.Setting("N=2", {"num_experts": 2}, None, "loramoe_lbc")
    point2 = sweep.Setting("N=4", {"num_experts": 4}, None, "loramoe_lbc")
    done = {("num_experts2", 0): run(0, 0.8, 0.4, 0.2, 0.7, 0.5, 0.3), ("num_experts2", 1): run(1, 0.6, 0.6, 0.4, 0.6, 0.5, 0.5)}
    meta = {"seeds": [0, 1], "downstream_tasks": ["a", "b"], "base_scores": {"world_knowledge": 0.9, "a": 0.1, "b": 0.3}}
    s = sweep.summarise(meta, [point, point2], done)
    row, empty = s["settings"]
    # seed 0: ds 0.3, avg 0.55, gap 0.7 - 0.4 = 0.3; seed 1: ds 0.5, avg 0.55, gap 0.6 - 0.5 = 0.1
    assert row["world_knowledge"] == pytest.approx(0.7) and row["world_knowledge_std"] == pytest.approx(0.1414214)
    assert row["downstream_mean"] == pytest.approx(0.4) and row["average"] == pytest.approx(0.55)
    assert row["average_std"] == pytest.approx(0.0, abs=1e-12)
    assert row["routing_gap"] == pytest.approx(0.2) and row["routing_gap_std"] == pytest.approx(0.1414214)
    assert row["wall_seconds"] == pytest.approx(2.5) and row["trainable_params"] == 7
    assert row["downstream"] == pytest.approx({"a": 0.5, "b": 0.3})
    assert empty["seeds_done"] == [] and "average" not in empty
    assert s["base"] == pytest.approx({"world_knowledge": 0.9, "downstream_mean": 0.2})
    md = sweep.to_markdown({**s, "varies": "N", "preset": "t", "scale": 8, "steps": 3})
    assert "| N=2 | loramoe_lbc | 2 | 7 | 70.0 ± 14.1 | 40.0 ± 14.1 | 55.0 ± 0.0 | 20.0 ± 14.1 |" in md
    assert "| N=4 | loramoe_lbc | 0 | — | — |" in md
    assert "| N=2 | 50.0 | 30.0 |" in md
