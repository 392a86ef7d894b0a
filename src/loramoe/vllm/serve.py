"""`loramoe serve`: vLLM's OpenAI-compatible server on a base model plus a LoRAMoE adapter.

It checks the base and the adapter first (as `loramoe eval` does, and tensor by tensor against the base's config,
see `plan_adapter`), so a mistake is one line rather than a worker's traceback after vLLM has started; then it
replaces itself with vLLM's own server process, printing the equivalent command for users who would rather run
vLLM directly:

    python -m vllm.entrypoints.openai.api_server --model BASE \\
        --hf-overrides '{"architectures": ["LoraMoeLlamaForCausalLM"], "loramoe_adapter": "/abs/ADAPTER"}' ...

The adapter is read where it is, as saved: no export step, nothing written. Options after ``--`` go to vLLM
unchanged (e.g. ``-- --tensor-parallel-size 2``).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import sys
from pathlib import Path

from ..errors import RunStopped
from ..loading import _loads, local_model_path, resolve_model_path
from .adapter import ADAPTER_KEY, ARCHITECTURES, base_architecture, plan_adapter

VLLM_SERVER = "vllm.entrypoints.openai.api_server"
BASE_EXPECTED = "expected a Hugging Face model folder, which vLLM loads as is"
INSTALL_HINT = "see README 'Serve it': a venv of its own, pip install -e '.[vllm]' torch==2.13.0"


def serve_command(base: str, adapter: str, host: str = "127.0.0.1", port: int = 8000, dtype: str = "auto",
                  max_model_len: int | None = None, served_model_name: str | None = None,
                  vllm_args: list[str] | None = None) -> list[str]:  # fmt: skip
    """The checked command line (``python -m vllm.entrypoints.openai.api_server ...``) that serves ``adapter`` on
    ``base`` (a Hugging Face model folder)."""
    from transformers import AutoConfig

    gguf = Path(resolve_model_path(base))
    if gguf.suffix == ".gguf" and gguf.is_file():
        raise ValueError(f"{gguf}: a GGUF file ({BASE_EXPECTED}; README 'Serve it' shows how to save one)")
    base_path = local_model_path(base, expected=BASE_EXPECTED, file_suffixes=())
    config = _loads(base_path, "model config", lambda: AutoConfig.from_pretrained(str(base_path)))
    arch = ARCHITECTURES[base_architecture(config)]
    plan = plan_adapter(adapter, config)
    overrides = {"architectures": [arch], ADAPTER_KEY: str(plan.path)}
    argv = [sys.executable, "-m", VLLM_SERVER, "--model", str(base_path.resolve()), "--hf-overrides",
            json.dumps(overrides), "--host", host, "--port", str(port), "--dtype", dtype,
            "--served-model-name", served_model_name or Path(adapter).resolve().name]  # fmt: skip
    if max_model_len is not None:
        argv += ["--max-model-len", str(max_model_len)]
    return argv + list(vllm_args or [])


def configure_parser(parser) -> None:
    parser.add_argument("--base", required=True, help="base model: a Hugging Face folder (Llama, Mistral or Qwen2)")
    parser.add_argument("--adapter", required=True,
                        help="LoRAMoE adapter folder (saved by loramoe, or by `loramoe import-official`)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="weights and experts dtype (auto: the base's config); router softmax is fp32 anyway")
    parser.add_argument("--max-model-len", type=int, default=None, help="longest prompt + completion, in tokens")
    parser.add_argument("--served-model-name", default=None,
                        help="the model name clients send (default: the adapter folder's name)")
    parser.add_argument("vllm_args", nargs="*", metavar="-- VLLM_OPTION",
                        help="after --: options passed to vLLM's server unchanged")


def run(args) -> int:
    argv = serve_command(args.base, args.adapter, args.host, args.port, args.dtype, args.max_model_len,
                         args.served_model_name, args.vllm_args)  # fmt: skip
    if importlib.util.find_spec("vllm") is None:  # after the checks: bad input is named wherever it is run
        raise RunStopped(f"vLLM is not installed in this Python ({sys.executable}); {INSTALL_HINT}")
    print(f"starting: {shlex.join(argv)}", flush=True)
    os.execv(argv[0], argv)
    return 0  # not reached: the server replaces this process
