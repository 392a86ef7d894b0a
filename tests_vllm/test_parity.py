"""vLLM with the LoRAMoE plugin computes what transformers + PEFT computes: SmolLM2 + an adapter trained by loramoe
(which changes every greedy continuation, see conftest), 5 prompts x 32 greedy tokens in fp32; and tiny random
Qwen2 / Mistral models, Qwen2 split over two tensor-parallel ranks."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, MistralConfig, Qwen2Config

import loramoe
from conftest import generate
from reference import LOGPROB_TOL, NEW_TOKENS, PROMPTS


def test_greedy_tokens_and_logprobs_equal_peft(smollm2, adapter, reference, tmp_path):
    out = generate(tmp_path, smollm2, adapter, reference.prompt_ids, NEW_TOKENS)
    assert out["tokens"] == reference.tokens
    worst = 0.0
    for steps, ref in zip(out["logprobs"], reference.logprobs):
        for step, (top, ref_step) in enumerate(zip(steps, ref)):
            for token, logprob in top.items():
                worst = max(worst, abs(logprob - ref_step[token].item()))
                assert abs(logprob - ref_step[token].item()) < LOGPROB_TOL, (step, token)
    print(f"largest log-probability difference vLLM vs PEFT over {len(PROMPTS)} x {NEW_TOKENS} steps: {worst:.2e}")


def _tiny(arch: str, path, seed: int = 0):
    """A random tiny model vLLM's CPU attention runs (head size 64) with SmolLM2's vocabulary, and a random adapter
    strong enough to change its output."""
    torch.manual_seed(seed)
    config_cls, model_cls = {"qwen2": (Qwen2Config, "Qwen2ForCausalLM"), "mistral": (MistralConfig, "MistralForCausalLM")}[arch]
    config = config_cls(vocab_size=49152, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
                        architectures=[model_cls])  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(path / "base")
    model = AutoModelForCausalLM.from_pretrained(path / "base", dtype=torch.float32)
    peft = get_peft_model(model, loramoe.LoraMoeConfig(num_experts=3, r=2, init_weights=False, lora_dropout=0.0))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "loramoe_B" in name:
                p.mul_(10)
    peft.save_pretrained(path / "adapter")
    return path / "base", path / "adapter"


@pytest.mark.parametrize("arch,tp", [("qwen2", 2), ("mistral", 1)])
@torch.no_grad()
def test_other_architectures_and_tensor_parallelism(arch, tp, smollm2, tmp_path):
    base, adapter = _tiny(arch, tmp_path)
    AutoTokenizer.from_pretrained(smollm2).save_pretrained(base)  # vLLM loads a tokenizer with the model
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter).eval()
    prompts = [[1, 504, 3575, 282, 4649, 314], [3, 7, 11, 13, 17]]
    expected, unadapted = [], []
    for ids in prompts:
        kwargs = dict(input_ids=torch.tensor([ids]), max_new_tokens=16, min_new_tokens=16, do_sample=False)
        expected.append(model.generate(**kwargs)[0, len(ids) :].tolist())
        with model.disable_adapter():
            unadapted.append(model.generate(**kwargs)[0, len(ids) :].tolist())
    assert all(a != b for a, b in zip(expected, unadapted))
    assert generate(tmp_path, base, adapter, prompts, 16, tensor_parallel_size=tp)["tokens"] == expected
