"""`loramoe serve` end to end: vLLM's OpenAI-compatible server on 127.0.0.1 answers /v1/completions with the text
PEFT generates; a broken adapter is refused, by `loramoe serve` before vLLM starts and by the plugin inside a
server started by hand. And the loramoe command line does not import vLLM unless it serves."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

from safetensors.torch import load_file, save_file

from conftest import ENGINE_TIMEOUT, engine_env
from loramoe.vllm.adapter import AdapterPlan
from reference import NEW_TOKENS, PROMPTS

MISSING = AdapterPlan.key(7, "up_proj", "router")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())


def _wait_until_up(proc: subprocess.Popen, port: int, log) -> None:
    deadline = time.monotonic() + ENGINE_TIMEOUT
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the server exited with {proc.returncode}:\n{log.read_text()[-5000:]}"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(2)
    raise AssertionError(f"the server did not answer within {ENGINE_TIMEOUT} s:\n{log.read_text()[-5000:]}")


def test_server_answers_completions_with_the_reference_text(smollm2, adapter, reference, tmp_path):
    port, log = _free_port(), tmp_path / "server.log"
    # --enforce-eager (passed through to vLLM): its torch.compile of SmolLM2 takes minutes on 2 cores; the compiled
    # path's parity is reported by benchmarks/vllm_serving.py. Its own session: the server and its engine end together.
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "loramoe.cli", "serve", "--base", str(smollm2), "--adapter",
                                 str(adapter), "--port", str(port), "--max-model-len", "256", "--", "--enforce-eager"],
                                env=engine_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        _wait_until_up(proc, port, log)
        assert f"--host 127.0.0.1 --port {port}" in log.read_text()
        # All prompts in one request (one batch, as in the parity test); compared where PEFT's greedy path is decided
        # beyond the stated log-probability tolerance (a near tie may go either way in another batch).
        answer = _post(f"http://127.0.0.1:{port}/v1/completions",
                       {"model": adapter.name, "prompt": PROMPTS, "max_tokens": NEW_TOKENS, "min_tokens": NEW_TOKENS,
                        "temperature": 0})  # fmt: skip
        texts = {c["index"]: c["text"] for c in answer["choices"]}
        decided = [i for i in range(len(PROMPTS)) if reference.decided(i)]
        assert len(decided) >= 3, f"only prompts {decided} have a decided greedy path"
        assert [texts[i] for i in decided] == [reference.texts[i] for i in decided]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _broken_copy(adapter, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(adapter, broken)
    tensors = load_file(broken / "adapter_model.safetensors")
    del tensors[MISSING]
    save_file(tensors, broken / "adapter_model.safetensors")
    return broken


def test_serve_refuses_a_broken_adapter_before_starting_vllm(smollm2, adapter, tmp_path):
    broken = _broken_copy(adapter, tmp_path)
    proc = subprocess.run([sys.executable, "-m", "loramoe.cli", "serve", "--base", str(smollm2), "--adapter", str(broken)],
                          env=engine_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith(f"loramoe serve: error: {broken}/adapter_model.safetensors: tensor {MISSING} is missing")
    assert "starting:" not in proc.stdout


def test_a_server_started_by_hand_refuses_a_broken_adapter(smollm2, adapter, tmp_path):
    """The plugin checks again where the model is built: never a base model served silently."""
    broken = _broken_copy(adapter, tmp_path)
    overrides = {"architectures": ["LoraMoeLlamaForCausalLM"], "loramoe_adapter": str(broken)}
    proc = subprocess.run([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(smollm2),
                           "--hf-overrides", json.dumps(overrides), "--host", "127.0.0.1", "--port", str(_free_port()),
                           "--enforce-eager", "--max-model-len", "256"],
                          env=engine_env(), capture_output=True, text=True, timeout=ENGINE_TIMEOUT)  # fmt: skip
    assert proc.returncode != 0
    assert f"tensor {MISSING} is missing" in proc.stdout + proc.stderr


def test_the_command_line_imports_vllm_only_to_serve(smollm2, adapter):
    code = ("import sys; from loramoe import cli; from loramoe.vllm import serve, register; "
            f"cli.main(['eval', '--help']); serve.serve_command({str(smollm2)!r}, {str(adapter)!r}); "
            "assert 'vllm' not in sys.modules, 'vllm imported'")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], env=engine_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
