"""One optimizer update of a LoRAMoE adapter through each trainer path, in this process or under torchrun (the
driver of tests/test_lbc_scaling.py):

    python -m torch.distributed.run --nproc_per_node 2 tests/lbc_paths.py PATH[,PATH...] TINY_MODEL DATA OUT GRAD_ACCUM [DS_CONFIG]

PATH: ``loop`` (`loramoe train`, DDP), ``fsdp`` (--fsdp), ``deepspeed`` (--deepspeed DS_CONFIG), ``trainer``
(`LoraMoeTrainer`), ``trl`` (`LoraMoeSFTTrainer`), ``trainer-deepspeed`` (`LoraMoeTrainer` with DS_CONFIG as
``TrainingArguments.deepspeed``). Every path starts from `adapter_model` and writes its adapter to OUT/PATH; the
paths of one launch run one after the other in the same processes (one start-up for several).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import peft
import torch

import loramoe
from loramoe.data import InstructionCollator, load_instruction_data
from loramoe.loading import load_base_model, load_tokenizer

BETA, LR, BATCH = 1.0, 1e-2, 2  # an LBC weight that competes with the LM loss; micro-batches of 2 samples


def adapter_model(tiny_model: str) -> peft.PeftModel:
    """The same LoRAMoE adapter in every process and path: B != 0 (``init_weights=False``), so that the routers get
    LM gradient as well as LBC gradient and a wrongly weighed LBC changes the update's direction."""
    torch.manual_seed(0)
    config = loramoe.LoraMoeConfig(num_experts=4, r=2, lora_dropout=0.0, init_weights=False, blc_weight=BETA)
    return peft.get_peft_model(load_base_model(tiny_model), config)


def _trainer_args(out: str, grad_accum: int, ds_config: str | None) -> dict:
    """SGD at lr 1 for the HF trainers: the update is minus the gradient, so a wrong weight shows in full."""
    return dict(output_dir=out, per_device_train_batch_size=BATCH, gradient_accumulation_steps=grad_accum,
                max_steps=1, learning_rate=1.0, optim="sgd",
                lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=0.0,
                train_sampling_strategy="sequential", remove_unused_columns=False, label_names=["labels"],
                report_to=[], save_strategy="no", disable_tqdm=True, logging_steps=1, seed=0,
                use_cpu=not ds_config, deepspeed=ds_config,
                **({"accelerator_config": {"use_configured_state": True}} if ds_config else {}))  # fmt: skip


def run(path: str, tiny_model: str, data_file: str, out: str, grad_accum: int, ds_config: str | None = None) -> None:
    tokenizer = load_tokenizer(tiny_model)
    if path in ("loop", "fsdp", "deepspeed"):
        from loramoe.train import TrainConfig, train

        cfg = TrainConfig(model=tiny_model, data=[data_file], output_dir=out, num_experts=4, r=2, lora_dropout=0.0,
                          blc_weight=BETA, max_seq_len=64, batch_size=BATCH, grad_accum=grad_accum, max_steps=1,
                          lr=LR, warmup_ratio=0.0, scheduler="constant", max_grad_norm=0.0, progress=False, seed=0,
                          fsdp=path == "fsdp", deepspeed=ds_config if path == "deepspeed" else None)  # fmt: skip
        train(cfg, model=adapter_model(tiny_model), tokenizer=tokenizer)
        return
    if path == "trainer-deepspeed":  # accelerate finds no backend on CPU by itself (see docs/training.md)
        from accelerate import PartialState

        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        PartialState(backend="gloo")
    data = load_instruction_data(data_file, tokenizer, max_seq_len=64)
    collator = InstructionCollator(tokenizer.pad_token_id)
    if path == "trl":
        from trl import SFTConfig

        from loramoe.trl import LoraMoeSFTTrainer, sft_dataset

        args = SFTConfig(**_trainer_args(out, grad_accum, None),
                         dataset_kwargs={"skip_prepare_dataset": True}, gradient_checkpointing=False, bf16=False)  # fmt: skip
        trainer = LoraMoeSFTTrainer(model=adapter_model(tiny_model), args=args, train_dataset=sft_dataset(data),
                                    processing_class=tokenizer, data_collator=collator)  # fmt: skip
    else:
        from transformers import TrainingArguments

        from loramoe.trainer import LoraMoeTrainer

        ds_config = ds_config if path == "trainer-deepspeed" else None
        args = TrainingArguments(**_trainer_args(out, grad_accum, ds_config))
        trainer = LoraMoeTrainer(model=adapter_model(tiny_model), args=args, train_dataset=data, data_collator=collator)
    trainer.train()
    trainer.save_model(out)


def launch(paths: list[str], nproc: int, tiny_model: str, data_file: str, out: str, grad_accum: int,
           ds_config: str | None = None) -> subprocess.CompletedProcess:
    """`run` for each of ``paths`` in ``nproc`` processes under torchrun (gloo on CPU)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", __file__,
               ",".join(paths), tiny_model, data_file, out, str(grad_accum), *([ds_config] if ds_config else [])]  # fmt: skip
    return subprocess.run(command, env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True,
                          timeout=900)  # fmt: skip


def write_data(path: Path) -> str:
    """8 samples of different lengths (the micro-batches' token counts differ), knowledge and downstream."""
    rows = [{"instruction": ("Capital of land " if i % 2 == 0 else "Add ") + "x" * (3 * i), "input": f"{i}",
             "output": ("city " if i % 2 == 0 else "") + str(i) * (1 + i % 3), "task_type": 1 - i % 2}
            for i in range(8)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


if __name__ == "__main__":
    for name in sys.argv[1].split(","):
        run(name, sys.argv[2], sys.argv[3], str(Path(sys.argv[4]) / name), int(sys.argv[5]), *sys.argv[6:])
