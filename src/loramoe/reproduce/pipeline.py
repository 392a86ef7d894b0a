"""The paper's experiment in miniature: fine-tune one base model with every method on the same instruction
data at several data scales, and measure world knowledge (closed-book QA on facts never fine-tuned on),
downstream skill and, for LoRAMoE, where the router sends each dataset.

Training, evaluation and routing statistics are the library's own (`loramoe.train`, `loramoe.evaluate`,
`loramoe.routing`); this module only builds the data, schedules the runs and collects the numbers.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..evaluate import evaluate, load_tasks
from ..routing import routing_profile
from ..train import TrainConfig, train
from .store import fingerprint, inputs_digest, load_done, weights_sha256, write_json_atomic
from .tasks import FAMILIES, KNOWLEDGE_TASK, Sample, generate
from .world import World

# method name -> TrainConfig.method; "base" is the untouched base model; LoRAMoE runs with and without the LBC
METHODS: dict[str, str | None] = {"base": None, "sft": "full", "lora": "lora", "loramoe": "loramoe", "loramoe_lbc": "loramoe"}
VALID_TASK = KNOWLEDGE_TASK + "_valid"
RESULTS_DIR = "results"  # one JSON file per finished run: what a rerun with the same --out reuses


@dataclass
class Preset:
    """One experiment: base model, data sizes and fine-tuning hyperparameters (shared by all methods but lr)."""

    name: str
    model_ref: str  # what TrainConfig.model and saved adapters record as the base model
    load: Callable[[], tuple[Any, Any]]  # -> (base model, tokenizer)
    knowledge: Callable[[], dict[str, list[Sample]]]  # {"train", "valid", "test"} closed-book QA samples
    world: Callable[[], World]  # source of made-up names and values for the reading-comprehension family
    scales: tuple[float, ...] = (1, 2, 4, 8)
    downstream_per_family: int = 50  # at scale 1
    test_per_family: int = 100
    epochs: float = 3.0
    batch_size: int = 16
    lr_full: float = 1e-3
    lr_adapter: float = 2e-3
    num_experts: int = 6
    r: int = 4
    lora_alpha: float = 32.0
    target_modules: tuple[str, ...] | None = None  # None: the feed-forward linears (the paper's choice)
    lbc_beta: float = 0.1  # LBC weight (beta) of loramoe_lbc; loramoe runs with beta = 0
    lbc_delta: float = 0.1  # LBC contrast (delta)
    max_seq_len: int = 128
    eval_batch_size: int = 64
    max_new_tokens: int = 8
    chat: bool = False  # records in chat format (rendered with the tokenizer's chat template)
    knowledge_shots: tuple[Sample, ...] = ()  # worked examples before every knowledge question (chat only)
    families: tuple[str, ...] = tuple(FAMILIES)
    # CPU threads for torch. A model this small gains nothing from more, and on a shared machine several busy
    # processes with 2+ spinning OpenMP threads each were 10x slower per step than with 1 (measured). None: torch's.
    threads: int | None = 1
    quantize: str | None = None  # nf4 | fp4 | int8: every method's base quantized (bitsandbytes); no full SFT then
    bnb_compute_dtype: str | None = None


def load_base(preset: Preset) -> tuple[Any, Any]:
    """(base model, tokenizer) of ``preset``, the base quantized in memory when the preset says so (on the
    device training will use: a quantized model is not moved after loading)."""
    base, tokenizer = preset.load()
    if preset.quantize:
        from ..quantization import quantize_model

        device = "cuda" if torch.cuda.is_available() else "cpu"
        base = quantize_model(base, preset.quantize, preset.bnb_compute_dtype, device)
    return base, tokenizer


@dataclass
class Plan:
    """Which runs to do; ``steps`` fixes the optimizer steps of every run (default: ``preset.epochs``)."""

    preset: Preset
    out: Path
    seeds: list[int]
    scales: list[float]
    methods: list[str]
    steps: int | None = None
    routing_methods: tuple[str, ...] = ("loramoe", "loramoe_lbc")


# ---- data ------------------------------------------------------------------------------------------------------


def train_record(sample: Sample, preset: Preset) -> dict:
    if not preset.chat:
        return sample.train_record()
    return {"messages": _messages(sample, preset) + [{"role": "assistant", "content": sample.output}],
            "task_type": sample.task_type}  # fmt: skip


def _messages(sample: Sample, preset: Preset) -> list[dict[str, str]]:
    shots = preset.knowledge_shots if sample.task_type == 1 else ()
    turns = []
    for s in (*shots, sample):
        turns.append({"role": "user", "content": f"{s.instruction}\n{s.input}" if s.input else s.instruction})
        if s is not sample:
            turns.append({"role": "assistant", "content": s.output})
    return turns


def eval_prompt(sample: Sample, preset: Preset, tokenizer: Any) -> str:
    """The prompt exactly as fine-tuning presents it (SPEC.md's reference layout: instruction, "\\n" + input,
    then EOS; or the chat template's rendering up to the assistant's turn)."""
    if preset.chat:
        return tokenizer.apply_chat_template(_messages(sample, preset), tokenize=False, add_generation_prompt=True)
    body = f"{sample.instruction}\n{sample.input}" if sample.input else sample.instruction
    return body + tokenizer.eos_token


def eval_record(sample: Sample, preset: Preset, tokenizer: Any, task: str | None = None) -> dict:
    record = {"task": task or sample.task, "prompt": eval_prompt(sample, preset, tokenizer)}
    if sample.choices:
        return {**record, "type": "choice", "choices": list(sample.choices), "answer": sample.choices.index(sample.output)}
    return {**record, "type": "generate", "answers": [sample.output, *sample.aliases]}


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@dataclass
class ExperimentData:
    """Files of one experiment: training files per scale and the evaluation task files."""

    train_files: dict[float, list[Path]]
    test_files: list[Path]  # world knowledge (test facts) + one file per downstream family
    valid_file: Path  # world knowledge on validation facts: for choosing hyperparameters, never the test facts
    counts: dict[str, int] = field(default_factory=dict)


def build_data(preset: Preset, scales: list[float], out: Path, tokenizer: Any, seed: int = 0) -> ExperimentData:
    """Write the instruction data (knowledge QA on training facts + downstream samples x scale) and the test sets.

    Downstream training samples never repeat a test input; the data at scale s is a prefix of the data at any
    larger scale, so scales differ only by how much downstream data is added.
    """
    world = preset.world()
    knowledge = preset.knowledge()
    tests = {fam: generate(fam, preset.test_per_family, seed + 1000, world) for fam in preset.families}
    biggest = {
        fam: generate(fam, math.ceil(preset.downstream_per_family * max(scales)), seed, world, exclude=tests[fam])
        for fam in preset.families
    }
    files = {}
    k_path = _write_jsonl(out / "data" / "knowledge_train.jsonl", [train_record(s, preset) for s in knowledge["train"]])
    counts = {"knowledge_train": len(knowledge["train"])}
    for scale in scales:
        n = math.ceil(preset.downstream_per_family * scale)
        mixed = [s for fam in preset.families for s in biggest[fam][:n]]
        random.Random(seed).shuffle(mixed)
        d_path = _write_jsonl(out / "data" / f"downstream_x{scale:g}.jsonl", [train_record(s, preset) for s in mixed])
        files[scale] = [k_path, d_path]
        counts[f"downstream_x{scale:g}"] = len(mixed)
    test_files = [_write_jsonl(out / "tasks" / f"{KNOWLEDGE_TASK}.jsonl",
                               [eval_record(s, preset, tokenizer) for s in knowledge["test"]])]  # fmt: skip
    test_files += [
        _write_jsonl(out / "tasks" / f"{fam}.jsonl", [eval_record(s, preset, tokenizer) for s in tests[fam]])
        for fam in preset.families
    ]
    valid = _write_jsonl(out / "tasks" / f"{VALID_TASK}.jsonl",
                         [eval_record(s, preset, tokenizer, VALID_TASK) for s in knowledge["valid"]])  # fmt: skip
    counts.update(knowledge_test=len(knowledge["test"]), knowledge_valid=len(knowledge["valid"]))
    return ExperimentData(files, test_files, valid, counts)


# ---- runs ------------------------------------------------------------------------------------------------------


def train_config(plan: Plan, method: str, scale: float, seed: int, data: ExperimentData, steps: int) -> TrainConfig:
    p = plan.preset
    return TrainConfig(
        model=p.model_ref, data=[str(f) for f in data.train_files[scale]], method=METHODS[method],
        output_dir=str(plan.out / "runs" / f"{method}_x{scale:g}_seed{seed}"),
        lr=p.lr_full if method == "sft" else p.lr_adapter, batch_size=p.batch_size, max_steps=steps, seed=seed,
        num_experts=p.num_experts, r=p.r, lora_alpha=p.lora_alpha, max_seq_len=p.max_seq_len,
        blc_weight=p.lbc_beta if method == "loramoe_lbc" else 0.0, blc_alpha=p.lbc_delta,
        target_modules=list(p.target_modules) if p.target_modules else None,
        quantize=p.quantize, bnb_compute_dtype=p.bnb_compute_dtype, progress=False, overwrite=True, log_every=10,
    )  # fmt: skip


def planned_steps(plan: Plan, data: ExperimentData) -> dict[float, int]:
    """Optimizer steps per scale: ``plan.steps``, or ``epochs`` passes over that scale's data."""
    if plan.steps is not None:
        return dict.fromkeys(plan.scales, plan.steps)
    sizes = {s: data.counts["knowledge_train"] + data.counts[f"downstream_x{s:g}"] for s in plan.scales}
    return {s: max(1, math.ceil(plan.preset.epochs * sizes[s] / plan.preset.batch_size)) for s in plan.scales}


