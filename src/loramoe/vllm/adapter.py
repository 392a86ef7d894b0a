"""What vLLM will serve: a LoRAMoE adapter folder checked against the base model's config, tensor by tensor.

No vLLM import here: `loramoe serve` runs these checks before it starts a server (a mistake is one line, not a
worker's traceback a minute later), and the plugin runs them again where it builds the model, so a server started
by hand is held to the same rules. Whatever does not fit is refused by name; nothing falls back to the base model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from ..config import DEFAULT_TARGET_MODULES, LoraMoeConfig  # (importing loramoe registered the PEFT method)
from ..loading import check_adapter_dir

# The hf_config attribute that names the adapter folder (set with vLLM's --hf-overrides; see `serve_command`).
ADAPTER_KEY = "loramoe_adapter"
# Base architecture -> the plugin's architecture. Mistral is Llama's layout; vLLM gives it its own class.
ARCHITECTURES = {
    "LlamaForCausalLM": "LoraMoeLlamaForCausalLM",
    "MistralForCausalLM": "LoraMoeMistralForCausalLM",
    "Qwen2ForCausalLM": "LoraMoeQwen2ForCausalLM",
}
FFN = ("gate_proj", "up_proj", "down_proj")  # in the order the plugin stacks them
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PEFT's prefix of saved adapter keys


@dataclass(frozen=True)
class AdapterPlan:
    """A checked adapter: its shape and, per decoder layer, which FFN linears it adapts (in `FFN` order)."""

    path: Path
    num_experts: int
    r: int
    scaling: float
    targets: dict[int, tuple[str, ...]]

    @staticmethod
    def key(layer: int, linear: str, part: str) -> str:
        """The saved name of one tensor (``part``: A, B or router), as PEFT writes it."""
        return f"{PREFIX}model.layers.{layer}.mlp.{linear}.loramoe_{part}"

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the adapter (their names and shapes were checked by `plan_adapter`)."""
        return load_file(self.path / WEIGHTS)


def _text_config(hf_config: Any) -> Any:
    return hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config


def base_architecture(hf_config: Any) -> str:
    """The base model's architecture, checked to be one the plugin serves."""
    archs = list(getattr(hf_config, "architectures", None) or [])
    arch = next((a for a in archs if a in ARCHITECTURES or a in ARCHITECTURES.values()), None)
    if arch is None:
        raise ValueError(f"architectures={archs}: not served by the LoRAMoE vLLM plugin (supported: "
                         f"{', '.join(ARCHITECTURES)})")  # fmt: skip
    if getattr(_text_config(hf_config), "hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={hf_config.hidden_act!r}: the plugin's FFN is vLLM's SiLU-gated one (expected 'silu')")
    return arch


def _read_config(path: Path) -> Any:
    """The adapter's LoraMoeConfig; another PEFT method (a plain LoRA) is named, not misread."""
    cfg_path = path / "adapter_config.json"
    try:
        raw = json.loads(cfg_path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict) or raw.get("peft_type") != "LORAMOE":
        found = raw.get("peft_type") if isinstance(raw, dict) else type(raw).__name__
        raise ValueError(f"{cfg_path}: peft_type is {found!r} (expected 'LORAMOE'; vLLM serves plain LoRA adapters "
                         "itself, with --enable-lora)")  # fmt: skip
    try:
        return LoraMoeConfig.from_pretrained(str(path))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{cfg_path}: not a valid LoRAMoE config ({e})") from None


