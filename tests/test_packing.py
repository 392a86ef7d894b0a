"""Packed batches (loramoe.packing): the collator by hand, and packed = padded (LM loss, LBC, every gradient) on the
model/attention pairs packing is allowed for; attention leaking across samples would break that equality."""

from __future__ import annotations

import json
from types import SimpleNamespace

import peft
import pytest
import torch

import loramoe
from conftest import VOCAB, tiny_model
from loramoe import LoraMoeConfig
from loramoe.balance import importance, localized_balancing_loss, packed_importance
from loramoe.data import InstructionCollator
from loramoe.packing import PACKING_EXACT, PackingCollator, check_packing_supported, pack_rows, real_tokens
from loramoe.train import TrainConfig, train

PAD = 0
LENGTHS = [5, 9, 3, 12, 7, 2, 10, 4]  # packed into rows of 16: [12, 4] [10, 5] [9, 7] [3, 2]


def make_items(lengths=LENGTHS, seed=0) -> list[dict]:
    """Samples with random tokens; the first third of each is prompt (-100); task types 1, 0, -1 in turn."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for i, n in enumerate(lengths):
        ids = torch.randint(2, VOCAB, (n,), generator=g).tolist()
        labels = [-100] * (n // 3) + ids[n // 3 :]
        items.append({"input_ids": ids, "labels": labels, "task_type": (1, 0, -1)[i % 3]})
    return items


def loramoe_model(arch: str, attention: str, **config) -> torch.nn.Module:
    base = tiny_model(arch)
    base.set_attn_implementation(attention)
    torch.manual_seed(1)
    settings = dict(num_experts=4, r=2, lora_dropout=0.0, init_weights=False, blc_weight=0.5)
    return peft.get_peft_model(base, LoraMoeConfig(**{**settings, **config}))


def loss_and_grads(model, batch) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.lm_loss.detach(), out.blc_loss.detach(), grads


LOSS_RTOL = 2e-6  # float32 round-off: packed and padded add the same terms in another order (seen: <= 3e-7)


def grad_gap(a: dict, b: dict) -> float:
    """The largest relative difference (in norm) between the gradients of one parameter."""
    assert a.keys() == b.keys() and a
    return max(((a[k] - b[k]).norm() / b[k].norm()).item() for k in a)


# ---- the collator ----------------------------------------------------------------------------------------------


def test_first_fit_decreasing_rows():
    assert pack_rows(LENGTHS, 16) == [[3, 7], [6, 0], [1, 4], [2, 5]]
    assert pack_rows([4, 4, 4], 12) == [[0, 1, 2]]
    with pytest.raises(ValueError, match="max_seq_len: a sample has 13 tokens"):
        pack_rows([3, 13], 12)


def test_collator_by_hand():
    items = [
        {"input_ids": [11, 12, 13], "labels": [-100, 12, 13], "task_type": 1},
        {"input_ids": [21, 22, 23, 24, 25], "labels": [21, 22, -100, 24, 25], "task_type": 0},
        {"input_ids": [31, 32], "labels": [31, 32], "task_type": -1},
    ]
    b = PackingCollator(pad_token_id=PAD, max_seq_len=8)(items)  # FFD: row 0 = sample 1 then 0; row 1 = sample 2
    assert b["input_ids"].tolist() == [[21, 22, 23, 24, 25, 11, 12, 13], [31, 32, 0, 0, 0, 0, 0, 0]]
    assert b["labels"].tolist() == [[-100, 22, -100, 24, 25, -100, 12, 13], [-100, 32] + [-100] * 6]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 0, 1, 2, 3, 4, 5]]
    assert b["sample_index"].tolist() == [[1, 1, 1, 1, 1, 0, 0, 0], [2, 2, -1, -1, -1, -1, -1, -1]]
    assert b["task_types"].tolist() == [1, 0, -1]
    assert "attention_mask" not in b  # a 2-D mask would switch transformers' packed-sequence detection off
    assert int(real_tokens(b)) == 10


def test_packed_importance_sums_each_samples_tokens():
    weights = torch.rand(2, 8, 3)
    index = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0], [2, 2, -1, -1, -1, -1, -1, -1]])
    q = packed_importance(weights, index, 3)
    expected = torch.stack([weights[0, 5:].sum(0), weights[0, :5].sum(0), weights[1, :2].sum(0)])
    torch.testing.assert_close(q, expected)


# ---- packed = padded -------------------------------------------------------------------------------------------


PAIRS = [(arch, attention) for arch, attentions in PACKING_EXACT.items() for attention in attentions]


@pytest.mark.parametrize("arch,attention", PAIRS)
def test_packed_equals_padded(arch, attention):
    """Same samples: the same LM loss (token mean over the same targets), the same LBC (padding not counted) and
    the same gradient of every trainable parameter, to float32 round-off."""
    items = make_items()
    model = loramoe_model(arch, attention)
    padded = InstructionCollator(PAD)(items)
    packed = PackingCollator(PAD, max_seq_len=16)(items)
    assert packed["input_ids"].shape == (4, 16) and padded["input_ids"].shape == (8, 12)  # 64 positions, not 96
    assert int(real_tokens(packed)) == int(real_tokens(padded)) == sum(LENGTHS)
    assert (packed["labels"][:, 1:] != -100).sum() == (padded["labels"][:, 1:] != -100).sum()

    lm_pad, lbc_pad, grads_pad = loss_and_grads(model, padded)
    lm_pack, lbc_pack, grads_pack = loss_and_grads(model, packed)
    assert lbc_pad > 0
    torch.testing.assert_close(lm_pack, lm_pad, rtol=LOSS_RTOL, atol=0)
    torch.testing.assert_close(lbc_pack, lbc_pad, rtol=LOSS_RTOL, atol=0)
    assert grad_gap(grads_pack, grads_pad) < 1e-5  # seen: <= 5e-7


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_attention_across_samples_would_break_the_equality(arch):
    """The equality above is not vacuous: the same packed rows with attention crossing samples (positions running
    on through the row, or a 2-D mask of ones, which turns transformers' packed-sequence detection off) differ."""
    items = make_items()
    model = loramoe_model(arch, "sdpa")
    lm_pad, _, grads_pad = loss_and_grads(model, InstructionCollator(PAD)(items))
    packed = PackingCollator(PAD, max_seq_len=16)(items)
    positions_on = {k: v for k, v in packed.items() if k != "position_ids"}
    mask_of_ones = {**packed, "attention_mask": torch.ones_like(packed["input_ids"])}
    for leaky in (positions_on, mask_of_ones):
        lm, _, grads = loss_and_grads(model, leaky)
        assert (lm / lm_pad - 1).abs() > 20 * LOSS_RTOL  # seen: 9e-5 and more (a random tiny model barely reads context)
        assert grad_gap(grads, grads_pad) > 0.1  # seen: 0.18 and more


def test_lbc_of_packed_rows_is_per_sample():
    """Q per packed row (a row taken as one sample) gives another LBC: the per-sample scatter matters."""
    items = make_items()
    packed = PackingCollator(PAD, max_seq_len=16)(items)
    weights = torch.softmax(torch.randn(*packed["input_ids"].shape, 4), -1)
    q = packed_importance(weights, packed["sample_index"], len(items))
    per_row = importance(weights, (packed["sample_index"] >= 0).long())
    row_types = torch.tensor([items[int(r[0])]["task_type"] for r in packed["sample_index"]])
    lbc = localized_balancing_loss(q, packed["task_types"], 2, 0.1)
    assert (lbc - localized_balancing_loss(per_row, row_types, 2, 0.1)).abs() > 1e-3


def test_routing_capture_of_packed_rows_is_per_sample():
    """Captured on packed rows, each sample's routing shares and the overall ones are those of the padded batch:
    a sample's own tokens, wherever they sit, and never the padding that ends a row."""
    items = make_items()
    model = loramoe_model("llama", "sdpa")
    shares = []
    for batch in (InstructionCollator(PAD)(items), PackingCollator(PAD, max_seq_len=16)(items)):
        batch = {k: v for k, v in batch.items() if k not in ("labels", "task_types")}
        with torch.no_grad(), loramoe.capture_routing(model) as rec:
            model(**batch)
        shares.append((rec.sample_shares(), rec.expert_shares()))
    (per_sample_pad, overall_pad), (per_sample_pack, overall_pack) = shares
    name = "model.layers.1.mlp.down_proj"
    assert per_sample_pack[name].shape == per_sample_pad[name].shape == (len(items), 4)
    for module in per_sample_pad:
        torch.testing.assert_close(per_sample_pack[module], per_sample_pad[module], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(overall_pack[module], overall_pad[module], rtol=1e-5, atol=1e-6)
    assert (per_sample_pad[name] - overall_pad[name]).abs().max() > 1e-3  # samples do route differently


# ---- refusals --------------------------------------------------------------------------------------------------


def test_unverified_model_or_attention_is_refused():
    check_packing_supported(tiny_model("llama"))
    for model_type, attention in (("opt", "sdpa"), ("llama", "flash_attention_2")):
        fake = SimpleNamespace(config=SimpleNamespace(model_type=model_type, _attn_implementation=attention))
        with pytest.raises(ValueError, match=rf"^packing: model type '{model_type}' with attention '{attention}'"):
            check_packing_supported(fake)


def test_blc_count_padding_is_refused_with_packing():
    with pytest.raises(ValueError, match="^packing: .*blc_count_padding"):
        TrainConfig(data=["x.jsonl"], packing=True, blc_count_padding=True)
    model = loramoe_model("llama", "sdpa", blc_count_padding=True)
    with pytest.raises(ValueError, match="^blc_count_padding: True with a packed batch"):
        model(**PackingCollator(PAD, max_seq_len=16)(make_items()))


def test_sample_index_must_fit_the_batch_and_no_cache():
    model = loramoe_model("llama", "sdpa")
    packed = PackingCollator(PAD, max_seq_len=16)(make_items())
    with pytest.raises(ValueError, match="^sample_index holds values outside -1..6"):
        model(**{**packed, "task_types": packed["task_types"][:7]})
    with pytest.raises(ValueError, match="^sample_index has shape"):
        model(**{**packed, "sample_index": packed["sample_index"][:, 1:]})
    with pytest.raises(ValueError, match="^use_cache: True with a packed batch"):  # a cache turns detection off
        model(**packed, use_cache=True)


# ---- end to end ------------------------------------------------------------------------------------------------


def test_train_with_packing_matches_padded_run(tiny_llama_dir, tmp_path):
    """`train()` with --packing: the same steps as the padded run (same data order, loss, eval loss, adapter)."""
    data = tmp_path / "data.jsonl"
    rows = [{"instruction": "Capital?" * (1 + i % 4), "input": f"land {i}", "output": f"city {i}" * (1 + i % 3),
             "task_type": i % 2} for i in range(16)]  # fmt: skip
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = {}
    for packing in (False, True):
        cfg = TrainConfig(model=str(tiny_llama_dir), data=[str(data)], eval_file=str(data), output_dir=str(tmp_path / str(packing)),
                          num_experts=4, r=2, lora_dropout=0.0, max_seq_len=128, batch_size=8, max_steps=2, lr=1e-2,
                          warmup_ratio=0.0, progress=False, seed=0, packing=packing)  # fmt: skip
        results[packing] = train(cfg)
    padded, packed = results[False], results[True]
    for key in ("lm_loss", "blc_loss", "eval_loss", "eval_blc_loss"):
        assert packed.metrics[key] == pytest.approx(padded.metrics[key], rel=1e-4), key
    tokens = [json.loads((tmp_path / str(p) / "metrics.jsonl").read_text().splitlines()[-1])["tokens"] for p in results]
    assert tokens[0] == tokens[1] > 0  # real tokens, counted alike
    state = {k: v for k, v in packed.model.state_dict().items() if "loramoe_" in k}
    reference = padded.model.state_dict()
    for k, v in state.items():
        torch.testing.assert_close(v, reference[k], rtol=1e-3, atol=1e-5, msg=k)
