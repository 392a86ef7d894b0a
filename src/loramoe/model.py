"""The PEFT tuner: injects LoRAMoE layers, turns ``task_types`` into the LBC term of the loss, captures routing."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, check_target_module_exists
from torch import nn
from transformers.pytorch_utils import Conv1D

from .balance import importance, localized_balancing_loss, packed_importance
from .config import DEFAULT_TARGET_MODULES, LoraMoeConfig
from .layer import Linear, LoraMoeLayer
from .quantization import check_base_layer, keep_weights_unpacked

_FFN_PARENTS = ("mlp", "feed_forward", "ffn", "ff")


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))]


def default_target_modules(model: nn.Module) -> set[str]:
    """The feed-forward linears LoRAMoE adapts by default: the table for known architectures, else suffixes like
    ``mlp.fc1`` for every linear whose parent is a feed-forward block (empty if there is none)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGET_MODULES:
        return set(DEFAULT_TARGET_MODULES[model_type])
    targets = set()
    for name in _linear_names(model):
        parts = name.split(".")
        if len(parts) >= 2 and parts[-2] in _FFN_PARENTS:
            targets.add(".".join(parts[-2:]))
    return targets


@dataclass
class RoutingRecord:
    """Router weights seen while capturing: per wrapped module, one fp32 tensor [rows, seq, N] per forward call.

    ``attention_masks`` and ``sample_indices`` hold, per call made through the model wrapper, its 2-D attention
    mask and, for a packed batch (`loramoe.packing`), its ``sample_index`` (``None`` where the call had none),
    aligned with the per-module lists, so analyses count each sample's real tokens: a packed row holds several
    samples and ends in padding that no mask marks.
    """

    weights: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    attention_masks: list[torch.Tensor | None] = field(default_factory=list)
    sample_indices: list[torch.Tensor | None] = field(default_factory=list)

    @staticmethod
    def _of_call(entries: list[torch.Tensor | None], call: int) -> torch.Tensor | None:
        return entries[call] if -len(entries) <= call < len(entries) else None

    def _per_sample(self, call: int, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Q [samples, N], the router weights summed over each sample's real tokens, and those token counts."""
        sample_index = self._of_call(self.sample_indices, call)
        if sample_index is not None:
            samples = int(sample_index.max()) + 1
            tokens = torch.bincount(sample_index[sample_index >= 0], minlength=samples).float()
            return packed_importance(weights, sample_index, samples), tokens
        mask = self._of_call(self.attention_masks, call)
        mask = torch.ones(weights.shape[:2]) if mask is None else mask.to(weights)
        return importance(weights, mask), mask.sum(dim=1).float()

    def sample_shares(self, call: int = -1) -> dict[str, torch.Tensor]:
        """Per module, the mean router weight of each sample over its real tokens: [samples, N]."""
        out = {}
        for name, calls in self.weights.items():
            q, tokens = self._per_sample(call, calls[call])
            out[name] = q / tokens.clamp_min(1).unsqueeze(1)
        return out

    def expert_shares(self) -> dict[str, torch.Tensor]:
        """Per module, the mean router weight over every real token of every captured call: [N]."""
        totals = {}
        for name, calls in self.weights.items():
            per_call = [self._per_sample(i, w) for i, w in enumerate(calls)]
            weighted = sum(q.sum(dim=0) for q, _ in per_call)
            totals[name] = weighted / max(sum(float(tokens.sum()) for _, tokens in per_call), 1.0)
        return totals


@functools.cache
def _with_lbc_fields(output_type: type) -> type:
    """A transformers ``ModelOutput`` class with ``lm_loss`` and ``blc_loss`` fields. A key that is not a field
    breaks the output's rebuild from its pytree, which DDP does with ``find_unused_parameters`` (transformers'
    Trainer turns that on for a PEFT model)."""
    fields = [("lm_loss", torch.Tensor | None, None), ("blc_loss", torch.Tensor | None, None)]
    return dataclasses.make_dataclass(f"LoraMoe{output_type.__name__}", fields, bases=(output_type,))


class LoraMoeModel(BaseTuner):
    """Adds LoRAMoE experts to the target linears of a model. Built by ``peft.get_peft_model`` after
    ``import loramoe``; its ``forward`` additionally takes ``task_types`` (LongTensor [batch]: 1 knowledge,
    0 downstream, -1 untyped) and then adds ``beta * sum_modules L_lbc`` to the loss. A packed batch
    (`loramoe.packing`) also gives ``sample_index`` [rows, T] (the sample of each token, -1 on padding); then
    ``task_types`` has one entry per sample and the LBC is computed per sample, not per row.

    That is the objective of one batch. Over an optimizer step of several micro-batches (accumulation, processes)
    the LBC counts as the mean of the micro-batches' LBC (SPEC "The LBC at scale"): `loramoe train` averages the
    returned losses and gets it as it is; transformers' Trainer sums them, so it needs
    `loramoe.trainer.LoraMoeTrainer` (TRL: `loramoe.trl.LoraMoeSFTTrainer`).
    """

    prefix: str = "loramoe_"
    tuner_layer_cls = LoraMoeLayer
    target_module_mapping = DEFAULT_TARGET_MODULES

    # ---- injection -------------------------------------------------------------------------------------------
    def _pre_injection_hook(self, model: nn.Module, config: LoraMoeConfig, adapter_name: str) -> None:
        """Resolve default targets (or infer FFN linears) and fail early, listing what exists, if none match, or
        naming the type of a target that cannot be wrapped (e.g. a quantized linear of an unsupported kind)."""
        keep_weights_unpacked(model)
        if config.target_modules is None:
            targets = default_target_modules(model)
            if not targets:
                model_type = getattr(getattr(model, "config", None), "model_type", None)
                raise ValueError(
                    f"LoraMoeConfig.target_modules is None and no feed-forward linears were found for model type "
                    f"{model_type!r}; set target_modules. Linear modules: {self._name_summary(model)}"
                )
            config.target_modules = targets
        for name, module in model.named_modules():
            if check_target_module_exists(config, name) and not isinstance(module, BaseTunerLayer):
                check_base_layer(module, name)
        if not any(check_target_module_exists(config, n) for n in _linear_names(model)):
            raise ValueError(
                f"LoraMoeConfig.target_modules={config.target_modules!r} matches no nn.Linear/Conv1D module of "
                f"{type(model).__name__}. Linear modules (by suffix): {self._name_summary(model)}"
            )

    @staticmethod
    def _name_summary(model: nn.Module) -> str:
        suffixes = sorted({n.rsplit(".", 1)[-1] for n in _linear_names(model)})
        examples = _linear_names(model)[:4]
        return f"{suffixes} (e.g. {examples})"

    def _create_and_replace(
        self,
        config: LoraMoeConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **kwargs: Any,
    ) -> None:
        if isinstance(target, LoraMoeLayer):
            target.update_layer(adapter_name, config)
            return
        new_module = Linear(target, adapter_name, config)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    # ---- forward with LBC -------------------------------------------------------------------------------------
    def loramoe_layers(self) -> Iterator[tuple[str, LoraMoeLayer]]:
        """(name, layer) of every wrapped linear, named as in the base model (``model.layers.0.mlp.up_proj``)."""
        for name, module in self.model.named_modules():
            if isinstance(module, LoraMoeLayer):
                yield name, module

    def forward(self, *args: Any, task_types: torch.Tensor | None = None, sample_index: torch.Tensor | None = None,
                **kwargs: Any):
        config: LoraMoeConfig = self.peft_config[self.active_adapters[0]]
        if sample_index is not None:  # transformers reads packed samples from position_ids only without a KV cache
            if kwargs.get("use_cache"):
                raise ValueError("use_cache: True with a packed batch (expected False: with a cache transformers "
                                 "ignores the sample boundaries in position_ids and attention crosses samples)")  # fmt: skip
            kwargs["use_cache"] = False
        layers = list(self.loramoe_layers()) if task_types is not None else []  # one walk of the module tree
        use_lbc = any(not layer.disable_adapters for _, layer in layers)
        layers = layers if use_lbc else []
        sinks: list[list[torch.Tensor]] = []
        if use_lbc:
            task_types = self._check_task_types(task_types, args, kwargs, sample_index)
            if sample_index is not None and config.blc_count_padding:
                raise ValueError("blc_count_padding: True with a packed batch (expected False: the reference formula "
                                 "counts each sample's padding positions, which a packed row does not have)")  # fmt: skip
            for _, layer in layers:
                layer._blc_sink = []
                sinks.append(layer._blc_sink)
        capture = getattr(self, "_active_capture", None)
        if capture is not None:
            capture.attention_masks.append(self._mask_for(kwargs, detach=True))
            capture.sample_indices.append(None if sample_index is None else sample_index.detach().cpu())
        try:
            out = self.model(*args, **kwargs)
        finally:
            for _, layer in layers:
                layer._blc_sink = None
        if not use_lbc:
            return out

        mask = None if config.blc_count_padding else self._mask_for(kwargs)
        terms = []
        for (_, layer), weights in zip(layers, sinks):
            for w in weights:  # one per call of the layer (normally exactly one)
                self._check_grad_reaches_router(w, layer)
                if sample_index is not None:
                    q = packed_importance(w, sample_index, task_types.shape[0])
                else:
                    q = importance(w, mask if mask is not None and mask.shape == w.shape[:2] else None)
                terms.append(localized_balancing_loss(q, task_types, config.knowledge_experts, config.blc_alpha, config.blc_mode))
        blc = torch.stack(terms).sum() if terms else torch.zeros(())
        lm_loss = out.get("loss") if hasattr(out, "get") else None
        if dataclasses.is_dataclass(out):
            out = _with_lbc_fields(type(out))(**out)
        out["blc_loss"] = blc
        if lm_loss is not None:
            out["lm_loss"] = lm_loss
            if not getattr(self, "_lbc_outside_loss", False):
                out["loss"] = lm_loss + config.blc_weight * blc.to(lm_loss.device)
        return out

    @contextlib.contextmanager
    def lbc_outside_loss(self) -> Iterator[None]:
        """Inside the block ``loss`` is the LM loss alone (``blc_loss`` is still returned), for a trainer that
        weighs the LBC itself: `loramoe.trainer.LoraMoeLossMixin` (transformers scales the returned loss for
        its own LM normalisation, which would scale the LBC with it)."""
        self._lbc_outside_loss = True
        try:
            yield
        finally:
            self._lbc_outside_loss = False

    @staticmethod
    def _mask_for(kwargs: dict, detach: bool = False) -> torch.Tensor | None:
        mask = kwargs.get("attention_mask")
        if mask is None or mask.dim() != 2:
            return None
        return mask.detach().cpu() if detach else mask

    @staticmethod
    def _check_task_types(task_types: Any, args: tuple, kwargs: dict, sample_index: torch.Tensor | None = None) -> torch.Tensor:
        ref = kwargs.get("input_ids", args[0] if args else None)
        if ref is None:
            ref = kwargs.get("inputs_embeds")
        task_types = torch.as_tensor(task_types)
        if task_types.dim() != 1 or task_types.dtype.is_floating_point:
            raise ValueError(f"task_types must be an integer tensor of shape [batch], got {tuple(task_types.shape)} {task_types.dtype}.")
        if sample_index is not None:
            if ref is not None and tuple(sample_index.shape) != tuple(ref.shape[:2]):
                raise ValueError(f"sample_index has shape {tuple(sample_index.shape)} but the batch is {tuple(ref.shape[:2])} "
                                 "(expected one sample index per token)")  # fmt: skip
            if sample_index.numel() and (sample_index.min() < -1 or sample_index.max() >= task_types.shape[0]):
                raise ValueError(f"sample_index holds values outside -1..{task_types.shape[0] - 1} (expected the "
                                 f"sample of each token, -1 on padding, for {task_types.shape[0]} task_types)")  # fmt: skip
        elif ref is not None and task_types.shape[0] != ref.shape[0]:
            raise ValueError(f"task_types has {task_types.shape[0]} entries but the batch has {ref.shape[0]} samples.")
        bad = ~torch.isin(task_types, torch.tensor([-1, 0, 1], device=task_types.device))
        if bad.any():
            raise ValueError(
                f"task_types values must be 1 (world knowledge), 0 (downstream) or -1 (untyped); got {task_types[bad].unique().tolist()}."
            )
        return task_types

    @staticmethod
    def _check_grad_reaches_router(weights: torch.Tensor, layer: LoraMoeLayer) -> None:
        router = layer.loramoe_router[layer.active_adapters[0]]
        if torch.is_grad_enabled() and router.requires_grad and not weights.requires_grad:
            raise RuntimeError(
                "The router weights reached the LBC loss without a gradient: this happens with reentrant gradient "
                "checkpointing, which silently drops the LBC gradient. Enable checkpointing with "
                "gradient_checkpointing_kwargs={'use_reentrant': False} (the transformers default)."
            )

    # ---- routing capture --------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def capture_routing(self) -> Iterator[RoutingRecord]:
        """Record router weights of every forward pass inside the block (detached, fp32, on CPU at read time)."""
        record = RoutingRecord()
        layers = list(self.loramoe_layers())
        for name, layer in layers:
            record.weights[name] = []
            layer._capture_sink = record.weights[name]
        self._active_capture = record
        try:
            yield record
        finally:
            self._active_capture = None
            for name, layer in layers:
                layer._capture_sink = None
                record.weights[name] = [w.float().cpu() for w in record.weights[name]]

    # ---- loading ----------------------------------------------------------------------------------------------
    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: LoraMoeConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """PEFT only warns about missing keys; for LoRAMoE a partial load is always a mistake, so refuse it."""
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        own = {k: v for k, v in model.state_dict().items() if cls.prefix in k and k.endswith(f".{adapter_name}")}
        problems = []
        missing = sorted(set(own) - set(remapped))
        unexpected = sorted(k for k in set(remapped) - set(own) if cls.prefix in k)
        if missing:
            problems.append(f"{len(missing)} adapter tensors missing from the file, e.g. {missing[:3]}")
        if unexpected:
            problems.append(f"{len(unexpected)} tensors in the file have no place in this model, e.g. {unexpected[:3]}")
        shapes = [
            f"{k}: file {tuple(remapped[k].shape)} vs model {tuple(own[k].shape)}"
            for k in sorted(set(own) & set(remapped))
            if remapped[k].shape != own[k].shape
        ]
        if shapes:
            problems.append(f"{len(shapes)} shape mismatches (another base model or expert count?), e.g. {shapes[:3]}")
        if problems:
            raise ValueError("This LoRAMoE adapter does not fit the base model: " + "; ".join(problems) + ".")
        return remapped


def find_tuner(model: nn.Module) -> LoraMoeModel:
    """The `LoraMoeModel` inside a `PeftModel` (or the tuner itself)."""
    if isinstance(model, LoraMoeModel):
        return model
    for module in model.modules():
        if isinstance(module, LoraMoeModel):
            return module
    raise ValueError(f"{type(model).__name__} carries no LoRAMoE adapter (build it with peft.get_peft_model).")


@contextlib.contextmanager
def capture_routing(model: nn.Module) -> Iterator[RoutingRecord]:
    """``with capture_routing(peft_model) as rec: peft_model(**batch)`` -> ``rec.weights``, ``rec.expert_shares()``."""
    with find_tuner(model).capture_routing() as record:
        yield record
