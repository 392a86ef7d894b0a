"""Import adapters saved by the reference LoRAMoE code (PEFT-0.3 style, per-expert tensors, pickled) into this
project's format (stacked experts, safetensors), so users who trained with it can move over.

Modules the reference run trained whole (``modules_to_save``, e.g. ``lm_head``) are carried over as PEFT's
``modules_to_save``. The destination follows `loramoe.outputs`: never the source folder, never a folder with
files loramoe did not write, and an earlier import is replaced only with ``overwrite``."""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .config import LoraMoeConfig
from .outputs import OutputDir

_KEY = re.compile(r"^(?P<module>.+)\.(?:lora_A(?P<a>\d+)|lora_B(?P<b>\d+)|(?P<route>lora_route))\.weight$")
_SAVED = re.compile(r"\.modules_to_save(?:\.default)?\.")  # how PEFT versions name a module trained whole


def _read_reference_weights(src: Path) -> dict[str, torch.Tensor]:
    if (src / "adapter_model.safetensors").is_file():
        return load_file(src / "adapter_model.safetensors")
    path = src / "adapter_model.bin"
    if not path.is_file():
        raise FileNotFoundError(f"{src}: neither adapter_model.bin nor adapter_model.safetensors found (expected "
                                "the weights file beside adapter_config.json)")  # fmt: skip
    # A pickle from elsewhere: tensors only, never arbitrary objects.
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(
            f"{path}: refused: the pickle holds objects other than tensors, and loading them could run code "
            "(expected a plain state dict of tensors; if you trust the file, re-save its tensors as safetensors)"
        ) from None
    except (EOFError, RuntimeError) as e:
        raise ValueError(f"{path}: not a readable PyTorch file ({e}) (expected the reference code's adapter_model.bin)") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(state).__name__}.")
    return state


def convert_reference_state_dict(state: dict[str, torch.Tensor], num_experts: int,
                                 modules_to_save: list[str] | None = None) -> dict[str, torch.Tensor]:  # fmt: skip
    """Per-expert ``lora_A{i}`` (r x in), ``lora_B{i}`` (out x r), ``lora_route`` (N x in) -> stacked tensors.
    Tensors of ``modules_to_save`` modules keep PEFT's saved name (``...lm_head.weight``)."""
    modules: dict[str, dict] = {}
    out = {}
    for key, tensor in state.items():
        match = _KEY.match(key)
        saved = _SAVED.sub(".", key)
        if match is None and any(f".{m}." in f".{saved}" for m in modules_to_save or []):
            out[saved] = tensor.contiguous()
            continue
        if match is None:
            raise ValueError(f"{key}: unexpected key in the reference adapter (expected ...lora_A<i>/lora_B<i>/"
                             "lora_route.weight, or a module listed in its config's modules_to_save)")  # fmt: skip
        entry = modules.setdefault(match["module"], {"A": {}, "B": {}, "route": None})
        if match["route"]:
            entry["route"] = tensor
        elif match["a"] is not None:
            entry["A"][int(match["a"])] = tensor
        else:
            entry["B"][int(match["b"])] = tensor

    for module, entry in sorted(modules.items()):
        for part in ("A", "B"):
            if sorted(entry[part]) != list(range(num_experts)):
                raise ValueError(
                    f"{module}: lora_{part} experts {sorted(entry[part])} found, expected 0..{num_experts - 1} (lora_nums={num_experts})."
                )
        if entry["route"] is None or entry["route"].shape[0] != num_experts:
            raise ValueError(f"{module}: lora_route.weight missing or not {num_experts} x in_features.")
        out[f"{module}.loramoe_A"] = torch.cat([entry["A"][i] for i in range(num_experts)], dim=0).contiguous()
        out[f"{module}.loramoe_B"] = torch.cat([entry["B"][i] for i in range(num_experts)], dim=1).contiguous()
        out[f"{module}.loramoe_router"] = entry["route"].contiguous()
    return out


