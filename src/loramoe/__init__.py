"""loramoe: LoRAMoE adapters (a mixture of LoRA experts with a router, trained with the Localized Balancing
Constraint) for Hugging Face causal LMs, registered as a PEFT method.

    import loramoe, peft
    model = peft.get_peft_model(base, loramoe.LoraMoeConfig(num_experts=6, r=4))
    out = model(input_ids=..., attention_mask=..., labels=..., task_types=...)   # out.loss = lm + beta * LBC
"""

from __future__ import annotations

import logging

# bitsandbytes (imported by peft when installed) warns at import, on CPUs with AVX512-BF16, that it could not fetch
# an optional kernel from the Hub. loramoe never fetches anything, and the line would break the CLI's one-line errors.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from ._registration import register  # noqa: E402
from .balance import group_coefficients, importance, localized_balancing_loss  # noqa: E402
from .config import LoraMoeConfig  # noqa: E402
from .layer import Linear, LoraMoeLayer, mix_experts  # noqa: E402
from .model import LoraMoeModel, RoutingRecord, default_target_modules  # noqa: E402

register()

from .interop import import_official  # noqa: E402  (needs the registered PeftType)
from .model import capture_routing, find_tuner  # noqa: E402

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