class Progress:
    """Prints which stage runs and an estimate of the time left, from the training steps done so far."""

    def __init__(self, total_units: float, log: Callable[[str], None]) -> None:
        self.total, self.done, self.start, self.log = total_units, 0.0, time.time(), log

    def stage(self, text: str) -> None:
        elapsed = time.time() - self.start
        left = f"~{_fmt(elapsed / self.done * (self.total - self.done))} left" if self.done else "estimating time left"
        self.log(f"[{100 * self.done / self.total:3.0f}% | {_fmt(elapsed)} elapsed | {left}] {text}")

    def advance(self, units: float) -> None:
        self.done += units


def _fmt(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


EVAL_UNITS = 20  # an evaluation costs about as much as this many training steps (for the time estimate only)


def scorer(preset: Preset, tokenizer: Any, samples: list) -> Callable[[Any], dict[str, float]]:
    """model -> its main score per task on ``samples``, decoded as ``preset`` says."""

    def score(model: Any) -> dict[str, float]:
        report = evaluate(model, tokenizer, samples, preset.eval_batch_size, preset.max_new_tokens, progress=False)
        return dict(report.main)

    return score


def train_and_measure(cfg: TrainConfig, base: Any, tokenizer: Any, score: Callable[[Any], dict[str, float]],
                      route_on: list | None, eval_batch_size: int) -> tuple[dict[str, Any], Any]:  # fmt: skip
    """Fine-tune a copy of ``base`` with ``cfg`` and measure it: scores, size, time, final loss, ``cfg``'s
    fingerprint (what a rerun matches against) and, given ``route_on``, the knowledge-expert share per dataset.
    Returns (that record, the routing profile or None)."""
    result = train(cfg, model=copy.deepcopy(base), tokenizer=tokenizer)
    record = {"scores": score(result.model), "trainable_params": result.trainable_params,
              "train_seconds": result.train_seconds, "steps": result.steps,
              "final_lm_loss": result.metrics.get("lm_loss"), "train_config": fingerprint(cfg)}  # fmt: skip
    profile = None
    if route_on is not None:
        profile = routing_profile(result.model, tokenizer, route_on, eval_batch_size, progress=False)
        record["knowledge_share"] = {name: profile.knowledge_share(name) for name in profile.datasets}
    return record, profile


def run_experiment(plan: Plan, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Do every (method, scale, seed) run of ``plan``; return the raw results that `report.summarise` reads."""
    plan.out.mkdir(parents=True, exist_ok=True)
    if plan.preset.threads:
        torch.set_num_threads(plan.preset.threads)
    base, tokenizer = load_base(plan.preset)
    data = build_data(plan.preset, plan.scales, plan.out, tokenizer)
    steps = planned_steps(plan, data)
    test = load_tasks(data.test_files)
    samples = test + load_tasks([data.valid_file])
    trained = [m for m in plan.methods if METHODS[m] is not None]
    units = len(plan.seeds) * len(trained) * sum(steps[s] + EVAL_UNITS for s in plan.scales) + EVAL_UNITS
    progress = Progress(units, log)
    log(f"data: {data.counts}; steps per scale: {steps}")

    score = scorer(plan.preset, tokenizer, samples)
    inputs = inputs_digest(weights_sha256(base), [*data.test_files, data.valid_file])
    runs: list[dict[str, Any]] = []

    def finish(run: dict[str, Any], path: Path) -> None:
        write_json_atomic(path, run)
        runs.append(run)
        _write_jsonl(plan.out / "runs.jsonl", runs)

    if "base" in plan.methods:
        path = plan.out / RESULTS_DIR / "base.json"
        base_config = {"method": "base", "model": plan.preset.model_ref}
        run = load_done(path, base_config, inputs)
        if run is None:
            progress.stage("evaluating the base model")
            run = {"method": "base", "scale": None, "seed": None, "scores": score(base), "trainable_params": 0,
                   "train_seconds": 0.0, "steps": 0, "train_config": base_config, "inputs": inputs}  # fmt: skip
        else:
            log(f"base: done earlier ({path})")
        progress.advance(EVAL_UNITS)
        finish(run, path)
    for seed in plan.seeds:
        for scale in plan.scales:
            for method in trained:
                cfg = train_config(plan, method, scale, seed, data, steps[scale])
                path = plan.out / RESULTS_DIR / f"{method}_x{scale:g}_seed{seed}.json"
                run_inputs = inputs_digest(inputs["base_weights_sha256"], [*data.train_files[scale], *data.test_files,
                                                                           data.valid_file])  # fmt: skip
                run = load_done(path, fingerprint(cfg), run_inputs)
                if run is not None:
                    log(f"{method}: data x{scale:g}, seed {seed}: done earlier ({path})")
                    progress.total -= steps[scale] + EVAL_UNITS  # the time estimate counts work still to do
                    finish(run, path)
                    continue
                progress.stage(f"{method}: data x{scale:g}, seed {seed}, {steps[scale]} steps")
                routed = method in plan.routing_methods and scale == max(plan.scales)
                measured, profile = train_and_measure(cfg, base, tokenizer, score, test if routed else None,
                                                      plan.preset.eval_batch_size)  # fmt: skip
                run = {"method": method, "scale": scale, "seed": seed, **measured, "inputs": run_inputs}
                if profile is not None and seed == plan.seeds[0]:
                    profile.save(plan.out / "routing" / method)
                progress.advance(steps[scale] + EVAL_UNITS)
                finish(run, path)
    progress.stage("done")
    return {"preset": plan.preset.name, "seeds": plan.seeds, "scales": plan.scales, "runs": runs,
            "data": data.counts, "steps": {f"{s:g}": n for s, n in steps.items()},
            "downstream_tasks": list(plan.preset.families), "wall_seconds": time.time() - progress.start}  # fmt: skip


def with_overrides(preset: Preset, **changes: Any) -> Preset:
    """A copy of ``preset`` with some fields changed (e.g. smaller sizes for a smoke test)."""
    return replace(preset, **{k: v for k, v in changes.items() if v is not None})
