"""Greedy generation with vLLM's offline engine, in a process of its own (the tests never hold an engine, and no
two engines run at once): ``python generate.py REQUEST.json OUT.json``.

REQUEST: {"base": folder, "adapter": folder or null, "prompts": [[token ids], ...], "max_tokens": int,
          "logprobs": int, "tensor_parallel_size": int}
OUT:     {"tokens": [[ids], ...], "logprobs": [[{token id: logprob}, ...], ...]}
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(request_path: str, out_path: str) -> None:
    from transformers import AutoConfig
    from vllm import LLM, SamplingParams

    from loramoe.vllm.adapter import ADAPTER_KEY, ARCHITECTURES

    req = json.loads(Path(request_path).read_text())
    overrides = None
    if req["adapter"]:
        arch = ARCHITECTURES[AutoConfig.from_pretrained(req["base"]).architectures[0]]
        overrides = {"architectures": [arch], ADAPTER_KEY: req["adapter"]}
    llm = LLM(model=req["base"], dtype="float32", max_model_len=256, enforce_eager=True, seed=0,
              tensor_parallel_size=req["tensor_parallel_size"], hf_overrides=overrides)  # fmt: skip
    params = SamplingParams(temperature=0, max_tokens=req["max_tokens"], min_tokens=req["max_tokens"],
                            logprobs=req["logprobs"])  # fmt: skip
    outs = llm.generate([{"prompt_token_ids": ids} for ids in req["prompts"]], params)
    result = {"tokens": [list(o.outputs[0].token_ids) for o in outs],
              "logprobs": [[{t: lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs] for o in outs]}  # fmt: skip
    Path(out_path).write_text(json.dumps(result))


if __name__ == "__main__":  # vLLM spawns its workers: the engine must not start on import
    main(*sys.argv[1:])
