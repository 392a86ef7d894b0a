"""Import adapters saved by the reference LoRAMoE code (PEFT-0.3 style, per-expert tensors, pickled) into this
project's format (stacked experts, safetensors), so users who trained with it can move over."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import LoraMoeConfig

_KEY = re.compile(r"^(?P<module>.+)\.(?:lora_A(?P<a>\d+)|lora_B(?P<b>\d+)|(?P<route>lora_route))\.weight$")


def _read_reference_weights(src: Path) -> dict[str, torch.Tensor]:
    if (src / "adapter_model.safetensors").is_file():
        return load_file(src / "adapter_model.safetensors")
    path = src / "adapter_model.bin"
    if not path.is_file():
        raise FileNotFoundError(f"{src}: neither adapter_model.bin nor adapter_model.safetensors found.")
    # A pickle from elsewhere: tensors only, never arbitrary objects.
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(state).__name__}.")
    return state


def convert_reference_state_dict(state: dict[str, torch.Tensor], num_experts: int) -> dict[str, torch.Tensor]:
    """Per-expert ``lora_A{i}`` (r x in), ``lora_B{i}`` (out x r), ``lora_route`` (N x in) -> stacked tensors."""
    modules: dict[str, dict] = {}
    for key, tensor in state.items():
        match = _KEY.match(key)
        if match is None:
            raise ValueError(f"Unexpected key {key!r} in the reference adapter (expected ...lora_A<i>/lora_B<i>/lora_route.weight).")
        entry = modules.setdefault(match["module"], {"A": {}, "B": {}, "route": None})
        if match["route"]:
            entry["route"] = tensor
        elif match["a"] is not None:
            entry["A"][int(match["a"])] = tensor
        else:
            entry["B"][int(match["b"])] = tensor

    out = {}
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


def import_official(src_dir: str | Path, dst_dir: str | Path) -> Path:
    """Convert a reference-code adapter directory into a LoRAMoE adapter that ``PeftModel.from_pretrained`` loads.

    The imported config keeps the reference training semantics (``blc_mode="reference"``, padding counted), so
    that continued training optimises what the original run did.
    """
    src, dst = Path(src_dir), Path(dst_dir)
    cfg_path = src / "adapter_config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: is {src} an adapter saved by the reference LoRAMoE code?")
    ref = json.loads(cfg_path.read_text())
    missing = [k for k in ("r", "lora_alpha", "lora_nums") if k not in ref]
    if missing:
        raise ValueError(f"{cfg_path}: missing keys {missing}; expected a reference LoRAMoE adapter_config.json.")
    n = int(ref["lora_nums"])
    targets = ref.get("target_modules") or ["gate_proj", "up_proj", "down_proj"]
    config = LoraMoeConfig(
        num_experts=n,
        r=int(ref["r"]),
        lora_alpha=float(ref["lora_alpha"]),
        lora_dropout=float(ref.get("lora_dropout", 0.0)),
        target_modules=list(targets) if isinstance(targets, list) else targets,
        knowledge_experts=n // 2,
        blc_alpha=float(ref.get("blc_alpha", 0.0)),
        blc_weight=float(ref.get("blc_weight", 0.0)),
        blc_count_padding=True,
        blc_mode="reference",
        base_model_name_or_path=ref.get("base_model_name_or_path"),
        task_type="CAUSAL_LM",
    )
    weights = convert_reference_state_dict(_read_reference_weights(src), n)

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        config.save_pretrained(str(tmp))
        save_file(weights, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        if dst.exists():
            shutil.rmtree(dst)
        tmp.rename(dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst


def configure_parser(parser) -> None:
    parser.add_argument("src", help="directory with adapter_config.json and adapter_model.bin from the reference code")
    parser.add_argument("dst", help="output adapter directory (adapter_config.json + adapter_model.safetensors)")


def run(args) -> int:
    dst = import_official(args.src, args.dst)
    print(f"wrote {dst}/adapter_config.json and {dst}/adapter_model.safetensors")
    return 0
