"""TRL's ``SFTTrainer`` with LoRAMoE's Localized Balancing Constraint in its loss.

TRL (1.x) computes the SFT loss itself, from the per-token log-probabilities of a fused LM head, and never reads
the ``loss`` a model returns, where LoRAMoE adds ``beta * LBC`` for batches that carry ``task_types``. A plain
``SFTTrainer`` with a `LoraMoeConfig` as ``peft_config`` therefore trains the experts with the LM loss alone, and
the routers of a fresh adapter (B = 0) get no gradient at all. `LoraMoeSFTTrainer` adds the term, as TRL adds a
MoE router's auxiliary loss, and logs it as ``blc_loss``. The task types reach the model through the collator::

    from loramoe.data import InstructionCollator, load_instruction_data
    from loramoe.trl import LoraMoeSFTTrainer, sft_dataset

    data = sft_dataset(load_instruction_data("train.jsonl", tokenizer))    # input_ids, labels, task_type
    args = SFTConfig(output_dir="runs/sft", remove_unused_columns=False,   # keep the task_type column
                     dataset_kwargs={"skip_prepare_dataset": True})        # already tokenised, labels set
    trainer = LoraMoeSFTTrainer(model=base, args=args, train_dataset=data, processing_class=tokenizer,
                                peft_config=LoraMoeConfig(num_experts=6, r=4),
                                data_collator=InstructionCollator(tokenizer.pad_token_id))

See ``examples/trl_sft.py``.
"""

from __future__ import annotations

from typing import Any

import torch
from trl import SFTTrainer

from .data import InstructionDataset
from .model import find_tuner


def sft_dataset(data: InstructionDataset) -> Any:
    """A ``datasets.Dataset`` of the samples (``input_ids``, ``labels``, ``task_type``), as TRL takes one."""
    from datasets import Dataset

    return Dataset.from_list([data[i] for i in range(len(data))])


class LoraMoeSFTTrainer(SFTTrainer):
    """``SFTTrainer`` whose loss is TRL's LM loss + ``beta * LBC`` (``beta`` = the adapter's ``blc_weight``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._tuner = find_tuner(self.model)
        self._blc_terms: list[torch.Tensor] = []
        self._tuner.register_forward_hook(self._keep_blc)

    def _keep_blc(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if hasattr(output, "keys") and "blc_loss" in output:
            self._blc_terms.append(output["blc_loss"])

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._blc_terms.clear()
        result = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if not self._blc_terms:  # a batch without task_types: no LBC, as in LoRAMoE's own forward
            return result
        loss, outputs = result if return_outputs else (result, None)
        blc = self._blc_terms[0]  # the forward the loss came from (return_outputs makes TRL run a second one)
        beta = self._tuner.peft_config[self._tuner.active_adapters[0]].blc_weight
        # like TRL's MoE auxiliary loss: with num_items_in_batch, Trainer leaves gradient accumulation to the loss
        steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
        loss = loss + beta * blc.to(loss.device) / steps
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["blc_loss"].append(self.accelerator.gather_for_metrics(blc.detach()).mean().item())
        return (loss, outputs) if return_outputs else loss