def _field(ref: dict[str, Any], key: str, kind: type, where: Path, default: Any = None) -> Any:
    """``ref[key]`` as ``kind`` (int or float); a missing or null key takes ``default`` (none: it is required)."""
    expected = "an integer" if kind is int else "a number"
    value = ref.get(key)
    if value is None:
        if default is None:
            raise ValueError(f"{where}: {key!r} is {'null' if key in ref else 'missing'} (expected {expected}; "
                             "is this an adapter_config.json of the reference LoRAMoE code?)")  # fmt: skip
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise ValueError(f"{where}: {key!r} is {value!r} (expected {expected})")
    return kind(value)


def reference_config(src: Path) -> LoraMoeConfig:
    """The LoRAMoE config of a reference adapter folder, keeping the reference training semantics
    (``blc_mode="reference"``, padding counted) so that continued training optimises what the original run did."""
    cfg_path = src / "adapter_config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: not found (is {src} an adapter saved by the reference LoRAMoE code?)")
    try:
        ref = json.loads(cfg_path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(ref, dict):
        raise ValueError(f"{cfg_path}: expected a JSON object, found {type(ref).__name__}")
    n = _field(ref, "lora_nums", int, cfg_path)
    targets = ref.get("target_modules") or ["gate_proj", "up_proj", "down_proj"]
    saved = ref.get("modules_to_save")
    if saved is not None and not (isinstance(saved, list) and all(isinstance(m, str) for m in saved)):
        raise ValueError(f"{cfg_path}: 'modules_to_save' is {saved!r} (expected a list of module names or null)")
    return LoraMoeConfig(
        num_experts=n,
        r=_field(ref, "r", int, cfg_path),
        lora_alpha=_field(ref, "lora_alpha", float, cfg_path),
        lora_dropout=_field(ref, "lora_dropout", float, cfg_path, 0.0),
        target_modules=list(targets) if isinstance(targets, list) else targets,
        knowledge_experts=n // 2,
        blc_alpha=_field(ref, "blc_alpha", float, cfg_path, 0.0),
        blc_weight=_field(ref, "blc_weight", float, cfg_path, 0.0),
        blc_count_padding=True,
        blc_mode="reference",
        modules_to_save=list(saved) if saved else None,
        base_model_name_or_path=ref.get("base_model_name_or_path"),
        task_type="CAUSAL_LM",
    )


def import_official(src_dir: str | Path, dst_dir: str | Path, overwrite: bool = False) -> Path:
    """Convert a reference-code adapter directory into a LoRAMoE adapter that ``PeftModel.from_pretrained`` loads
    (see the module docstring); ``overwrite`` replaces an adapter loramoe imported there before."""
    src, dst = Path(src_dir), Path(dst_dir)
    if not src.is_dir():
        raise (NotADirectoryError if src.exists() else FileNotFoundError)(
            f"{src}: not a folder (expected the reference adapter's folder: adapter_config.json + adapter_model.bin)")
    out = OutputDir(dst, "DST", {"SRC": src}, owner="import-official")
    config = reference_config(src)
    weights = convert_reference_state_dict(_read_reference_weights(src), config.num_experts, config.modules_to_save)
    if out.owned() and not overwrite:
        raise FileExistsError(f"{dst}: holds an earlier import (expected --overwrite to replace it, or another DST)")
    out.create().remove_owned()
    staging = out.staging()
    config.save_pretrained(str(staging))
    save_file(weights, str(staging / "adapter_model.safetensors"), metadata={"format": "pt"})
    out.publish(staging)
    return dst


def configure_parser(parser) -> None:
    parser.add_argument("src", help="directory with adapter_config.json and adapter_model.bin from the reference code")
    parser.add_argument("dst", help="output adapter directory (adapter_config.json + adapter_model.safetensors)")
    parser.add_argument("--overwrite", action="store_true", help="replace an adapter imported into DST before")


def run(args) -> int:
    dst = import_official(args.src, args.dst, overwrite=args.overwrite)
    print(f"wrote {dst}/adapter_config.json and {dst}/adapter_model.safetensors")
    return 0
