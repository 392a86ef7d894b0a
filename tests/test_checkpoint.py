"""Checkpoints (loramoe.checkpoint): the known-good rule on hand-made loss curves, and checksum verification.
Saving, resuming and falling back inside real training runs are tested in test_train.py."""

from __future__ import annotations

import json

from loramoe.checkpoint import StabilityWatch, verify, write_checksums


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
