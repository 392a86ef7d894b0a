"""Quantized bases (QLoRA-style): the frozen model in 4 bits (NF4 / FP4) or 8 bits (LLM.int8) with bitsandbytes,
the LoRAMoE experts in full precision beside it.

    model = load_base_model("path/or/smollm2", quantize="nf4")      # loramoe.loading; or `--quantize nf4`

The quantized linears come from transformers' own bitsandbytes integration (``from_pretrained(...,
quantization_config=BitsAndBytesConfig(...))``), so which modules get quantized (not ``lm_head``), how GPT-2's
``Conv1D`` is turned into a ``Linear4bit`` (transposed) and what the model records in ``config.json`` are the ones
every Hugging Face user gets. A LoRAMoE layer calls the quantized layer as its base: the base output comes from
bitsandbytes' kernel, the experts run in the adapter's dtype (fp32, or autocast's), and no dequantized copy of a
base weight is kept (bitsandbytes dequantizes block by block inside each call).

bitsandbytes is optional (``pip install "loramoe[quant]"``); nothing here imports it before it is needed.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import sys
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

QUANTIZE = ("nf4", "fp4", "int8")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
logger = logging.getLogger(__name__)
INSTALL_HINT = 'pip install "loramoe[quant]"  (bitsandbytes >= 0.47 runs on CPU; on CUDA any recent version)'


def _require_bitsandbytes(quantize: str) -> None:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(f"quantize={quantize!r} needs bitsandbytes, which is not installed: {INSTALL_HINT}")


def check_options(quantize: str | None, compute_dtype: str | None) -> None:
    """Refuse a combination that would not be applied (ValueError naming the option and what is expected)."""
    if quantize is not None and quantize not in QUANTIZE:
        raise ValueError(f"quantize: {quantize!r} is not a quantization (expected one of {QUANTIZE})")
    if compute_dtype is not None and compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(f"bnb_compute_dtype: {compute_dtype!r} is not a dtype (expected one of {COMPUTE_DTYPES})")
    if compute_dtype is not None and quantize not in ("nf4", "fp4"):
        raise ValueError(
            f"bnb_compute_dtype: set to {compute_dtype!r} with quantize={quantize!r} (expected it only with nf4 or "
            "fp4: 4-bit layers dequantize into it; int8 layers compute in their input's dtype)"
        )


def bnb_config(quantize: str, compute_dtype: str | None = None, dtype: torch.dtype = torch.float32) -> Any:
    """The ``BitsAndBytesConfig`` for ``quantize``; 4-bit matmuls run in ``compute_dtype`` (default: ``dtype``, the
    dtype of the model's unquantized parts, so that by default a layer computes in the precision its input has)."""
    check_options(quantize, compute_dtype)
    _require_bitsandbytes(quantize)
    from transformers import BitsAndBytesConfig

    if quantize == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantize,
        bnb_4bit_compute_dtype=getattr(torch, compute_dtype) if compute_dtype else dtype,
    )


def _device_map(device: str | torch.device | None) -> dict[str, str]:
    """Everything on one device: bitsandbytes quantizes while loading, on the device the model will run on."""
    return {"": str(torch.device(device)) if device is not None else "cpu"}


