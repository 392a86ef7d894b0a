"""The LBC weighs the same whatever the layout of an optimizer step (SPEC "The LBC at scale"): the same 4
micro-batches of 2 samples, processed as 1 process x 4 accumulation steps or 2 processes x 2 (and 4 x 1), give the
update of the objective

    LM token mean over the 4 micro-batches + beta * mean of their 4 LBCs,

computed here independently (per-token cross-entropy from the logits, one backward, one optimizer step). A test
per trainer path: `loramoe train` (DDP, --fsdp, --deepspeed), `LoraMoeTrainer` and TRL's `LoraMoeSFTTrainer`.
The adapter starts with B != 0 and beta = 1, so a wrongly weighed LBC turns the routers' update (Adam: flips the
sign of some of its entries, 2 x lr apart; SGD: moves it by its full size).

Tolerance 1e-6 (float32 sums in another order); measured at most 3e-8 on every path and layout (docs/training.md,
"The LBC weight at scale").
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import peft
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from lbc_paths import BATCH, BETA, LR, adapter_model, launch, run, write_data
from loramoe.data import InstructionCollator, load_instruction_data
from loramoe.loading import load_tokenizer
from loramoe.train import SampleStream

REPO = Path(__file__).resolve().parent.parent
HAVE_TRL = importlib.util.find_spec("trl") is not None
LOOP_TOLERANCE = SGD_TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def lbc_data(tmp_path_factory) -> str:
    return write_data(tmp_path_factory.mktemp("lbc") / "lbc.jsonl")


def reference(tiny: str, data_file: str, groups: list[list[int]], adam: bool, beta: float = BETA) -> dict:
    """The adapter after one update of the objective above, written out plainly."""
    tokenizer = load_tokenizer(tiny)
    data = load_instruction_data(data_file, tokenizer, max_seq_len=64)
    collate = InstructionCollator(tokenizer.pad_token_id)
    micro = [collate([data[i] for i in group]) for group in groups]
    model = adapter_model(tiny).train()
    params = [p for p in model.parameters() if p.requires_grad]
    tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro)
    lm, lbc = 0.0, []
    for batch in micro:
        out = model(**batch)
        ce = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), reduction="sum")
        lm, lbc = lm + ce / tokens, [*lbc, out.blc_loss]
    (lm + beta * torch.stack(lbc).mean()).backward()
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0) if adam else torch.optim.SGD(params, lr=1.0)
    optimizer.step()
    return peft.get_peft_model_state_dict(model)


def loop_groups(size: int = 8) -> list[list[int]]:
    """The micro-batches of `loramoe train`'s first step: pairs of its seeded sample stream (seed 0)."""
    stream = SampleStream(size, seed=0)
    order = [stream[i] for i in range(size)]
    return [order[i : i + BATCH] for i in range(0, size, BATCH)]


SEQUENTIAL = [[0, 1], [2, 3], [4, 5], [6, 7]]  # the HF trainers' groups (train_sampling_strategy="sequential")


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter_model.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_our_loop(tiny_llama_dir, lbc_data, tmp_path):
    expected = reference(str(tiny_llama_dir), lbc_data, loop_groups(), adam=True)
    run("loop", str(tiny_llama_dir), lbc_data, str(tmp_path / "1x4"), 4)
    assert max_diff(adapter(tmp_path / "1x4"), expected) < LOOP_TOLERANCE
    # the comparison can fail: the LBC weighed x 2 moves the update by 2 x lr in places
    assert max_diff(reference(str(tiny_llama_dir), lbc_data, loop_groups(), adam=True, beta=2 * BETA), expected) > LR


@pytest.mark.parametrize("path", ["trainer", "trl"])
def test_hf_trainers(path, tiny_llama_dir, lbc_data, tmp_path):
    if path == "trl" and not HAVE_TRL:
        pytest.skip("trl is not installed")
    run(path, str(tiny_llama_dir), lbc_data, str(tmp_path / "1x4"), 4)
    expected = reference(str(tiny_llama_dir), lbc_data, SEQUENTIAL, adam=False)
    assert max_diff(adapter(tmp_path / "1x4"), expected) < SGD_TOLERANCE


