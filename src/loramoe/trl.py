"""TRL's ``SFTTrainer`` with LoRAMoE's Localized Balancing Constraint in its loss.

TRL (1.x) computes the SFT loss itself, from the per-token log-probabilities of a fused LM head, and never reads
the ``loss`` a model returns, where LoRAMoE adds ``beta * LBC`` for batches that carry ``task_types``. A plain
``SFTTrainer`` with a `LoraMoeConfig` as ``peft_config`` therefore trains the experts with the LM loss alone, and
the routers of a fresh adapter (B = 0) get no gradient at all. `LoraMoeSFTTrainer` adds the term, as TRL adds a
MoE router's auxiliary loss (weighed as `loramoe.trainer` explains), and logs it as ``blc_loss``. The task types
reach the model through the collator::

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

from trl import SFTTrainer

from .data import InstructionDataset
from .trainer import LoraMoeLossMixin


def sft_dataset(data: InstructionDataset) -> Any:
    """A ``datasets.Dataset`` of the samples (``input_ids``, ``labels``, ``task_type``), as TRL takes one."""
    from datasets import Dataset

    return Dataset.from_list([data[i] for i in range(len(data))])


class LoraMoeSFTTrainer(LoraMoeLossMixin, SFTTrainer):
    """``SFTTrainer`` whose loss is TRL's LM loss + ``beta * LBC`` (``beta`` = the adapter's ``blc_weight``), the
    LBC weighed as the mean over an optimizer step's micro-batches (`loramoe.trainer`)."""
