"""The paper's experiment: fine-tune one base model with every method on the same instruction data at several
data scales and learning rates, and measure world knowledge (closed-book QA on facts never fine-tuned on, in two
formats), downstream skill and, for LoRAMoE, where the router sends each dataset.

The runs come in two stages. The *grid*: every method at every data scale and learning rate of its grid, with the
plan's seeds; it traces each method's knowledge-skill frontier. The *decisive setting*: at the largest scale each
method keeps the lr chosen on validation data (`choose_lrs`), and that point gets the extra seeds that the paired
bootstrap needs. Test questions never choose anything.

Training, evaluation and routing statistics are the library's own (`loramoe.train`, `loramoe.evaluate`,
`loramoe.routing`); this module only builds the data, schedules the runs and collects the numbers.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import random
import shutil
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..errors import RunStopped
from ..evaluate import EvalSample, evaluate, load_tasks, normalize_answer
from ..outputs import OutputDir
from ..quantization import check_options as check_quantization
from ..routing import routing_profile
from ..train import NonFiniteLossError, TrainConfig, train
from .divergence import next_token_kl
from .knowledge import answer_logprobs, load_probe
from .mastery import MASTERY_ARMS, split_known
from .store import fingerprint, inputs_digest, load_done, weights_sha256, write_json_atomic
from .tasks import FAMILIES, KNOWLEDGE_TASK, Sample, generate
from .world import World

# method name -> TrainConfig.method; "base" is the untouched base model; LoRAMoE runs with and without the LBC
METHODS: dict[str, str | None] = {"base": None, "sft": "full", "lora": "lora", "loramoe": "loramoe", "loramoe_lbc": "loramoe"}
ADAPTER_METHODS = ("lora", "loramoe", "loramoe_lbc")
# Knowledge tasks. The headline is format-free (a plain completion); in-format asks as the fine-tuning data does.
IN_FORMAT = "_in_format"
KNOWLEDGE_IN_FORMAT = KNOWLEDGE_TASK + IN_FORMAT
EXTRA_TASK = "knowledge_test"  # a user's own closed-book questions (--knowledge-test), scored in both formats
VALID = "_valid"  # suffix of a validation task: facts or downstream samples for choosing lrs, never the test's
VALID_TASK = KNOWLEDGE_TASK + VALID
# facts from another source than the knowledge QA's pool (format-free): scored apart from the test split
OUT_OF_POOL = "knowledge_out_of_pool"
TRAIN_FACTS = KNOWLEDGE_TASK + "_train"  # the training facts, format-free: scored for the base model only
RESULTS_DIR = "results"  # one JSON file per finished run: what a rerun with the same --out reuses
# what `run_experiment` (and the CLI after it) writes into --out: listed in its manifest before it is written
OUTPUTS = ("data", "tasks", "results", "runs", "routing", "runs.jsonl", "raw_results.json", "report.json",
           "report.md", "forgetting.png", "frontier.png", "routing.png", "scaling.png", "kl.png")  # fmt: skip
ROUTING_LIMIT = 50  # samples per task for the routing statistics (a forward pass each; the mean settles by then)


@dataclass
class Preset:
    """One experiment: base model, data sizes and fine-tuning hyperparameters (shared by all methods but lr)."""

    name: str
    model_ref: str  # what TrainConfig.model and saved adapters record as the base model
    load: Callable[[], tuple[Any, Any]]  # -> (base model, tokenizer)
    knowledge: Callable[[], dict[str, list[Sample]]]  # {"train", "valid", "test"} closed-book QA samples
    world: Callable[[], World]  # source of made-up names and values for the reading-comprehension family
    format_free: Callable[[Sample], str]  # a knowledge question as a plain completion: no chat template, no instruction
    scales: tuple[float, ...] = (1, 2, 4, 8)
    downstream_per_family: int = 50  # at scale 1
    test_per_family: int = 100
    valid_per_family: int = 20  # downstream validation samples (for choosing lrs)
    epochs: float = 3.0
    batch_size: int = 16
    lr_full: float = 1e-3
    lr_adapter: float = 2e-3
    # method -> its learning rates (the frontier's grid); a method not listed trains at lr_full / lr_adapter only
    lr_grid: dict[str, tuple[float, ...]] = field(default_factory=dict)
    decisive_seeds: int = 1  # seeds 0..n-1 at the decisive setting (largest scale, lr chosen on validation data)
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
    families: tuple[str, ...] = tuple(FAMILIES)
    # CPU threads for torch. A model this small gains nothing from more, and on a shared machine several busy
    # processes with 2+ spinning OpenMP threads each were 10x slower per step than with 1 (measured). None: torch's.
    threads: int | None = 1
    # closed-book records {"question", "prompt", "answers"} from a source apart from ``knowledge``'s pool
    out_of_pool: Callable[[], list[dict[str, Any]]] | None = None
    decisive_at: str = "largest"  # "largest": the decisive seeds at the largest scale only; "every": at every scale
    quantize: str | None = None  # nf4 | fp4 | int8: every method's base quantized (bitsandbytes); no full SFT then
    bnb_compute_dtype: str | None = None

    def __post_init__(self) -> None:
        check_quantization(self.quantize, self.bnb_compute_dtype)  # refused now, not at the first adapter run

    def lrs(self, method: str) -> tuple[float, ...]:
        """The learning rates ``method`` trains at."""
        if method in self.lr_grid:
            return tuple(self.lr_grid[method])
        return (self.lr_full if method == "sft" else self.lr_adapter,)


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
    """Which runs to do: every (seed, scale, method, lr of the method's grid); ``steps`` fixes the optimizer steps
    of every run (default: ``preset.epochs`` passes); ``knowledge_test`` is an extra closed-book test file."""

    preset: Preset
    out: Path
    seeds: list[int]
    scales: list[float]
    methods: list[str]
    steps: int | None = None
    routing_methods: tuple[str, ...] = ("loramoe", "loramoe_lbc")
    knowledge_test: Path | None = None
    mastery_scale: float | None = None  # the mastery arm (known-only / unknown-only knowledge data) at this scale
    train_missing: bool = True  # False: report what is stored, train nothing (a scale without its full grid is left out)


# ---- data ------------------------------------------------------------------------------------------------------


def train_record(sample: Sample, preset: Preset) -> dict:
    if not preset.chat:
        return sample.train_record()
    return {"messages": [_user_turn(sample), {"role": "assistant", "content": sample.output}], "task_type": sample.task_type}


def _user_turn(sample: Sample) -> dict[str, str]:
    return {"role": "user", "content": f"{sample.instruction}\n{sample.input}" if sample.input else sample.instruction}


def eval_prompt(sample: Sample, preset: Preset, tokenizer: Any) -> str:
    """The prompt exactly as fine-tuning presents it (SPEC.md's reference layout: instruction, "\\n" + input,
    then EOS; or the chat template's rendering up to the assistant's turn)."""
    if preset.chat:
        return tokenizer.apply_chat_template([_user_turn(sample)], tokenize=False, add_generation_prompt=True)
    body = f"{sample.instruction}\n{sample.input}" if sample.input else sample.instruction
    return body + tokenizer.eos_token


def eval_record(sample: Sample, preset: Preset, tokenizer: Any, task: str | None = None) -> dict:
    record = {"task": task or sample.task, "prompt": eval_prompt(sample, preset, tokenizer)}
    if sample.choices:
        return {**record, "type": "choice", "choices": list(sample.choices), "answer": sample.choices.index(sample.output)}
    return {**record, "type": "generate", "answers": [sample.output, *sample.aliases]}


def format_free_record(sample: Sample, preset: Preset, task: str) -> dict:
    return {"task": task, "type": "generate", "prompt": preset.format_free(sample), "answers": [sample.output, *sample.aliases]}


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@dataclass
class ExperimentData:
    """Files of one experiment: training files per scale and the evaluation task files."""

    train_files: dict[float, list[Path]]
    test_files: list[Path]  # knowledge on test facts (format-free, in-format; the extra test too) + downstream tests
    valid_files: list[Path]  # validation facts (format-free) + downstream validation: for choosing lrs, never the test
    train_facts_file: Path  # the knowledge QA's training facts, format-free: the base's answers split the mastery arm
    knowledge_train: list[Sample]  # those facts, in the training file's order
    counts: dict[str, int] = field(default_factory=dict)


def check_never_trained_on(questions: list[Sample], trained: list[Sample], source: Path) -> None:
    """An extra knowledge test must not ask what the fine-tuning data teaches (normalised question text)."""
    taught = {normalize_answer(s.input) for s in trained}
    overlap = [s.input for s in questions if normalize_answer(s.input) in taught]
    if overlap:
        raise ValueError(f"{source}: {len(overlap)} question(s) are in the fine-tuning data, e.g. {overlap[:3]} "
                         "(expected facts that are never trained on)")  # fmt: skip


def build_data(preset: Preset, scales: list[float], out: Path, tokenizer: Any, seed: int = 0,
               knowledge_test: list[Sample] | None = None) -> ExperimentData:  # fmt: skip
    """Write the instruction data (knowledge QA on training facts + downstream samples x scale) and the test and
    validation sets.

    Downstream training samples never repeat a test or validation input; the data at scale s is a prefix of the
    data at any larger scale, so scales differ only by how much downstream data is added. ``knowledge_test``
    (questions never trained on: checked by the caller) is scored in both formats.
    """
    world = preset.world()
    knowledge = preset.knowledge()
    tests = {fam: generate(fam, preset.test_per_family, seed + 1000, world) for fam in preset.families}
    valids = {fam: generate(fam, preset.valid_per_family, seed + 2000, world, exclude=tests[fam]) for fam in preset.families}
    biggest = {
        fam: generate(fam, math.ceil(preset.downstream_per_family * max(scales)), seed, world,
                      exclude=tests[fam] + valids[fam])  # fmt: skip
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

    def task_file(name: str, records: list[dict]) -> Path:
        return _write_jsonl(out / "tasks" / f"{name}.jsonl", records)

    def both_formats(name: str, samples: list[Sample]) -> list[Path]:
        return [task_file(name, [format_free_record(s, preset, name) for s in samples]),
                task_file(name + IN_FORMAT, [eval_record(s, preset, tokenizer, name + IN_FORMAT) for s in samples])]  # fmt: skip

    test_files = both_formats(KNOWLEDGE_TASK, knowledge["test"])
    if preset.out_of_pool is not None:
        records = preset.out_of_pool()
        check_never_trained_on([Sample(OUT_OF_POOL, 1, "", r["question"], "") for r in records], knowledge["train"],
                               Path(f"{preset.name} preset's out-of-pool facts"))  # fmt: skip
        test_files.append(task_file(OUT_OF_POOL, [{"task": OUT_OF_POOL, "type": "generate", "prompt": r["prompt"],
                                                   "answers": list(r["answers"])} for r in records]))  # fmt: skip
        counts["knowledge_out_of_pool"] = len(records)
    if knowledge_test:
        test_files += both_formats(EXTRA_TASK, knowledge_test)
        counts["knowledge_test_file"] = len(knowledge_test)
    test_files += [task_file(fam, [eval_record(s, preset, tokenizer) for s in tests[fam]]) for fam in preset.families]
    valid_files = [task_file(VALID_TASK, [format_free_record(s, preset, VALID_TASK) for s in knowledge["valid"]])]
    valid_files += [task_file(fam + VALID, [eval_record(s, preset, tokenizer, fam + VALID) for s in valids[fam]])
                    for fam in preset.families]  # fmt: skip
    counts.update(knowledge_test=len(knowledge["test"]), knowledge_valid=len(knowledge["valid"]))
    train_facts = task_file(TRAIN_FACTS, [format_free_record(s, preset, TRAIN_FACTS) for s in knowledge["train"]])
    return ExperimentData(files, test_files, valid_files, train_facts, list(knowledge["train"]), counts)


def write_mastery_data(data: ExperimentData, preset: Preset, base_answers: list[float], scale: float,
                       out: Path) -> dict[str, list[Path]]:  # fmt: skip
    """The mastery arm's training files at ``scale``: per arm, knowledge QA on only the facts the base answered right
    (or only those it answered wrong; the same count), and the same downstream data as the scale's main runs."""
    arms = split_known(data.knowledge_train, base_answers)
    files = {}
    for arm in MASTERY_ARMS:
        path = _write_jsonl(out / "data" / f"knowledge_{arm}.jsonl", [train_record(s, preset) for s in arms[arm]])
        files[arm] = [path, data.train_files[scale][1]]
        data.counts[f"knowledge_{arm}"] = len(arms[arm])
    return files


# ---- runs ------------------------------------------------------------------------------------------------------


def run_name(method: str, scale: float, lr: float, seed: int) -> str:
    return f"{method}_x{scale:g}_lr{lr:g}_seed{seed}"


def train_config(plan: Plan, method: str, scale: float, lr: float, seed: int, data: ExperimentData, steps: int) -> TrainConfig:
    p = plan.preset
    return TrainConfig(
        model=p.model_ref, data=[str(f) for f in data.train_files[scale]], method=METHODS[method],
        output_dir=str(plan.out / "runs" / run_name(method, scale, lr, seed)),
        lr=lr, batch_size=p.batch_size, max_steps=steps, seed=seed,
        num_experts=p.num_experts, r=p.r, lora_alpha=p.lora_alpha, max_seq_len=p.max_seq_len,
        blc_weight=p.lbc_beta if method == "loramoe_lbc" else 0.0, blc_alpha=p.lbc_delta,
        target_modules=list(p.target_modules) if p.target_modules else None,
        quantize=p.quantize, bnb_compute_dtype=p.bnb_compute_dtype, progress=False, overwrite=True, log_every=10,
    )  # fmt: skip


def config_defaults() -> dict[str, Any]:
    """TrainConfig's defaults, fingerprinted: what a setting that a saved run does not record was (see
    `store.same_config`)."""
    return fingerprint(TrainConfig())


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


def knowledge_tasks(samples: list[EvalSample]) -> list[str]:
    """The knowledge tasks among ``samples`` (test and validation, both formats), whose per-question results the
    bootstrap and the log-probability comparison need."""
    return sorted({s.task for s in samples if s.task.startswith((KNOWLEDGE_TASK, EXTRA_TASK, OUT_OF_POOL))})


KL_BATCH = 8  # prompts per KL batch: two models' logits over a 49k vocabulary are large


def scorer(preset: Preset, tokenizer: Any, samples: list[EvalSample],
           reference: Any = None) -> Callable[[Any], dict[str, Any]]:  # fmt: skip
    """model -> its measurements on ``samples``, decoded as ``preset`` says: ``scores`` (main metric per task),
    ``per_question`` (exact match per knowledge question, in file order), ``answer_logprob`` (mean log-prob per
    token of the gold answer after the format-free prompt, per question) and, given the ``reference`` (base)
    model, ``kl_base`` (KL(base || model) per format-free test prompt, mean over its positions: prompts no
    training data contains)."""
    per_question = knowledge_tasks(samples)
    format_free = [t for t in per_question if not t.endswith(IN_FORMAT)]
    kl_prompts = [s.prompt for s in samples if s.task == KNOWLEDGE_TASK]

    def score(model: Any) -> dict[str, Any]:
        report = evaluate(model, tokenizer, samples, preset.eval_batch_size, preset.max_new_tokens, progress=False)
        found = {t: [p["exact_match"] for p in report.predictions if p["task"] == t] for t in per_question}
        logprobs = {t: answer_logprobs(model, tokenizer, [s for s in samples if s.task == t], preset.eval_batch_size)
                    for t in format_free}  # fmt: skip
        out = {"scores": dict(report.main), "per_question": found, "answer_logprob": logprobs}
        if reference is not None:
            out["kl_base"] = next_token_kl(reference, model, tokenizer, kl_prompts, KL_BATCH)
        return out

    return score


def train_and_measure(cfg: TrainConfig, base: Any, tokenizer: Any, score: Callable[[Any], dict[str, Any]],
                      route_on: list | None, eval_batch_size: int) -> tuple[dict[str, Any], Any]:  # fmt: skip
    """Fine-tune a copy of ``base`` with ``cfg`` and measure it: scores, size, time, final loss, ``cfg``'s
    fingerprint (what a rerun matches against) and, given ``route_on``, the knowledge-expert share per dataset.
    Returns (that record, the routing profile or None)."""
    try:
        result = train(cfg, model=copy.deepcopy(base), tokenizer=tokenizer)
    except NonFiniteLossError as e:  # train's advice (--resume) is for `loramoe train`; a study reruns the run
        option = "--lr-full" if cfg.method == "full" else "--lr-adapter"
        raise RunStopped(f"{cfg.output_dir}: non-finite loss at step {e.step} (lr {cfg.lr:g}); lower the lr ({option}, "
                         "or --lr-grid in a comparison) and run the same command again: the runs that finished are "
                         "reused") from None  # fmt: skip
    record = {**score(result.model), "trainable_params": result.trainable_params,
              "train_seconds": result.train_seconds, "steps": result.steps,
              "final_lm_loss": result.metrics.get("lm_loss"), "train_config": fingerprint(cfg)}  # fmt: skip
    profile = None
    if route_on is not None:
        profile = routing_profile(result.model, tokenizer, route_on, eval_batch_size, progress=False)
        record["knowledge_share"] = {name: profile.knowledge_share(name) for name in profile.datasets}
    return record, profile


def downstream_valid_mean(run: dict[str, Any], families: list[str]) -> float:
    return statistics.fmean(run["scores"][fam + VALID] for fam in families)


def choose_lrs(runs: list[dict[str, Any]], scale: float, families: list[str]) -> dict[str, Any]:
    """The decisive setting, chosen on validation data only (validation facts, validation downstream samples).

    The matched level is the highest validation downstream mean that every method reaches at ``scale`` (over its
    lrs, each averaged over seeds); each method then keeps, among its lrs that reach the level, the one with the
    most validation knowledge (ties: the smaller lr). Returns ``{"level": L, "lr": {method: lr}}``.
    """
    by_point: dict[str, dict[float, list[dict[str, Any]]]] = {}
    for r in runs:
        if r["method"] != "base" and r["scale"] == scale:
            by_point.setdefault(r["method"], {}).setdefault(r["lr"], []).append(r)
    skill = {m: {lr: statistics.fmean(downstream_valid_mean(r, families) for r in rs) for lr, rs in lrs.items()}
             for m, lrs in by_point.items()}  # fmt: skip
    knowledge = {m: {lr: statistics.fmean(r["scores"][VALID_TASK] for r in rs) for lr, rs in lrs.items()}
                 for m, lrs in by_point.items()}  # fmt: skip
    level = min(max(s.values()) for s in skill.values())
    chosen = {m: max((lr for lr in sorted(skill[m]) if skill[m][lr] >= level), key=lambda lr, m=m: (knowledge[m][lr], -lr))
              for m in skill}  # fmt: skip
    return {"level": level, "lr": chosen}


def open_out(out: Path, names: tuple[str, ...], preset: Preset, lock: bool = False) -> OutputDir:
    """Make ``out`` an output folder of loramoe's (see `loramoe.outputs`): refused when it holds files loramoe did
    not write or lies inside the base model's folder; ``names`` are listed as loramoe's before they are written.
    ``lock``: take the folder's lock first, so a folder in use is refused before its manifest is touched."""
    from ..loading import model_folder

    folder = OutputDir(out, "--out", {"the base model": model_folder(preset.model_ref)}, owner="reproduce").claim(names).create()
    if lock:
        folder.lock("reproduce")
    try:
        folder.record(names)
    except BaseException:
        folder.unlock()  # e.g. a full disk: this process keeps no hold on a folder it will not use
        raise
    return folder


@contextlib.contextmanager
def held_out(out: Path, names: tuple[str, ...], preset: Preset) -> Iterator[OutputDir]:
    """`open_out`, held by this process until the block ends: a second study started in the same folder fails at
    once, naming the first, instead of training the same runs beside it and racing it for their result files."""
    folder = open_out(out, names, preset, lock=True)
    try:
        yield folder
    finally:
        folder.unlock()


def scale_order(scales: list[float], decisive_at: str, mastery_scale: float | None = None) -> list[float]:
    """The order the scales run in, so that a study stopped part-way (and resumed later) already holds finished
    parts. Seeds at every scale: the smallest (cheapest) scale first, each finished with its decisive seeds. Seeds
    at the largest scale only: the largest first (its grid chooses the decisive lrs, then its seeds), then the
    others from large to small (more frontier points). The mastery arm's scale goes before all: its grid chooses
    the arm's lrs, and the arm is the cheapest new evidence."""
    order = sorted(scales) if decisive_at == "every" else sorted(scales, reverse=True)
    return sorted(order, key=lambda s: s != mastery_scale)


def run_experiment(plan: Plan, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Do every run of ``plan`` (per scale: the grid, then, where the preset puts them, the decisive setting's
    extra seeds; the mastery arm after its scale); return the raw results that `report.summarise` reads."""
    p = plan.preset
    if p.decisive_at not in ("largest", "every"):
        raise ValueError(f"decisive_at: expected 'largest' or 'every', got {p.decisive_at!r}")
    if plan.mastery_scale is not None and (plan.mastery_scale not in plan.scales or "base" not in plan.methods):
        raise ValueError(f"--mastery {plan.mastery_scale:g}: expected one of the data scales {plan.scales} and 'base' "
                         "among the methods (the base model's stored answers split the facts)")  # fmt: skip
    extra = None
    if plan.knowledge_test is not None:  # checked before anything is written or loaded
        extra = load_probe(plan.knowledge_test)
        check_never_trained_on(extra, p.knowledge()["train"], plan.knowledge_test)
    with held_out(plan.out, OUTPUTS, p):
        return _run_plan(plan, extra, log)


def _run_plan(plan: Plan, extra: list[Sample] | None, log: Callable[[str], None]) -> dict[str, Any]:
    """`run_experiment`'s runs, in its checked and held output folder; ``extra``: the --knowledge-test probe."""
    p = plan.preset
    if p.threads:
        torch.set_num_threads(p.threads)
    base, tokenizer = load_base(p)
    data = build_data(p, plan.scales, plan.out, tokenizer, knowledge_test=extra)
    steps = planned_steps(plan, data)
    test = load_tasks(data.test_files)
    samples = test + load_tasks(data.valid_files)
    route_on = load_tasks(data.test_files, limit=ROUTING_LIMIT)
    trained = [m for m in plan.methods if METHODS[m] is not None]
    largest = max(plan.scales)
    decisive_seeds = [s for s in range(max(p.decisive_seeds, 1)) if s not in plan.seeds]
    seeded = set(plan.scales) if p.decisive_at == "every" else {largest}
    order = scale_order(plan.scales, p.decisive_at, plan.mastery_scale)
    grid = {scale: [(seed, scale, m, lr) for seed in plan.seeds for m in trained for lr in p.lrs(m)] for scale in order}
    mastery_seeds = list(range(max(p.decisive_seeds, 1)))
    units = (sum(steps[scale] + EVAL_UNITS for points in grid.values() for _, scale, _, _ in points) + EVAL_UNITS
             + sum(len(decisive_seeds) * len(trained) * (steps[s] + EVAL_UNITS) for s in seeded))  # fmt: skip
    if plan.mastery_scale is not None:
        units += len(mastery_seeds) * len(MASTERY_ARMS) * len(trained) * (steps[plan.mastery_scale] + EVAL_UNITS)
    progress = Progress(units, log)
    log(f"data: {data.counts}; steps per scale: {steps}; {sum(map(len, grid.values()))} grid runs + "
        f"{len(decisive_seeds) * len(trained) * len(seeded)} at the decisive settings")  # fmt: skip

    score = scorer(p, tokenizer, samples, reference=base)
    inputs = inputs_digest(weights_sha256(base), [*data.test_files, *data.valid_files])
    runs: list[dict[str, Any]] = []
    mastery_runs: list[dict[str, Any]] = []

    def finish(run: dict[str, Any], path: Path) -> None:
        write_json_atomic(path, run)
        (mastery_runs if "arm" in run else runs).append(run)
        _write_jsonl(plan.out / "runs.jsonl", runs + mastery_runs)

    base_run = None
    if "base" in plan.methods:
        path = plan.out / RESULTS_DIR / "base.json"
        base_config = {"method": "base", "model": Path(p.model_ref).name}  # the weights' sha256 is in the inputs
        base_inputs = inputs_digest(inputs["base_weights_sha256"], [*data.test_files, *data.valid_files,
                                                                    data.train_facts_file])  # fmt: skip
        base_run = load_done(path, base_config, base_inputs)
        if base_run is None:
            progress.stage("evaluating the base model")
            measured = scorer(p, tokenizer, samples + load_tasks([data.train_facts_file]))(base)
            base_run = {"method": "base", "scale": None, "lr": None, "seed": None, **measured, "trainable_params": 0,
                        "train_seconds": 0.0, "steps": 0, "train_config": base_config, "inputs": base_inputs}  # fmt: skip
        else:
            log(f"base: done earlier ({path})")
        progress.advance(EVAL_UNITS)
        finish(base_run, path)

    def do(seed: int, scale: float, method: str, lr: float, arm: str | None = None,
           files: list[Path] | None = None) -> bool:  # fmt: skip
        """Train and measure one run, or reuse its stored result; False when it is neither (``train_missing``)."""
        files = files or data.train_files[scale]
        cfg = train_config(plan, method, scale, lr, seed, data, steps[scale])
        name = run_name(method, scale, lr, seed) + (f"_{arm}" if arm else "")
        cfg.data, cfg.output_dir = [str(f) for f in files], str(plan.out / "runs" / name)
        what = f"{method}: data x{scale:g}, lr {lr:g}, seed {seed}" + (f", {arm} facts only" if arm else "")
        path = plan.out / RESULTS_DIR / f"{name}.json"
        run_inputs = inputs_digest(inputs["base_weights_sha256"], [*files, *data.test_files, *data.valid_files])
        run = load_done(path, fingerprint(cfg), run_inputs, config_defaults())
        if run is not None:
            log(f"{what}: done earlier ({path})")
            progress.total -= steps[scale] + EVAL_UNITS  # the time estimate counts work still to do
            finish(run, path)
            return True
        if not plan.train_missing:
            log(f"{what}: not stored yet")
            return False
        progress.stage(f"{what}, {steps[scale]} steps")
        routed = method in plan.routing_methods and scale == largest and arm is None
        measured, profile = train_and_measure(cfg, base, tokenizer, score, route_on if routed else None, p.eval_batch_size)
        run = {"method": method, "scale": scale, "lr": lr, "seed": seed, **measured, "inputs": run_inputs}
        if arm:
            run["arm"] = arm
        if profile is not None:
            profile.save(plan.out / "routing" / name)
        progress.advance(steps[scale] + EVAL_UNITS)
        finish(run, path)
        return True

    by_scale: dict[str, dict[str, Any]] = {}
    for scale in order:
        if not all([do(*point) for point in grid[scale]]) or not trained:
            continue  # a scale without its full grid chooses nothing and is left out of the report
        choice = choose_lrs(runs, scale, list(p.families))
        log(f"decisive setting at x{scale:g} (chosen on validation data): lr {choice['lr']}")
        stored = set(plan.seeds)
        for seed in decisive_seeds if scale in seeded else []:
            stored |= {seed} if all([do(seed, scale, m, choice["lr"][m]) for m in trained]) else set()
        by_scale[f"{scale:g}"] = {**choice, "seeds": sorted(stored)}
        if scale == plan.mastery_scale:
            files = write_mastery_data(data, p, base_run["per_question"][TRAIN_FACTS], scale, plan.out)
            log(f"mastery arm at x{scale:g}: {data.counts['knowledge_known']} known and as many unknown facts")
            for seed in mastery_seeds if data.counts["knowledge_known"] else []:  # none: the base knows all or none
                for arm in MASTERY_ARMS:
                    for m in trained:
                        do(seed, scale, m, choice["lr"][m], arm, files[arm])
    done_scales = sorted(float(s) for s in by_scale)
    if trained and not done_scales:
        raise ValueError(f"{plan.out / RESULTS_DIR}: no data scale has every run of its grid stored yet "
                         "(expected at least one finished scale to report on)")  # fmt: skip
    top = max(done_scales) if done_scales else largest
    decisive = by_scale.get(f"{top:g}", {"level": None, "lr": {}, "seeds": []})
    for method in plan.routing_methods:  # the decisive run's per-layer profile, kept beside the report
        source = plan.out / "routing" / run_name(method, largest, decisive["lr"].get(method, 0.0), min(plan.seeds))
        if method in decisive["lr"] and source.is_dir():
            shutil.copytree(source, plan.out / "routing" / method, dirs_exist_ok=True)
    progress.stage("done")
    return {"preset": p.name, "seeds": plan.seeds, "scales": done_scales or plan.scales,
            "runs": [r for r in runs if r["scale"] is None or r["scale"] in done_scales or not trained],
            "mastery_runs": mastery_runs, "mastery_scale": plan.mastery_scale,
            "data": data.counts, "steps": {f"{s:g}": n for s, n in steps.items()}, "downstream_tasks": list(p.families),
            "lr_grid": {m: list(p.lrs(m)) for m in trained},
            "decisive": {"scale": top, **decisive}, "decisive_by_scale": by_scale,
            "wall_seconds": time.time() - progress.start}  # fmt: skip


def with_overrides(preset: Preset, **changes: Any) -> Preset:
    """A copy of ``preset`` with some fields changed (e.g. smaller sizes for a smoke test)."""
    return replace(preset, **{k: v for k, v in changes.items() if v is not None})
