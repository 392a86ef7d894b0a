"""TRL: `trl.SFTTrainer` with a `LoraMoeConfig` as `peft_config` and the task types passed through the collator.
TRL computes its own LM loss and ignores the model's `loss`; `LoraMoeSFTTrainer` puts the LBC back into it."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

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


def _trainer(cls, tiny_llama_dir, data, tok, out, init_weights: bool, compute_loss_func=None, **overrides):
    torch.manual_seed(0)
    settings = dict(output_dir=str(out), per_device_train_batch_size=4, max_steps=1, learning_rate=1e-2,
                    remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True},
                    gradient_checkpointing=False, report_to=[], save_strategy="no", use_cpu=True, bf16=False,
                    max_grad_norm=0.0, disable_tqdm=True, logging_steps=1)  # fmt: skip
    args = trl.SFTConfig(**{**settings, **overrides})
    config = LoraMoeConfig(num_experts=4, r=2, lora_dropout=0.0, blc_weight=0.5, init_weights=init_weights)
    return cls(model=load_base_model(str(tiny_llama_dir)), args=args, train_dataset=data, processing_class=tok,
               peft_config=config, data_collator=InstructionCollator(tok.pad_token_id),
               compute_loss_func=compute_loss_func)  # fmt: skip


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


def _batch(data, tok, indices) -> dict[str, torch.Tensor]:
    return InstructionCollator(tok.pad_token_id)([data[i] for i in indices])


def test_a_second_training_step_adds_its_own_batchs_lbc(sft_data, tiny_llama_dir, tmp_path):
    """Two steps in order (samples 0-3, then 4-7): step 2 adds and logs the LBC of its own batch under the weights
    step 1 left (read from an identically seeded one-step run), never step 1's term again."""
    data, tok = sft_data
    runs = {steps: _trainer(LoraMoeSFTTrainer, tiny_llama_dir, data, tok, tmp_path / str(steps), init_weights=False,
                            train_sampling_strategy="sequential", max_steps=steps) for steps in (1, 2)}  # fmt: skip
    for trainer in runs.values():
        trainer.train()
    logged = [entry["blc_loss"] for entry in runs[2].state.log_history if "loss" in entry]
    with torch.no_grad():
        expected = float(runs[1].model.train()(**_batch(data, tok, range(4, 8))).blc_loss)
    assert len(logged) == 2 and logged[0] != pytest.approx(logged[1], rel=1e-3)
    assert logged[1] == pytest.approx(expected, rel=1e-5)


def _smoothed_free_ce(outputs, labels, num_items_in_batch=None):
    """A user's compute_loss_func: token-summed CE over the shifted labels / num_items_in_batch."""
    logits, target = outputs.logits[:, :-1].float(), labels[:, 1:]
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="sum")
    return total / num_items_in_batch


@pytest.mark.parametrize("loss_path", ["trl", "label_smoothing", "compute_loss_func"])
def test_accumulated_step_moves_the_routers_by_beta_times_the_mean_lbc_gradient(sft_data, tiny_llama_dir, tmp_path,
                                                                                 loss_path):  # fmt: skip
    """B = 0, so the LM loss gives the routers no gradient and one SGD step (lr 1) moves them by exactly
    -beta * grad(mean of the micro-batches' LBC). Two accumulated micro-batches of 2 (num_items_in_batch set:
    Trainer leaves accumulation to the loss), sequential order, no clipping. With label smoothing or a
    compute_loss_func TRL runs a second, no-grad forward for its metrics: the LBC term added must be the one of the
    forward with the gradient. Reference: LoRAMoE's own forward, per micro-batch, on an identically seeded model."""
    data, tok = sft_data
    options = {"label_smoothing": dict(label_smoothing_factor=0.1),
               "compute_loss_func": dict(compute_loss_func=_smoothed_free_ce)}.get(loss_path, {})  # fmt: skip
    settings = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, optim="sgd", learning_rate=1.0,
                    lr_scheduler_type="constant", train_sampling_strategy="sequential", **options)  # fmt: skip
    trainer = _trainer(LoraMoeSFTTrainer, tiny_llama_dir, data, tok, tmp_path / "a", init_weights=True, **settings)
    # The same seeded start. A deepcopy of trainer.model would not do: TRL's add_fused_lm_head keeps the original's
    # bound forward in a closure, so the copy's plain forward runs the original model's layers (its LBC comes out 0).
    reference = _trainer(LoraMoeSFTTrainer, tiny_llama_dir, data, tok, tmp_path / "b", init_weights=True,
                         **settings).model.train()  # fmt: skip
    before = _routers(trainer.model)
    assert all(torch.equal(before[n], p) for n, p in _routers(reference).items())
    trainer.train()
    for indices in ([0, 1], [2, 3]):
        (0.5 * reference(**_batch(data, tok, indices)).blc_loss / 2).backward()  # beta = 0.5, mean of 2 micro-batches
    grads = {n: p.grad for n, p in reference.named_parameters() if "loramoe_router" in n}
    assert max(float(g.abs().max()) for g in grads.values()) > 1e-3
    after = _routers(trainer.model)
    for name, grad in grads.items():
        torch.testing.assert_close(after[name] - before[name], -grad, rtol=1e-4, atol=1e-7)  # lr 1: fp32 rounding


def test_evaluation_reports_its_lbc_as_eval_and_not_as_train(sft_data, tiny_llama_dir, tmp_path):
    """evaluate(): eval_blc_loss is the mean LBC of the eval batches (LoRAMoE's own forward); the train metrics get
    nothing from it: the training step that follows (samples 0-3, the first eval batch; no dropout) logs exactly
    that batch's LBC."""
    data, tok = sft_data
    trainer = _trainer(LoraMoeSFTTrainer, tiny_llama_dir, data, tok, tmp_path, init_weights=False,
                       per_device_eval_batch_size=4, train_sampling_strategy="sequential")  # fmt: skip
    metrics = trainer.evaluate(eval_dataset=data)
    model = trainer.model.eval()
    with torch.no_grad():
        blc = [float(model(**_batch(data, tok, range(k, k + 4))).blc_loss) for k in (0, 4)]
    assert blc[0] != pytest.approx(blc[1], rel=1e-3)
    assert metrics["eval_blc_loss"] == pytest.approx(sum(blc) / 2, rel=1e-5) and "blc_loss" not in metrics
    trainer.train()
    (logged,) = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged["blc_loss"] == pytest.approx(blc[0], rel=1e-5) and "eval_blc_loss" not in logged