def load_quantized(path: str, quantize: str, compute_dtype: str | None = None, dtype: torch.dtype = torch.float32,
                   device: str | torch.device | None = None) -> nn.Module:  # fmt: skip
    """A Hugging Face model directory loaded with its linears quantized (``from_pretrained`` streams and quantizes
    tensor by tensor: no full-precision copy of the model is ever held)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, quantization_config=bnb_config(quantize, compute_dtype, dtype), device_map=_device_map(device)
    )
    return keep_weights_unpacked(_own_unquantized_tensors(model))


def quantize_model(model: nn.Module, quantize: str, compute_dtype: str | None = None,
                   device: str | torch.device | None = None) -> nn.Module:  # fmt: skip
    """A quantized copy of an in-memory (full-precision) Hugging Face model, built by transformers' own loader from
    the model's state dict, so that it is exactly what ``from_pretrained`` on a saved copy would give.

    This is how a GGUF base (``smollm2``) is quantized: transformers dequantizes GGUF files on load, and
    quantizing that in memory avoids writing a full-precision copy of the model to disk.
    """
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    dtype = next(p.dtype for p in model.parameters() if p.dtype.is_floating_point)
    quantized = type(model).from_pretrained(
        None, config=config, state_dict=model.state_dict(), dtype=dtype,
        quantization_config=bnb_config(quantize, compute_dtype, dtype), device_map=_device_map(device),
    )  # fmt: skip
    quantized.config.name_or_path = model.config.name_or_path
    return keep_weights_unpacked(_own_unquantized_tensors(quantized).train(model.training))


def _own_unquantized_tensors(model: nn.Module) -> nn.Module:
    """Give the parameters and buffers left in full precision (embeddings, norms, head) memory of their own.

    transformers leaves them as views of their source: the checkpoint's memory map (or, in `quantize_model`, the
    full-precision model's tensors). A view of the map keeps the whole file mapped, and the pages that
    quantization read (every full-precision weight) stay resident: measured, a 2-layer 2048/5632 Llama loaded in
    NF4 held 455 MB of file pages instead of 102 MB. Tied weights stay tied (one Parameter object, copied once).
    """
    with torch.no_grad():
        for param in model.parameters():
            if param.dtype.is_floating_point:
                param.data = param.data.clone()
        for module in model.modules():
            for name, buffer in module._buffers.items():
                if buffer is not None and buffer.dtype.is_floating_point:
                    module._buffers[name] = buffer.clone()
    return model


# ---- what a model holds ----------------------------------------------------------------------------------------


def _bnb() -> Any:
    """The bitsandbytes module if something has imported it (no quantized layer can exist otherwise), else None."""
    return sys.modules.get("bitsandbytes")


def layer_quantization(module: nn.Module) -> str | None:
    """``"nf4"``, ``"fp4"`` or ``"int8"`` for a bitsandbytes linear, else None."""
    bnb = _bnb()
    if bnb is None:
        return None
    if isinstance(module, bnb.nn.Linear4bit):
        return module.weight.quant_type
    if isinstance(module, bnb.nn.Linear8bitLt):
        return "int8"
    return None


def model_quantization(model: nn.Module) -> str | None:
    """The quantization of a model's bitsandbytes linears (the first one found), or None for a plain model."""
    return next((q for q in map(layer_quantization, model.modules()) if q is not None), None)


def check_base_layer(module: nn.Module, key: str) -> None:
    """Refuse, naming its type, a module the LoRAMoE layer cannot use as its frozen base.

    It needs a module that maps [..., in] to [..., out] when called and exposes in/out features: nn.Linear and
    transformers' Conv1D with floating-point weights, and bitsandbytes' Linear4bit and Linear8bitLt (which are
    nn.Linear subclasses). Other quantized linears (HQQ, GPTQ, AWQ, ...) store packed integers in their own
    formats; they are refused here rather than misread.
    """
    if layer_quantization(module) is not None:
        return
    weight = getattr(module, "weight", None)
    if isinstance(module, (nn.Linear, Conv1D)) and isinstance(weight, torch.Tensor) and weight.dtype.is_floating_point:
        return
    kind = type(module)
    found = f"{kind.__module__}.{kind.__qualname__}"
    if isinstance(weight, torch.Tensor):
        found += f" with a {weight.dtype} weight"
    raise TypeError(
        f"{key}: LoRAMoE cannot wrap a {found} (expected nn.Linear or transformers Conv1D with a floating-point "
        "weight, or a bitsandbytes Linear4bit (nf4/fp4) or Linear8bitLt (int8) quantized linear)"
    )


# ---- keeping the base's weights as they were loaded ------------------------------------------------------------


