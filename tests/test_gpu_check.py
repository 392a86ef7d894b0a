"""The prepared GPU check (benchmarks/gpu_check.py) in its reduced CPU mode, as CI runs it, so it cannot rot:
every section runs (or says why not) and the parity sections pass."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_reduced_gpu_check_writes_every_section(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--out", str(tmp_path), "--reduced"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["ok"] is True and report["complete"] is True and report["plan"]["reduced"] is True
    for name in ("environment", "parity", "layer_benchmark", "compile_layer"):
        assert report[name]["status"] == "passed", (name, report[name])
    for mode in ("fp32", "bf16_autocast"):
        errors = report["parity"]["relative_error"][mode]
        assert set(errors) == {"y", "lbc", "grad_x", "grad_A", "grad_B", "grad_router"}
        assert max(errors.values()) < report["parity"]["limits"][mode]
        assert report["parity"]["lbc"][mode]["fused"] > 0  # the LBC was computed on real router weights
        assert set(report["compile_layer"]["relative_error_vs_eager"][mode]) == set(errors)
    cases = report["layer_benchmark"]["cases"]
    assert [(c["tokens"], c["mode"]) for c in cases] == [(32, "fp32"), (32, "bf16 autocast"), (64, "fp32"),
                                                          (64, "bf16 autocast")]  # fmt: skip
    for case in cases:
        assert set(case["ratios"]) == {"loramoe/base", "loramoe/lora", "loramoe/loop"}
        assert set(case["peak_mib"]) == {"base", "lora", "loramoe", "loop"}
    assert set(report["compile_layer"]["timing"]["ratios"]) >= {"loramoe compiled/loramoe eager"}
    if importlib.util.find_spec("bitsandbytes"):
        nf4 = report["nf4"]
        assert nf4["status"] == "passed" and nf4["zero_b_logits_equal_base"] and nf4["reloaded_logits_equal_trained"]
    else:
        assert report["nf4"]["status"].startswith("skipped: bitsandbytes is not importable")
    packed = report["train_packed"]
    assert packed["status"] == "passed" or packed["status"].startswith("skipped: packing not available"), packed
    if packed["status"] == "passed":
        assert packed["tokens_per_s"] > 0 and len(packed["lm_loss"]) == report["plan"]["steps"]
    assert report["train_compile"]["status"].startswith("skipped: reduced mode")
