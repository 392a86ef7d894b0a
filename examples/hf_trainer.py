"""LoRAMoE with transformers' Trainer (`loramoe.trainer.LoraMoeTrainer`: the plain Trainer would weigh the LBC by
processes x accumulation steps), optionally under DeepSpeed ZeRO with a shipped config. Offline, on CPU:

    python examples/make_tiny_model.py runs/tiny-llama
    python examples/hf_trainer.py --model runs/tiny-llama --data examples/data/tiny_instructions.jsonl \\
        --output-dir runs/hf-trainer --max-steps 10
    torchrun --nproc_per_node 2 examples/hf_trainer.py --model runs/tiny-llama \\
        --data examples/data/tiny_instructions.jsonl --output-dir runs/hf-zero3 --max-steps 10 \\
        --deepspeed examples/deepspeed/zero3_offload.json

Without a GPU, accelerate finds no backend for DeepSpeed by itself (every process would think it is process 0 of
1): the script creates its state with gloo before the ``TrainingArguments``, and tells the Trainer to use it. The
saved adapter (ZeRO-3: gathered) loads with ``loramoe.loading.load_model`` and ``loramoe eval --adapter``.
"""

from __future__ import annotations

import argparse
import os

import peft
import torch
from transformers import TrainingArguments

from loramoe import LoraMoeConfig
from loramoe.data import InstructionCollator, load_instruction_data
from loramoe.loading import load_base_model, load_tokenizer
from loramoe.trainer import LoraMoeTrainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="base model: HF directory, .gguf file or 'smollm2'")
    parser.add_argument("--data", nargs="+", required=True, help="instruction data with task_type (as loramoe train)")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--deepspeed", help="DeepSpeed config JSON, e.g. examples/deepspeed/zero2.json (under torchrun)")
    parser.add_argument("--max-steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4, help="per process")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--num-experts", type=int, default=6)
    parser.add_argument("--lora-r", "--r", dest="r", type=int, default=4, help="rank of each expert (--lora-r under torchrun)")
    parser.add_argument("--lora-dropout", type=float, default=0.05)
    parser.add_argument("--blc-weight", type=float, default=0.1, help="LBC beta")
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()

    gpu = torch.cuda.is_available()
    if args.deepspeed and not gpu:
        from accelerate import PartialState

        os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
        PartialState(backend="gloo")
    tokenizer = load_tokenizer(args.model)
    data = load_instruction_data(args.data, tokenizer, max_seq_len=args.max_seq_len, seed=args.seed)
    print(f"data: {data.report.summary()}")
    config = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr, seed=args.seed, logging_steps=1,
        save_strategy="no", report_to=[], remove_unused_columns=False,  # keep task_type for the collator
        label_names=["labels"], deepspeed=args.deepspeed, use_cpu=not gpu and not args.deepspeed,
        bf16=gpu and torch.cuda.is_bf16_supported(),
        accelerator_config={"use_configured_state": True} if args.deepspeed and not gpu else None,
    )  # fmt: skip
    torch.manual_seed(args.seed)
    adapter = LoraMoeConfig(num_experts=args.num_experts, r=args.r, lora_dropout=args.lora_dropout,
                            blc_weight=args.blc_weight)
    model = peft.get_peft_model(load_base_model(args.model), adapter)
    trainer = LoraMoeTrainer(model=model, args=config, train_dataset=data,
                             data_collator=InstructionCollator(tokenizer.pad_token_id))  # fmt: skip
    trainer.train()
    trainer.save_model(args.output_dir)  # the LoRAMoE adapter (safetensors), as `loramoe eval --adapter` loads it
    if trainer.is_world_process_zero():
        print(f"adapter written to {args.output_dir}")


if __name__ == "__main__":
    main()
