"""Tests of the vLLM plugin and `loramoe serve`, run in the vLLM venv (`.venv-vllm`, built by `.ci/run`), never in
the main one: `.venv-vllm/bin/python -m pytest tests_vllm`. Engines run in subprocesses, one at a time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from reference import Reference, peft_reference, save_smollm2, train_adapter  # noqa: E402

HERE = Path(__file__).parent
# One engine's memory: the weights plus this KV cache (GiB); vLLM's default would take a share of the machine's RAM.
ENGINE_ENV = {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
# vLLM's automatic CPU binding gives each worker a NUMA node; a 2-core machine has one, so bind by hand.
TP_BINDING = {2: "0|1"}
ENGINE_TIMEOUT = 900


def engine_env(tensor_parallel_size: int = 1) -> dict[str, str]:
    env = {**os.environ, **ENGINE_ENV}
    if tensor_parallel_size > 1:
        env["VLLM_CPU_OMP_THREADS_BIND"] = TP_BINDING[tensor_parallel_size]
    return env


def generate(tmp_path: Path, base: Path, adapter: Path | None, prompts: list[list[int]], max_tokens: int,
             logprobs: int = 5, tensor_parallel_size: int = 1) -> dict:  # fmt: skip
    """vLLM's greedy tokens (and top log-probabilities) for ``prompts`` (token ids), from `generate.py`."""
    request, out = tmp_path / "request.json", tmp_path / "out.json"
    request.write_text(json.dumps({"base": str(base), "adapter": str(adapter) if adapter else None, "prompts": prompts,
                                   "max_tokens": max_tokens, "logprobs": logprobs,
                                   "tensor_parallel_size": tensor_parallel_size}))  # fmt: skip
    proc = subprocess.run([sys.executable, str(HERE / "generate.py"), str(request), str(out)], env=engine_env(tensor_parallel_size),
                          capture_output=True, text=True, timeout=ENGINE_TIMEOUT)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-5000:]
    result = json.loads(out.read_text())
    result["logprobs"] = [[{int(t): lp for t, lp in step.items()} for step in steps] for steps in result["logprobs"]]
    return result


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> Path:
    return save_smollm2(tmp_path_factory.mktemp("smollm2"))


@pytest.fixture(scope="session")
def adapter(smollm2, tmp_path_factory) -> Path:
    return train_adapter(smollm2, tmp_path_factory.mktemp("adapter") / "turtles")


@pytest.fixture(scope="session")
def reference(smollm2, adapter) -> Reference:
    ref = peft_reference(smollm2, adapter)
    # The parity tests mean something only if the adapter changes what the base model says.
    changed = [a != b for a, b in zip(ref.tokens, ref.base_tokens)]
    assert all(changed), f"the trained adapter leaves prompts {[i for i, c in enumerate(changed) if not c]} unchanged"
    return ref
