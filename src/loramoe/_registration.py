"""Make LoRAMoE a PEFT method: PEFT keys its registries on the `PeftType` enum, which has no LORAMOE member."""

from __future__ import annotations

from peft.utils import PeftType, register_peft_method

NAME = "LORAMOE"


def _add_peft_type_member(name: str) -> None:
    """Append a member to the `PeftType` str-enum, the way `enum` builds its own members."""
    if name in PeftType.__members__:
        return
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    type.__setattr__(PeftType, name, member)  # EnumType.__setattr__ forbids adding members


def register() -> None:
    """Idempotent: importing loramoe twice (or reloading) must not fail."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    from .config import LoraMoeConfig
    from .model import LoraMoeModel

    _add_peft_type_member(NAME)
    if PeftType.LORAMOE not in PEFT_TYPE_TO_CONFIG_MAPPING:
        register_peft_method(name="loramoe", config_cls=LoraMoeConfig, model_cls=LoraMoeModel)