def test_two_processes(tiny_llama_dir, lbc_data, tmp_path):
    """2 processes x 2 accumulation steps, every path without DeepSpeed (our loop with DDP and with --fsdp,
    LoraMoeTrainer, LoraMoeSFTTrainer) in one torchrun launch, one after the other."""
    paths = ["loop", "fsdp", "trainer", *(["trl"] if HAVE_TRL else [])]
    proc = launch(paths, 2, str(tiny_llama_dir), lbc_data, str(tmp_path), 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    adam = reference(str(tiny_llama_dir), lbc_data, loop_groups(), adam=True)
    sgd = reference(str(tiny_llama_dir), lbc_data, SEQUENTIAL, adam=False)
    for path in paths:
        expected, tolerance = (adam, LOOP_TOLERANCE) if path in ("loop", "fsdp") else (sgd, SGD_TOLERANCE)
        assert max_diff(adapter(tmp_path / path), expected) < tolerance, path


@pytest.mark.slow
def test_four_processes(tiny_llama_dir, lbc_data, tmp_path):
    proc = launch(["loop", "trainer"], 4, str(tiny_llama_dir), lbc_data, str(tmp_path), 1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert max_diff(adapter(tmp_path / "loop"), reference(str(tiny_llama_dir), lbc_data, loop_groups(), adam=True)) < LOOP_TOLERANCE
    assert max_diff(adapter(tmp_path / "trainer"), reference(str(tiny_llama_dir), lbc_data, SEQUENTIAL, adam=False)) < SGD_TOLERANCE


def test_deepspeed(tiny_llama_dir, lbc_data, tmp_path):
    """ZeRO-2 (the shipped examples/deepspeed/zero2.json) through `loramoe train` and through `LoraMoeTrainer`,
    2 processes x 2 accumulation steps."""
    pytest.importorskip("deepspeed")
    proc = launch(["deepspeed", "trainer-deepspeed"], 2, str(tiny_llama_dir), lbc_data, str(tmp_path), 2,
                  str(REPO / "examples" / "deepspeed" / "zero2.json"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    loop = reference(str(tiny_llama_dir), lbc_data, loop_groups(), adam=True)
    assert max_diff(adapter(tmp_path / "deepspeed"), loop) < LOOP_TOLERANCE
    sgd = reference(str(tiny_llama_dir), lbc_data, SEQUENTIAL, adam=False)
    assert max_diff(adapter(tmp_path / "trainer-deepspeed"), sgd) < SGD_TOLERANCE


def test_plain_trainer_counts_the_lbc_once_per_micro_batch(tiny_llama_dir, lbc_data, tmp_path):
    """Why `LoraMoeTrainer` exists: transformers' own Trainer sums the model's loss over the 4 micro-batches, so
    its update is the objective's with beta x 4 (processes x accumulation)."""
    from transformers import Trainer, TrainingArguments

    from lbc_paths import _trainer_args

    tokenizer = load_tokenizer(str(tiny_llama_dir))
    data = load_instruction_data(lbc_data, tokenizer, max_seq_len=64)
    model = adapter_model(str(tiny_llama_dir))
    args = TrainingArguments(**_trainer_args(str(tmp_path / "plain"), 4, None))
    Trainer(model=model, args=args, train_dataset=data, data_collator=InstructionCollator(tokenizer.pad_token_id)).train()
    plain = peft.get_peft_model_state_dict(model)
    assert max_diff(plain, reference(str(tiny_llama_dir), lbc_data, SEQUENTIAL, adam=False)) > 0.1
    assert max_diff(plain, reference(str(tiny_llama_dir), lbc_data, SEQUENTIAL, adam=False, beta=4 * BETA)) < SGD_TOLERANCE


def test_outputs_survive_ddps_pytree_round_trip(tiny_llama_dir):
    """DDP with find_unused_parameters (the Trainer's setting for a PEFT model) rebuilds the model's output from
    its pytree, which fails on a key that is not a field of the output class (`lm_loss`, `blc_loss`)."""
    from torch.utils._pytree import tree_flatten, tree_unflatten

    model = adapter_model(str(tiny_llama_dir))
    ids = torch.randint(3, 200, (2, 7), generator=torch.Generator().manual_seed(0))
    out = model(input_ids=ids, labels=ids, task_types=torch.tensor([0, 1]))
    back = tree_unflatten(*tree_flatten(out))
    assert type(back) is type(out) and back.keys() == out.keys()
    assert torch.equal(back.loss, back.lm_loss + BETA * back.blc_loss) and float(back.blc_loss) > 0
