"""Serving LoRAMoE models with vLLM: a model plugin and `loramoe serve` (README "Serve it").

vLLM finds the plugin through the ``vllm.general_plugins`` entry point (``pip install 'loramoe[vllm]'``) and calls
`register` in every process it starts, the spawned workers included, so the architectures below resolve there
too. Nothing here imports vLLM until vLLM itself calls in: the models are registered by name, loaded lazily.
"""

from __future__ import annotations

from .adapter import ARCHITECTURES


def register() -> None:
    """Register the LoRAMoE architectures with vLLM (safe to call more than once)."""
    from vllm import ModelRegistry

    for arch in ARCHITECTURES.values():
        ModelRegistry.register_model(arch, f"loramoe.vllm.models:{arch}")