def keep_weights_unpacked(model: nn.Module) -> nn.Module:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference, and undo a repacking already done.

    bitsandbytes 0.50 repacks a ``Linear4bit``'s weight in place, on a CPU with AVX512-BF16, the first time the
    layer runs in eval mode without gradients, and rounds its scales (absmax) to bf16. ``state_dict()`` - which
    every ``save_pretrained`` calls, adapters included - converts the weight back, but leaves the scales of a
    single-quantized layer (the default, ``bnb_4bit_use_double_quant=False``) transposed: the live model's weights
    are scrambled, silently. That was the NF4 save/load mystery: the adapter saved and reloaded was exact, the
    trained model it was compared with had been corrupted by the save (tests/test_quantization.py pins it).
    Packed and unpacked weights also compute differently (bf16 scales), so eval logits would differ from the
    training-mode ones. Keeping the loaded format costs eval speed on such CPUs only; CUDA never repacks.
    """
    bnb = _bnb()
    if bnb is None:
        return model
    restored = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False  # the flag bitsandbytes' forward consults before repacking
            restored += _unpack_cpu_weight(module)
    if restored:
        logger.warning(
            "%d 4-bit layers had been repacked by bitsandbytes for CPU inference (an eval-mode forward without "
            "gradients ran before); restored, with their scales rounded to bf16 as the repacking left them. Load the "
            "base again before running it for results equal to a fresh load.", restored,
        )  # fmt: skip
    return model


def _unpack_cpu_weight(layer: nn.Module) -> int:
    """Convert a repacked weight back to bitsandbytes' loading format; return 1 if it had been repacked."""
    state = layer.weight.quant_state
    if not getattr(state, "packing_format_for_cpu", False):
        return 0
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    nested = state.original_nested
    data, state = _convert_weight_packed_for_cpu_inverse(layer.weight.data, state)
    if not nested:  # the inverse restores the scales only for double quantization; undo the transposition here
        state.absmax = state.absmax.T.reshape(-1).float()
    layer.weight.data, layer.weight.quant_state = data, state
    return 1


# ---- training --------------------------------------------------------------------------------------------------


def prepare_for_training(model: nn.Module, method: str, quantize: str | None,
                         compute_dtype: str | None = None) -> nn.Module:  # fmt: skip
    """Check that a base model is quantized as the run says, and prepare a quantized one for adapter training.

    The preparation is PEFT's ``prepare_model_for_kbit_training`` without its checkpointing part: every base
    parameter frozen, half-precision non-quantized ones (norms, embeddings, head) cast to fp32 so that the
    frozen parts around the quantized linears keep full precision. Input gradients (PEFT's
    ``enable_input_require_grads``) exist for *reentrant* checkpointing; loramoe uses non-reentrant
    checkpointing (reentrant would drop the LBC gradient), which needs none.
    """
    found = model_quantization(model)
    if found != quantize:
        raise ValueError(
            f"quantize: the run says {quantize!r} but the model given is {found or 'not quantized'} (expected a base "
            "loaded with loramoe.loading.load_base_model(..., quantize=...) or quantize_model(), or a matching setting)"
        )
    if found is None:
        return model
    if method == "full":
        raise ValueError(f"method: 'full' cannot train a {found} base (expected 'loramoe' or 'lora': quantized weights "
                         "are frozen integers)")  # fmt: skip
    if compute_dtype is not None:
        have = {str(m.compute_dtype).removeprefix("torch.") for m in model.modules() if hasattr(m, "compute_dtype")}
        if have != {compute_dtype}:
            raise ValueError(f"bnb_compute_dtype: the run says {compute_dtype!r} but the model's 4-bit layers compute in "
                             f"{sorted(have)} (expected them to match)")  # fmt: skip
    if hasattr(model, "peft_config"):  # a ready PeftModel: the base is frozen, its adapters are to be trained
        return keep_weights_unpacked(model)
    from peft import prepare_model_for_kbit_training

    return keep_weights_unpacked(prepare_model_for_kbit_training(model, use_gradient_checkpointing=False))


def add_cli_options(parser: Any) -> None:
    """``--quantize`` and ``--bnb-compute-dtype`` for commands that load a base model (eval, routes, reproduce)."""
    parser.add_argument("--quantize", choices=QUANTIZE, default=None,
                        help=f"load the base's linears quantized with bitsandbytes (QLoRA-style; {INSTALL_HINT})")
    parser.add_argument("--bnb-compute-dtype", choices=COMPUTE_DTYPES, default=None,
                        help="dtype the 4-bit (nf4/fp4) layers compute in (default: the model's dtype)")
