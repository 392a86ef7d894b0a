"""loramoe: LoRAMoE adapters (a mixture of LoRA experts with a router, trained with the Localized Balancing
Constraint) for Hugging Face causal LMs, registered as a PEFT method.

    import loramoe, peft
    model = peft.get_peft_model(base, loramoe.LoraMoeConfig(num_experts=6, r=4))
    out = model(input_ids=..., attention_mask=..., labels=..., task_types=...)   # out.loss = lm + beta * LBC
"""

from __future__ import annotations

from ._quiet import held_output

# Under the command line, what torch / transformers / peft (and bitsandbytes through peft) print at import is held
# for --debug: it would break the one-line errors (see loramoe._quiet).
with held_output():
    from ._registration import register
    from .balance import group_coefficients, importance, localized_balancing_loss
    from .config import LoraMoeConfig
    from .layer import Linear, LoraMoeLayer, mix_experts
    from .model import LoraMoeModel, RoutingRecord, default_target_modules

    register()

    from .interop import import_official  # (needs the registered PeftType)
    from .model import capture_routing, find_tuner

__version__ = "0.1.0"

__all__ = [
    "Linear",
    "LoraMoeConfig",
    "LoraMoeLayer",
    "LoraMoeModel",
    "RoutingRecord",
    "capture_routing",
    "default_target_modules",
    "find_tuner",
    "group_coefficients",
    "import_official",
    "importance",
    "localized_balancing_loss",
    "mix_experts",
]
