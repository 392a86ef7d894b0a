"""The experiments `loramoe reproduce` knows: ``tiny`` (the miniature world and its shipped base model) and
``smollm2`` (SmolLM2-135M-Instruct with a closed-book probe of real-world facts)."""

from __future__ import annotations

import functools
import json
import random
from pathlib import Path
from typing import Any

from ..loading import load_base_model, load_tokenizer
from .knowledge import load_probe, qa_completion, statement_completion
from .pipeline import ADAPTER_METHODS, Preset
from .tasks import MAX_WORDS, Sample, knowledge_sample
from .world import World, make_world

ASSETS = Path(__file__).parent / "assets"
TINY_BASE = ASSETS / "tiny_base"
REAL_FACTS = ASSETS / "realworld_facts.jsonl"
# Written by hand for issue 23, apart from REAL_FACTS and examples/knowledge/more_facts.jsonl: other categories
# (units, sport, biology, rivers and other geography without capitals, music, food, technology, science without
# element symbols, history without years, fictional characters, flags), no question shared with either file.
OUT_OF_POOL_FACTS = ASSETS / "outofpool_facts.jsonl"


def successor_facts() -> list[dict[str, Any]]:
    """The tiny base's only knowledge outside its people: the number facts of its general pre-training text
    ("The number 4 comes after 3."), asked as that statement cut before the value. The knowledge QA never
    asks them (it draws from the people's facts), so they are the tiny world's out-of-pool set: 7 facts."""
    return [{"question": f"What number comes before {n + 1}?", "prompt": f"The number {n + 1} comes after",
             "answers": [str(n)]} for n in range(MAX_WORDS)]  # fmt: skip


def base_world(base_dir: Path) -> World:
    """The world a pre-trained base model read: rebuilt from the seed and size in its ``pretrain_config.json``."""
    path = Path(base_dir) / "pretrain_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: expected a base model written by loramoe.reproduce.pretrain.")
    cfg = json.loads(path.read_text())
    return make_world(cfg["seed"], cfg["num_people"])


def tiny_preset(base_dir: Path = TINY_BASE, **changes) -> Preset:
    """The miniature world: knowledge = QA on train people; valid and test people are never fine-tuned on."""
    base_dir = Path(base_dir)

    def knowledge() -> dict[str, list[Sample]]:
        world = base_world(base_dir)
        return {split: [knowledge_sample(f) for f in world.facts_of(split)] for split in ("train", "valid", "test")}

    def load():
        return load_base_model(str(base_dir)), load_tokenizer(str(base_dir))

    completion = functools.cache(lambda: statement_completion(base_world(base_dir)))  # built on first use, once
    return Preset(name="tiny", model_ref=str(base_dir), load=load, knowledge=knowledge, world=lambda: base_world(base_dir),
                  format_free=lambda sample: completion()(sample), out_of_pool=successor_facts, **changes)  # fmt: skip


def split_probe(samples: list[Sample], seed: int = 0, shots: int = 3, fractions: tuple[float, float] = (0.5, 0.15)):
    """(shots, {"train", "valid", "test"}): a seeded shuffle; the shots are worked examples, in no split."""
    order = list(samples)
    random.Random(seed).shuffle(order)
    n_train, n_valid = round(fractions[0] * (len(order) - shots)), round(fractions[1] * (len(order) - shots))
    rest = order[shots:]
    return tuple(order[:shots]), {
        "train": rest[:n_train], "valid": rest[n_train : n_train + n_valid], "test": rest[n_train + n_valid :],
    }  # fmt: skip


def smollm2_preset(probe: Path = REAL_FACTS, **changes) -> Preset:
    """SmolLM2-135M-Instruct fine-tuned in its chat format. World knowledge is measured format-free (three worked
    examples from no split, then the question, as a plain completion) and in-format (the question as a single chat
    turn, as the fine-tuning data asks it).

    Sized for 2 CPU cores: data x1, x4 and x16, one epoch (41, 101 and 341 steps of batch 8, ~400 tokens each),
    3 seeds at the largest scale's decisive setting. The grid is the one of the study committed in 2026-12 (x1 and
    x4; sft 2e-5 .. 3e-4, adapters 2e-4 .. 1.25e-3) reduced to the lrs around the ones it validated at x4 (sft 2e-5,
    adapters 5e-4): sft 1e-5, 2e-5, 5e-5 (2e-5 was that grid's lowest, and more data calls for a lower lr, not a
    higher one: 1.25e-4 and 3e-4 forgot 3 and 18 points at x4 with less skill) and adapters 2e-4, 5e-4 (1.25e-3 gave
    no adapter more validation knowledge). The decisive lrs are still chosen per scale on validation data only. Entailment is left
    out: no method learned it in any earlier SmolLM2 run (44 % = the majority answer, at every lr and scale), so
    it could only dilute the downstream mean. Of the other four, reading, sentiment and reverse reach 94-100 % with
    every method; count only 15-31 % (the committed study, x4).
    """
    shots, splits = split_probe(load_probe(probe))
    prompt = qa_completion(shots)

    def out_of_pool() -> list[dict[str, Any]]:
        return [{"question": s.input, "prompt": prompt(s), "answers": [s.output, *s.aliases]}
                for s in load_probe(OUT_OF_POOL_FACTS)]  # fmt: skip

    def load():
        return load_base_model("smollm2"), load_tokenizer("smollm2")

    settings = dict(
        scales=(1, 4, 16), downstream_per_family=40, test_per_family=40, valid_per_family=16, epochs=1.0, batch_size=8,
        lr_full=5e-5, lr_adapter=5e-4, decisive_seeds=3, max_seq_len=256, eval_batch_size=32, max_new_tokens=12,
        chat=True, families=("reading", "sentiment", "count", "reverse"), threads=None,
        lr_grid={"sft": (1e-5, 2e-5, 5e-5), **dict.fromkeys(ADAPTER_METHODS, (2e-4, 5e-4))},
    )  # fmt: skip
    return Preset(name="smollm2", model_ref="smollm2", load=load, knowledge=lambda: splits, world=lambda: make_world(0),
                  format_free=prompt, out_of_pool=out_of_pool, **{**settings, **changes})  # fmt: skip


PRESETS = {"tiny": tiny_preset, "smollm2": smollm2_preset}
