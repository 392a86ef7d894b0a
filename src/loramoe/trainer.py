"""LoRAMoE under transformers' ``Trainer`` (and TRL's ``SFTTrainer``, `loramoe.trl`), with the LBC weighed as the
mean over an optimizer step's micro-batches whatever the number of processes and accumulation steps::

    from loramoe.trainer import LoraMoeTrainer
    args = TrainingArguments("out", remove_unused_columns=False, label_names=["labels"])
    LoraMoeTrainer(model=peft_model, args=args, train_dataset=data, data_collator=InstructionCollator(pad_id)).train()

Why not the plain ``Trainer``: transformers (5.x) normalises the LM loss over the whole optimizer step itself. It
passes the model ``num_items_in_batch`` (the target tokens of every micro-batch of the step on every process), so
a micro-batch's LM loss is its share of one token mean, then multiplies the returned loss by the number of
processes (undoing the gradient mean of DDP or DeepSpeed) and no longer divides it by the accumulation steps.
Right for the LM loss; a per-micro-batch term that a model adds to its loss is counted processes x accumulation
times: LoRAMoE's ``beta * LBC`` would weigh beta x 8 on the paper's 8 GPUs. The model cannot compensate (it does
not know the accumulation steps), so the trainer does: the objective of a step (SPEC "The LBC at scale", the one
``loramoe train`` optimises) is

    LM token mean over all micro-batches of all processes + beta * mean over those micro-batches of their LBC,

and `LoraMoeLossMixin.compute_loss` keeps the LBC out of the loss the trainer scales and adds
``beta * LBC / accumulation steps`` after it (the gradient mean over processes and the sum over accumulation
steps then make it the mean). Where the trainer divides the loss by the accumulation steps itself (no
``num_items_in_batch``), the term is added undivided.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer

from .model import find_tuner


class LoraMoeLossMixin:
    """``compute_loss`` = the trainer's own loss (LM) + ``beta * LBC`` weighed as explained in the module
    docstring; ``beta`` is the adapter's ``blc_weight``. ``blc_loss`` (the mean over processes) is logged."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._tuner = find_tuner(self.model)
        self._blc_terms: list[torch.Tensor] = []
        self._blc_logged: dict[str, list[float]] = {"train": [], "eval": []}
        self._tuner.register_forward_hook(self._keep_blc)

    def _keep_blc(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if hasattr(output, "keys") and "blc_loss" in output:
            self._blc_terms.append(output["blc_loss"])

    def _loss_is_scaled_for_accumulation(self, num_items_in_batch: Any) -> bool:
        """The rule of ``Trainer.training_step``: whether it leaves the division by the accumulation steps to the
        loss (it does when the loss was normalised with ``num_items_in_batch``)."""
        if getattr(self, "loss_is_scaled_for_ga", None) is not None:
            return self.loss_is_scaled_for_ga
        return (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._blc_terms.clear()
        with self._tuner.lbc_outside_loss():
            result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                          num_items_in_batch=num_items_in_batch)  # fmt: skip
        if not self._blc_terms:  # a batch without task_types: no LBC, as in LoRAMoE's own forward
            return result
        loss, outputs = result if return_outputs else (result, None)
        blc = self._blc_terms[0]  # the forward the loss came from (TRL may run a second one for the outputs)
        beta = self._tuner.peft_config[self._tuner.active_adapters[0]].blc_weight
        steps = self.current_gradient_accumulation_steps if self._loss_is_scaled_for_accumulation(num_items_in_batch) else 1
        loss = loss + beta * blc.to(loss.device) / steps
        mode = "train" if self.model.training else "eval"
        self._blc_logged[mode].append(self.accelerator.gather_for_metrics(blc.detach()).mean().item())
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        mode = "train" if self.model.training else "eval"
        values = self._blc_logged[mode]
        if values:
            logs[f"{'eval_' if mode == 'eval' else ''}blc_loss"] = sum(values) / len(values)
            values.clear()
        super().log(logs, *args, **kwargs)


class LoraMoeTrainer(LoraMoeLossMixin, Trainer):
    """``transformers.Trainer`` whose loss is its LM loss + ``beta * LBC`` (the mean over micro-batches)."""
