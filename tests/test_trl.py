"""TRL: `trl.SFTTrainer` with a `LoraMoeConfig` as `peft_config` and the task types passed through the collator.
TRL computes its own LM loss and ignores the model's `loss`; `LoraMoeSFTTrainer` puts the LBC back into it."""

from __future__ import annotations

import json

import pytest
import torch

trl = pytest.importorskip("trl")

from loramoe import LoraMoeConfig  # noqa: E402
from loramoe.data import InstructionCollator, load_instruction_data  # noqa: E402
from loramoe.loading import load_base_model, load_tokenizer  # noqa: E402
from loramoe.trl import LoraMoeSFTTrainer, sft_dataset  # noqa: E402


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory, tiny_llama_dir):
    """8 short samples, alternating knowledge (1) and downstream (0), as TRL's dataset."""
    path = tmp_path_factory.mktemp("trl") / "short.jsonl"
    rows = [{"instruction": "Add" if i % 2 else "Capital?", "input": f"{i}", "output": f"x{i}", "task_type": 1 - i % 2}
            for i in range(8)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = load_tokenizer(str(tiny_llama_dir))
    return sft_dataset(load_instruction_data(str(path), tok, max_seq_len=64)), tok


def _trainer(cls, tiny_llama_dir, data, tok, out, init_weights: bool):
    torch.manual_seed(0)
    args = trl.SFTConfig(output_dir=str(out), per_device_train_batch_size=4, max_steps=1, learning_rate=1e-2,
                         remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True},
                         gradient_checkpointing=False, report_to=[], save_strategy="no", use_cpu=True, bf16=False,
                         max_grad_norm=0.0, disable_tqdm=True, logging_steps=1)  # fmt: skip
    config = LoraMoeConfig(num_experts=4, r=2, lora_dropout=0.0, blc_weight=0.5, init_weights=init_weights)
    return cls(model=load_base_model(str(tiny_llama_dir)), args=args, train_dataset=data, processing_class=tok,
               peft_config=config, data_collator=InstructionCollator(tok.pad_token_id))


def _routers(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "loramoe_router" in n}


def test_trl_loss_is_lm_loss_plus_beta_lbc(sft_data, tiny_llama_dir, tmp_path):
    data, tok = sft_data
    trainer = _trainer(LoraMoeSFTTrainer, tiny_llama_dir, data, tok, tmp_path / "a", init_weights=False)
    batch = InstructionCollator(tok.pad_token_id)([data[i] for i in range(4)])
    model = trainer.model.train()
    loss = trainer.compute_loss(model, dict(batch))
    with torch.no_grad():
        reference = model(**batch)  # LoRAMoE's own forward: loss = lm_loss + beta * blc_loss
    assert float(reference.blc_loss) > 1e-4
    assert float(loss) == pytest.approx(float(reference.loss), rel=1e-5)
    assert float(loss) == pytest.approx(float(reference.lm_loss) + 0.5 * float(reference.blc_loss), rel=1e-5)
    plain = _trainer(trl.SFTTrainer, tiny_llama_dir, data, tok, tmp_path / "b", init_weights=False)
    assert float(plain.compute_loss(plain.model.train(), dict(batch))) == pytest.approx(float(reference.lm_loss), rel=1e-5)


def test_one_sft_step_moves_the_routers_only_through_the_lbc(sft_data, tiny_llama_dir, tmp_path):
    """B = 0: the LM loss gives the routers no gradient at step 1, so they move only if the LBC is in the loss."""
    data, tok = sft_data
    moved = {}
    for cls in (trl.SFTTrainer, LoraMoeSFTTrainer):
        trainer = _trainer(cls, tiny_llama_dir, data, tok, tmp_path / cls.__name__, init_weights=True)
        before = _routers(trainer.model)
        trainer.train()
        moved[cls] = max((p - before[n]).abs().max().item() for n, p in _routers(trainer.model).items())
        logged = trainer.state.log_history[0]
    assert moved[trl.SFTTrainer] == 0.0  # TRL's own loss: the task types reached the model, the LBC not the loss
    assert moved[LoraMoeSFTTrainer] > 1e-3
    assert logged["blc_loss"] > 0