def _targets(config: Any, text_config: Any, cfg_path: Path) -> dict[int, tuple[str, ...]]:
    """Per layer, the FFN linears the config adapts, matched against the base's module names exactly as PEFT
    matches them when it loads the adapter; a target anywhere else (attention, lm_head) is refused by name."""
    from peft.tuners.tuners_utils import check_target_module_exists

    if config.target_modules is None:  # as `LoraMoeModel` resolves it when loading
        config.target_modules = set(DEFAULT_TARGET_MODULES.get(text_config.model_type, FFN))
    targets: dict[int, tuple[str, ...]] = {}
    outside = []
    for layer in range(text_config.num_hidden_layers):
        names = [f"model.layers.{layer}.self_attn.{n}" for n in ATTENTION] + [f"model.layers.{layer}.mlp.{n}" for n in FFN]
        hit = [n for n in names if check_target_module_exists(config, n)]  # excluded modules answer falsy
        outside += [n for n in hit if ".mlp." not in n]
        ffn = tuple(n.rsplit(".", 1)[1] for n in hit if ".mlp." in n)
        if ffn:
            targets[layer] = ffn
    if check_target_module_exists(config, "lm_head"):
        outside.append("lm_head")
    if outside:
        more = f" (and {len(outside) - 1} more)" if len(outside) > 1 else ""
        raise ValueError(f"{cfg_path}: target_modules adapts {outside[0]}{more}, outside the feed-forward block "
                         f"(the vLLM plugin serves LoRAMoE on {', '.join(FFN)} only)")  # fmt: skip
    if not targets:
        raise ValueError(f"{cfg_path}: target_modules={sorted(config.target_modules)} adapts no FFN linear of the "
                         f"base ({text_config.num_hidden_layers} layers; expected some of {', '.join(FFN)})")  # fmt: skip
    return targets


def _check_tensors(weights: Path, plan: AdapterPlan, text_config: Any) -> None:
    """Every expected tensor present with its expected shape, and nothing else (names from the file's header)."""
    n, r = plan.num_experts, plan.r
    hidden, inner = text_config.hidden_size, text_config.intermediate_size
    dims = {"gate_proj": (hidden, inner), "up_proj": (hidden, inner), "down_proj": (inner, hidden)}
    expected: dict[str, tuple[int, ...]] = {}
    for layer, linears in plan.targets.items():
        for linear in linears:
            d_in, d_out = dims[linear]
            shapes = {"A": (n * r, d_in), "B": (d_out, n * r), "router": (n, d_in)}
            expected.update({plan.key(layer, linear, part): shape for part, shape in shapes.items()})
    try:
        with safe_open(str(weights), "pt") as f:
            found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{weights}: not a readable safetensors file ({e})") from None
    missing = sorted(set(expected) - set(found))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"{weights}: tensor {missing[0]} is missing{more} (the config adapts it: num_experts={n}, "
                         f"r={r}, target_modules={sorted(_names(plan))})")  # fmt: skip
    extra = sorted(set(found) - set(expected))
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise ValueError(f"{weights}: unexpected tensor {extra[0]}{more} (the config does not adapt it; expected only "
                         f"the experts and routers of {sorted(_names(plan))})")  # fmt: skip
    for key, shape in expected.items():
        if found[key] != shape:
            raise ValueError(f"{weights}: tensor {key} has shape {list(found[key])} (expected {list(shape)} for "
                             f"num_experts={n}, r={r} on this base)")  # fmt: skip


def _names(plan: AdapterPlan) -> set[str]:
    return {linear for linears in plan.targets.values() for linear in linears}


def plan_adapter(adapter: str | Path, hf_config: Any) -> AdapterPlan:
    """Check ``adapter`` (a folder saved by loramoe or ``loramoe import-official``) against the base's config."""
    path = check_adapter_dir(adapter)
    weights = path / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: not found (the plugin reads safetensors only; re-save an "
                                "adapter_model.bin with save_pretrained or `loramoe import-official`)")  # fmt: skip
    base_architecture(hf_config)
    config = _read_config(path)
    cfg_path = path / "adapter_config.json"
    if config.modules_to_save:
        raise ValueError(f"{cfg_path}: modules_to_save={list(config.modules_to_save)} (whole modules trained with "
                         "the adapter) cannot be served by the plugin, which adds FFN experts only")  # fmt: skip
    text_config = _text_config(hf_config)
    plan = AdapterPlan(path.resolve(), config.num_experts, config.r, config.scaling, _targets(config, text_config, cfg_path))
    _check_tensors(weights, plan, text_config)
    return plan
