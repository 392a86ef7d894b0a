"""Checkpoints (loramoe.checkpoint): the known-good rule on hand-made loss curves, and checksum verification.
Saving, resuming and falling back inside real training runs are tested in test_train.py."""

from __future__ import annotations

import json

import torch

from loramoe.checkpoint import (
    Checkpointer,
    StabilityWatch,
    checkpoint_dirs,
    newest_known_good,
    verify,
    write_checksums,
)


def _run(watch: StabilityWatch, steps: list[tuple[float, float]]) -> list[bool]:
    return [watch.observe(loss, norm) for loss, norm in steps]


def test_a_loss_jump_is_unstable_and_a_high_plateau_never_becomes_normal():
    watch = StabilityWatch()
    start = [(4.0, 1.0), (3.5, 1.0), (3.0, 1.0), (2.8, 1.0), (2.6, 1.0)]  # median loss 3.0
    assert _run(watch, start) == [True] * 5
    assert _run(watch, [(5.9, 1.0)]) == [True]  # <= 2 x 3.0
    # median of the last stable losses [4, 3.5, 3, 2.8, 2.6, 5.9] = 3.25: 6.6 > 6.5 jumps; a diverged run stays
    # unstable however long it sits at that loss, since unstable steps never enter the loss window
    assert _run(watch, [(6.6, 1.0)] + [(7.0, 1.0)] * 40) == [False] * 41
    assert _run(watch, [(3.0, 1.0)]) == [True]  # back in line: stable again
    assert _run(watch, [(float("nan"), 1.0), (2.0, float("inf"))]) == [False, False]


def test_a_gradient_norm_jump_is_unstable_until_it_is_the_new_normal():
    """Twenty steps at norm 1, then norm 20: the median of the last 20 norms reaches 10.5 when 10 of them are
    20s, so the first ten steps at 20 are unstable and the eleventh is not."""
    watch = StabilityWatch()
    assert all(_run(watch, [(2.0, 1.0)] * 20))
    assert _run(watch, [(2.0, 20.0)] * 11) == [False] * 10 + [True]


def test_exactly_twice_the_median_loss_and_ten_times_the_median_norm_are_stable():
    """The boundaries, with exactly representable numbers: median loss 2.0 and median norm 1.0 after five steps."""
    start = [(1.0, 1.0), (2.0, 1.0), (2.0, 1.0), (2.0, 1.0), (3.0, 1.0)]
    for step, expected in [((4.0, 1.0), True), ((4.000001, 1.0), False), ((2.0, 10.0), True), ((2.0, 10.00001), False)]:
        watch = StabilityWatch()
        assert _run(watch, start) == [True] * 5
        assert watch.observe(*step) is expected, step


def test_the_first_five_finite_steps_are_stable_whatever_their_loss():
    """Warm-up: losses and norms far apart are normal early on. A non-finite step is never stable and is not one of
    the five; the sixth finite step is judged, against median loss 1000 and median norm 1 of the five before it."""
    warm_up = [(float("nan"), 1.0), (1e4, 1.0), (1e3, 1.0), (1e2, 1.0), (10.0, 1.0), (1e5, 50.0)]
    for sixth, expected in [((2000.0, 1.0), True), ((2001.0, 1.0), False), ((10.0, 11.0), False)]:
        watch = StabilityWatch()
        assert _run(watch, warm_up) == [False] + [True] * 5
        assert watch.observe(*sixth) is expected, sixth


def test_watch_state_round_trips_through_json():
    a, b = StabilityWatch(), StabilityWatch()
    _run(a, [(3.0, 1.0)] * 6 + [(9.0, 1.0)])
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert _run(a, [(9.0, 1.0), (3.0, 2.0)]) == _run(b, [(9.0, 1.0), (3.0, 2.0)]) == [False, True]


def test_verify_names_the_file_that_differs_is_missing_or_was_added(tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "weights.bin").write_bytes(b"0123456789")
    (tmp_path / "adapter" / "config.json").write_text("{}")
    write_checksums(tmp_path)
    assert verify(tmp_path) is None
    (tmp_path / "weights.bin").write_bytes(b"01234")
    assert verify(tmp_path) == f"{tmp_path / 'weights.bin'}: sha256 differs from the one written at save time (truncated or changed)"
    (tmp_path / "weights.bin").unlink()
    assert verify(tmp_path) == f"{tmp_path / 'weights.bin'}: missing"
    (tmp_path / "weights.bin").write_bytes(b"0123456789")
    (tmp_path / "extra.pt").write_bytes(b"x")
    assert verify(tmp_path) == f"{tmp_path / 'extra.pt'}: not written at save time"
    (tmp_path / "checksums.json").unlink()
    assert verify(tmp_path) is None  # a checkpoint from before checksums: judged by whether it loads


def test_a_checkpoint_from_before_the_known_good_rule_counts_as_known_good(tmp_path):
    """checkpoint-2 was written before the rule (no "known_good" in its state), 4 and 6 after a loss jump: 2 is
    the one a non-finite stop names, and saving checkpoint-8 (keep_last=1) keeps it beside 8."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    for step, state in ((2, {}), (4, {"known_good": False}), (6, {"known_good": False})):
        path = tmp_path / "checkpoints" / f"checkpoint-{step}"
        path.mkdir(parents=True)
        (path / "trainer_state.json").write_text(json.dumps({"step": step, **state}))
    assert newest_known_good(tmp_path) == tmp_path / "checkpoints" / "checkpoint-2"
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    try:
        Checkpointer(Accelerator(cpu=True), tmp_path, keep_last=1, sharded=False).save(
            8, model, optimizer, {"step": 8, "known_good": False})  # fmt: skip
    finally:
        AcceleratorState._reset_state()  # process-wide: leave the next Accelerator its own settings, as train() does
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["checkpoint-2", "checkpoint-8"]
    assert newest_known_good(tmp_path) == tmp_path / "checkpoints" / "checkpoint-2"
