"""`LoraMoeConfig`: the knobs of a LoRAMoE adapter, validated up front and saved as `adapter_config.json`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from peft.config import PeftConfig
from peft.utils import PeftType

# Feed-forward linears per architecture (the paper adapts the FFN of every block). Entries are suffixes,
# matched PEFT-style: a module is targeted when its name ends with ".<entry>".
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    **dict.fromkeys(
        [
            "llama",
            "mistral",
            "mixtral",
            "qwen2",
            "qwen3",
            "gemma",
            "gemma2",
            "gemma3_text",
            "olmo",
            "olmo2",
            "granite",
            "smollm3",
            "deepseek_v3",
            "cohere",
            "internlm2",
        ],
        ["gate_proj", "up_proj", "down_proj"],
    ),
    "phi3": ["gate_up_proj", "down_proj"],
    "starcoder2": ["mlp.c_fc", "mlp.c_proj"],
    "gpt2": ["mlp.c_fc", "mlp.c_proj"],
    "gpt_bigcode": ["mlp.c_fc", "mlp.c_proj"],
    "gpt_neox": ["dense_h_to_4h", "dense_4h_to_h"],
    "gptj": ["fc_in", "fc_out"],
    "falcon": ["dense_h_to_4h", "dense_4h_to_h"],
    "opt": ["fc1", "fc2"],
    "phi": ["fc1", "fc2"],
    "bloom": ["dense_h_to_4h", "dense_4h_to_h"],
}

BlcMode = Literal["own_group", "reference"]


def knowledge_group_size(num_experts: int, knowledge_experts: int | None) -> int:
    """K, the size of the world-knowledge expert group: as given, or half the experts when left unset."""
    return num_experts // 2 if knowledge_experts is None else knowledge_experts


@dataclass
class LoraMoeConfig(PeftConfig):
    """Configuration of a LoRAMoE adapter (see SPEC.md for the maths).

    Args:
        num_experts: N, LoRA experts per wrapped linear.
        r: rank of each expert.
        lora_alpha: the expert branch is scaled by ``lora_alpha / r``, as in LoRA.
        lora_dropout: dropout on the expert branch's input (one mask shared by all experts).
        target_modules: module-name suffixes, or a regex matched against the full name; ``None`` picks the
            feed-forward linears of known architectures (or infers them from ``*.mlp.*`` names).
        exclude_modules: names (suffixes) or a regex to leave alone.
        knowledge_experts: K; experts ``0..K-1`` form the world-knowledge group. ``None`` means ``N // 2``.
        blc_alpha: delta, the LBC's group contrast.
        blc_weight: beta, the LBC's weight in the loss (per wrapped module, summed over modules).
        blc_count_padding: count padded positions in the importance matrix, as the reference code does.
        blc_mode: ``"own_group"`` (default) makes a sample's own group the one with the larger router share
            at the LBC's optimum (coefficient ``1 - delta`` on the own group, ``1 + delta`` on the other);
            ``"reference"`` reproduces the reference code exactly (``1 + delta`` on the own group, which pushes
            a sample's weight *away* from its own group; see SPEC.md).
        init_weights: B starts at zero (step-0 outputs equal the base model's). ``False`` draws B randomly too,
            which is only useful for tests.
    """

    num_experts: int = field(default=6, metadata={"help": "Number of LoRA experts N per wrapped linear."})
    r: int = field(default=4, metadata={"help": "Rank of each expert."})
    lora_alpha: float = field(default=32, metadata={"help": "Scaling numerator: branch scale is lora_alpha / r."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the expert branch input."})
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "Module-name suffixes or a regex; None = the FFN linears of the architecture."}
    )
    exclude_modules: list[str] | str | None = field(default=None, metadata={"help": "Modules to leave alone."})
    knowledge_experts: int | None = field(
        default=None, metadata={"help": "K: experts 0..K-1 are the world-knowledge group (default N // 2)."}
    )
    blc_alpha: float = field(default=0.1, metadata={"help": "LBC delta."})
    blc_weight: float = field(default=0.1, metadata={"help": "LBC beta (weight in the total loss)."})
    blc_count_padding: bool = field(
        default=False, metadata={"help": "Count padding positions in LBC (reference-code behaviour)."}
    )
    blc_mode: BlcMode = field(default="own_group", metadata={"help": "'own_group' (default) or 'reference'."})
    init_weights: bool = field(default=True, metadata={"help": "Zero-initialise B (step-0 output = base output)."})
    bias: str = field(default="none", metadata={"help": "Only 'none' is supported: biases stay frozen."})
    layers_to_transform: list[int] | int | None = field(default=None, metadata={"help": "Layer indices to adapt."})
    layers_pattern: list[str] | str | None = field(default=None, metadata={"help": "Name of the layer list."})
    modules_to_save: list[str] | None = field(default=None, metadata={"help": "Extra modules to train and save."})

    def __post_init__(self) -> None:
        if self.task_type is None:  # LoRAMoE is for causal LMs; this also selects PeftModelForCausalLM
            self.task_type = "CAUSAL_LM"
        super().__post_init__()
        self.peft_type = PeftType.LORAMOE
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        self.knowledge_experts = knowledge_group_size(self.num_experts, self.knowledge_experts)
        self.validate()

    def validate(self) -> None:
        """Reject impossible settings with a message naming the key and what is expected."""
        checks = [
            (isinstance(self.num_experts, int) and self.num_experts >= 1, "num_experts", "an integer >= 1"),
            (isinstance(self.r, int) and self.r >= 1, "r", "an integer >= 1"),
            (self.lora_alpha > 0, "lora_alpha", "a number > 0"),
            (0.0 <= self.lora_dropout < 1.0, "lora_dropout", "a probability in [0, 1)"),
            (
                isinstance(self.knowledge_experts, int) and 0 <= self.knowledge_experts <= self.num_experts,
                "knowledge_experts",
                f"an integer in [0, num_experts={self.num_experts}]",
            ),
            (0.0 <= self.blc_alpha < 1.0, "blc_alpha", "a number in [0, 1) (coefficients 1 +- delta stay positive)"),
            (self.blc_weight >= 0.0, "blc_weight", "a number >= 0"),
            (self.blc_mode in ("own_group", "reference"), "blc_mode", "'own_group' or 'reference'"),
            (self.bias == "none", "bias", "'none' (LoRAMoE trains only experts and routers)"),
        ]
        for ok, key, expected in checks:
            if not ok:
                raise ValueError(f"LoraMoeConfig.{key}={getattr(self, key)!r} is invalid: expected {expected}.")

    @property
    def scaling(self) -> float:
        return self.lora_alpha / self.r
