"""Evaluation: metrics on known strings, task-file errors, log-likelihood choice and greedy generation against
hand-computed references (a Llama whose logits are a hand-set bigram table), determinism, adapter identities."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from conftest import EVAL_WORDS, bigram_llama, save_base_and_loramoe
from loramoe import LoraMoeConfig
from loramoe.cli import main as cli_main
from loramoe.evaluate import (
    EvalSample,
    TaskFileError,
    evaluate,
    exact_match,
    greedy_generate,
    load_tasks,
    normalize_answer,
    token_f1,
)

W = {w: i for i, w in enumerate(EVAL_WORDS)}


def _write(path: Path, lines: list) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def _random_llama(seed: int = 0, init: float = 0.02) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(EVAL_WORDS), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=0, eos_token_id=1, bos_token_id=None, initializer_range=init)
    return LlamaForCausalLM(cfg).eval()


def _random_gpt2(seed: int = 0, init: float = 0.02) -> GPT2LMHeadModel:
    """Absolute position embeddings: generation is only right if positions skip the left padding."""
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(EVAL_WORDS), n_embd=32, n_layer=2, n_head=4, n_positions=64,
                     bos_token_id=None, eos_token_id=1, pad_token_id=0, initializer_range=init)
    return GPT2LMHeadModel(cfg).eval()


# ---- metrics --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The  Eiffel Tower!", "eiffel tower"),
        ("An apple, a day", "apple day"),
        ("Theatre and Anthem", "theatre and anthem"),  # articles only as whole words
        ("don't", "dont"),
        ("New_York", "new york"),
        ("“Quoted” — text…", "quoted text"),  # Unicode punctuation
        ("  \tA\n  ", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match_any_alias():
    assert exact_match("the Paris.", ["Rome", "paris"]) == 1.0
    assert exact_match("Paris France", ["paris"]) == 0.0
    assert exact_match("Paris", "paris") == 1.0


def test_token_f1_hand_values():
    # pred {cat, sat} vs gold {cat, sat, on, mat}: precision 1, recall 1/2 -> F1 2/3
    assert token_f1("The cat sat", "cat sat on the mat") == pytest.approx(2 / 3)
    # repeated tokens count with multiplicity: pred [a1 a1 b] vs gold [a1 b b]: overlap 2, p = r = 2/3
    assert token_f1("x x y", "x y y") == pytest.approx(2 / 3)
    # max over aliases, and exact normalised match -> 1
    assert token_f1("cat sat", ["dog", "cat sat on the mat", "the cat sat"]) == 1.0
    assert token_f1("dog", "cat") == 0.0
    assert token_f1("the", "a") == 1.0  # both normalise to nothing
    assert token_f1("", "cat") == 0.0


# ---- task files -----------------------------------------------------------------------------------------------
def test_load_tasks_defaults_blank_lines_and_limit(tmp_path):
    f = _write(tmp_path / "capitals.jsonl", [
        {"type": "generate", "prompt": "q : capital of france ?", "answers": ["paris"]},
        "",
        {"type": "generate", "prompt": "q : capital of italy ?", "answers": ["rome"], "id": 7},
        {"task": "nli", "type": "choice", "prompt": "is the cat red ?", "choices": ["yes", "no"], "answer": 1},
    ])
    samples = load_tasks([f])
    assert [s.task for s in samples] == ["capitals", "capitals", "nli"]
    assert [s.source for s in samples] == [f"{f}:1", f"{f}:3", f"{f}:4"]
    assert samples[1].id == 7 and samples[2].choices == ["yes", "no"] and samples[2].answer == 1
    assert [s.task for s in load_tasks(f, limit=1)] == ["capitals", "nli"]


@pytest.mark.parametrize(
    ("lines", "line", "words"),
    [
        ([{"type": "classify", "prompt": "p", "answers": ["a"]}], 1, "unknown task type 'classify'"),
        ([{"type": "generate", "prompt": "p", "answers": ["a"]}, {"type": "generate", "prompt": "p"}], 2,
         "missing ['answers']"),
        ([{"type": "choice", "prompt": "p", "choices": ["a", "b"]}], 1, "missing ['answer']"),
        (['{"type": "generate", "prompt": "p", "answers": ["a"]'], 1, "malformed JSON"),
        (['["not", "an", "object"]'], 1, "expected a JSON object"),
        ([{"type": "choice", "prompt": "p", "choices": ["a", "b"], "answer": 2}], 1, "index (0..1)"),
        ([{"type": "choice", "prompt": "p", "choices": ["a"], "answer": 0}], 1, "at least two"),
        ([{"type": "generate", "prompt": "p", "answers": "paris"}], 1, "non-empty list"),
        ([{"type": "generate", "prompt": "p", "answers": ["a"], "anwser": 1}], 1, "unknown keys ['anwser']"),
        ([{"type": "generate", "prompt": "", "answers": ["a"]}], 1, "'prompt'"),
        ([{"task": "t", "type": "generate", "prompt": "p", "answers": ["a"]},
          {"task": "t", "type": "choice", "prompt": "p", "choices": ["a", "b"], "answer": 0}], 2, "different task names"),
    ],
)
def test_load_tasks_errors_name_file_and_line(tmp_path, lines, line, words):
    f = _write(tmp_path / "bad.jsonl", lines)
    with pytest.raises(TaskFileError) as err:
        load_tasks([f])
    assert f"{f}:{line}:" in str(err.value)
    assert words in str(err.value)


def test_evaluate_refuses_a_task_with_two_types(word_tokenizer):
    samples = [EvalSample(task="t", type="generate", prompt="q", answers=["a"], source="mem:1"),
               EvalSample(task="t", type="choice", prompt="q", choices=["a", "b"], answer=0, source="mem:2")]
    with pytest.raises(TaskFileError, match="mem:2: task 't' is a choice task here but a generate task at mem:1"):
        evaluate(bigram_llama(torch.zeros(len(W), len(W))), word_tokenizer, samples, progress=False)


def test_load_tasks_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(TaskFileError, match=f"{empty}: no records"):
        load_tasks([empty])
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_tasks([tmp_path / "nope.jsonl"])


def test_example_task_files_load():
    files = sorted((Path(__file__).parents[1] / "examples" / "eval").glob("*.jsonl"))
    assert files
    samples = load_tasks(files)
    assert {s.type for s in samples} == {"generate", "choice"}


# ---- choice scoring against a hand-computed bigram model ------------------------------------------------------
def test_choice_picks_highest_mean_logprob(word_tokenizer):
    torch.manual_seed(1)
    table = torch.randn(len(W), len(W))
    table[W["?"], W["yes"]] = 3.0   # one token, fairly likely
    table[W["?"], W["no"]] = 4.0    # "no no": two tokens, each more likely than "yes" -> lower sum, higher mean
    table[W["no"], W["no"]] = 2.5
    table[W["?"], W["maybe"]] = -2.0
    model = bigram_llama(table)
    logp = table.log_softmax(dim=-1)
    expected = [
        logp[W["?"], W["yes"]].item(),
        ((logp[W["?"], W["no"]] + logp[W["no"], W["no"]]) / 2).item(),
        logp[W["?"], W["maybe"]].item(),
    ]
    sums = [expected[0], 2 * expected[1], expected[2]]
    assert max(range(3), key=sums.__getitem__) == 0 and max(range(3), key=expected.__getitem__) == 1  # test bites

    samples = [
        EvalSample(task="mc", type="choice", prompt="is the cat red ?", choices=["yes", "no no", "maybe"], answer=1),
        EvalSample(task="mc", type="choice", prompt="?", choices=["yes", "no no", "maybe"], answer=0),
    ]
    report = evaluate(model, word_tokenizer, samples, batch_size=4, progress=False)
    for p in report.predictions:
        assert p["option_scores"] == pytest.approx(expected, abs=1e-5)
        assert p["prediction"] == 1
    assert report.scores == {"mc": {"accuracy": 0.5}}
    assert report.mean == 0.5


def test_a_choice_tie_goes_to_the_first_option(word_tokenizer):
    """"yes" and "no" follow "?" with the same logit, so their scores are exactly equal: the first option wins,
    whichever one is the answer."""
    table = torch.zeros(len(W), len(W))
    table[W["?"], W["yes"]] = table[W["?"], W["no"]] = 3.0
    samples = [EvalSample(task="mc", type="choice", prompt="is the cat red ?", choices=["yes", "no"], answer=a)
               for a in (0, 1)]  # fmt: skip
    report = evaluate(bigram_llama(table), word_tokenizer, samples, batch_size=4, progress=False)
    for p in report.predictions:
        assert p["option_scores"][0] == p["option_scores"][1]  # a real tie
        assert p["prediction"] == 0
    assert [p["accuracy"] for p in report.predictions] == [1.0, 0.0]


def test_choice_scores_do_not_depend_on_batching(word_tokenizer):
    model = _random_llama()
    samples = [EvalSample(task="mc", type="choice", prompt=p, choices=["yes", "no the cat", "one two"], answer=0)
               for p in ["q : is the cat red ?", "?", "the capital of france is paris ?"]]
    one = evaluate(model, word_tokenizer, samples, batch_size=1, progress=False)
    many = evaluate(model, word_tokenizer, samples, batch_size=9, progress=False)
    for a, b in zip(one.predictions, many.predictions):
        assert a["option_scores"] == pytest.approx(b["option_scores"], abs=1e-5)


# ---- generation -----------------------------------------------------------------------------------------------
def _capital_table() -> torch.Tensor:
    table = torch.zeros(len(W), len(W))
    for a, b in [("is", "paris"), ("paris", "\n"), ("\n", "rome"), ("rome", "<eos>"), ("city", "<eos>")]:
        table[W[a], W[b]] = 10.0
    return table


def test_generation_stops_at_newline_or_eos(word_tokenizer):
    model = bigram_llama(_capital_table())
    samples = [
        EvalSample(task="cbqa", type="generate", prompt="the capital of france is", answers=["Paris", "paris france"]),
        EvalSample(task="cbqa", type="generate", prompt="city", answers=["rome"]),  # EOS straight away
    ]
    report = evaluate(model, word_tokenizer, samples, batch_size=2, max_new_tokens=8, progress=False)
    assert [p["prediction"] for p in report.predictions] == ["paris ", ""]
    assert report.scores["cbqa"] == {"exact_match": 0.5, "f1": 0.5}

    no_stop = evaluate(model, word_tokenizer, samples[:1], stop=(), max_new_tokens=8, progress=False)
    assert no_stop.predictions[0]["prediction"] == "paris \n rome"  # ran on to EOS
    assert no_stop.scores["cbqa"]["exact_match"] == 0.0
    assert no_stop.scores["cbqa"]["f1"] == pytest.approx(2 * (1 / 2) * 1 / (1 / 2 + 1))  # {paris, rome} vs {paris}

    short = evaluate(model, word_tokenizer, samples[:1], stop=(), max_new_tokens=2, progress=False)
    assert short.predictions[0]["prediction"] == "paris \n"


def _greedy_without_cache(model, prompt: list[int], steps: int, eos: int) -> list[int]:
    ids, new = list(prompt), []
    for _ in range(steps):
        tok = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        if tok == eos:
            break
        ids.append(tok)
        new.append(tok)
    return new


@pytest.mark.parametrize("make", [_random_llama, _random_gpt2])
@torch.no_grad()
def test_batched_cached_generation_matches_one_by_one_full_forward(make):
    model = make(seed=3, init=0.2)  # large weights: the next token depends strongly on the context
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, len(W), (n,), generator=g).tolist() for n in (3, 9, 1, 6)]
    batched = greedy_generate(model, prompts, pad_id=0, eos_id=1, max_new_tokens=7)
    assert batched == [_greedy_without_cache(model, p, 7, eos=1) for p in prompts]
    assert any(len(b) == 7 for b in batched)


def _penalty_table() -> torch.Tensor:
    """"is" -> "paris" -> "the" (2.0, a prompt word) or "city" (1.0) -> "\n": a repetition penalty picks "city"."""
    table = torch.zeros(len(W), len(W))
    for a, b, logit in [("is", "paris", 2.0), ("paris", "the", 2.0), ("paris", "city", 1.0), ("the", "\n", 2.0),
                        ("city", "\n", 2.0)]:
        table[W[a], W[b]] = logit
    return table


_CAPITAL_PROMPTS = ["the capital of france is", "q : the capital of italy is", "city"]


def test_models_own_generation_config_changes_nothing(word_tokenizer):
    """generate() takes unset settings from model.generation_config: sampling, a repetition penalty, suppressed
    tokens must not reach `loramoe eval`."""
    from transformers import GenerationConfig

    samples = [EvalSample(task="cbqa", type="generate", prompt=p, answers=["paris"]) for p in _CAPITAL_PROMPTS]
    plain = evaluate(bigram_llama(_penalty_table()), word_tokenizer, samples, batch_size=3, progress=False)
    assert [p["prediction"] for p in plain.predictions] == ["paris the ", "paris the ", ""]
    model = bigram_llama(_penalty_table())
    model.generation_config = GenerationConfig(do_sample=True, temperature=50.0, repetition_penalty=10.0,
                                               suppress_tokens=[W["paris"]], eos_token_id=1, pad_token_id=0)
    torch.manual_seed(0)
    assert evaluate(model, word_tokenizer, samples, batch_size=3, progress=False).predictions == plain.predictions
    assert model.generation_config.repetition_penalty == 10.0  # restored afterwards


def test_users_generate_with_greedy_generation_config_matches_eval(word_tokenizer):
    from transformers import GenerationConfig

    from loramoe.evaluate import cut_at_stop, greedy_generation_config

    model = bigram_llama(_penalty_table())
    model.generation_config = GenerationConfig(do_sample=True, temperature=50.0, repetition_penalty=10.0,
                                               eos_token_id=1, pad_token_id=0)
    samples = [EvalSample(task="cbqa", type="generate", prompt=p, answers=["paris"]) for p in _CAPITAL_PROMPTS]
    report = evaluate(model, word_tokenizer, samples, batch_size=3, max_new_tokens=8, progress=False)
    batch = word_tokenizer(_CAPITAL_PROMPTS, return_tensors="pt", padding=True, padding_side="left")

    def decode(out: torch.Tensor) -> list[str]:
        texts = word_tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        return [cut_at_stop(t, ["\n"]) for t in texts]

    config = greedy_generation_config(8, word_tokenizer.eos_token_id, word_tokenizer.pad_token_id)
    ours = model.generate(**batch, generation_config=config)
    assert decode(ours) == [p["prediction"] for p in report.predictions] == ["paris the ", "paris the ", ""]
    torch.manual_seed(0)  # the comparison can fail: the model's own config (penalty, sampling) changes the answers
    assert decode(model.generate(**batch, max_new_tokens=8)) != decode(ours)


@pytest.mark.parametrize(("make", "eos", "stop_token"), [(_random_llama, 2, 13), (_random_gpt2, 16, 14)])
def test_generate_decodes_like_the_loop_it_replaced(make, eos, stop_token):
    """Since issue 13 `greedy_generate` runs through generate(); the hand-written loop (left padding, positions over
    real tokens, per-row stop at EOS or ``should_stop``) is kept in the benchmark as the reference."""
    from benchmarks.generate_vs_loop import loop_greedy_generate

    model = make(seed=4, init=0.2)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(2, len(W), (n,), generator=g).tolist() for n in (5, 1, 8, 3, 6, 2)]

    def stop(ids: list[int]) -> bool:
        return ids[-1] == stop_token

    ours = greedy_generate(model, prompts, pad_id=0, eos_id=eos, max_new_tokens=9, should_stop=stop)
    assert ours == loop_greedy_generate(model, prompts, 0, eos, 9, stop)
    assert any(o and o[-1] == stop_token for o in ours) and any(len(o) < 9 and stop_token not in o for o in ours)
    assert any(len(o) == 9 for o in ours)  # rows stopped by should_stop, by EOS, and others ran on to the limit


# ---- whole-model identities -----------------------------------------------------------------------------------
def _mixed_samples() -> list[EvalSample]:
    return [
        EvalSample(task="cbqa", type="generate", prompt="q : the capital of france is", answers=["paris"]),
        EvalSample(task="cbqa", type="generate", prompt="q : capital of italy ?", answers=["rome"]),
        EvalSample(task="cbqa", type="generate", prompt="red blue green", answers=["one"]),
        EvalSample(task="nli", type="choice", prompt="the cat is red ? ", choices=["yes", "no", "maybe"], answer=2),
        EvalSample(task="nli", type="choice", prompt="q : dog ?", choices=["true", "false"], answer=0),
    ]


@pytest.mark.parametrize("kind", ["loramoe", "lora"])
def test_zero_B_adapter_scores_like_the_bare_base(word_tokenizer, kind):
    base = _random_llama(seed=5)
    samples = _mixed_samples()
    bare = evaluate(base, word_tokenizer, samples, batch_size=2, max_new_tokens=5, stop=(), progress=False)
    config = (LoraMoeConfig(num_experts=4, r=2, lora_dropout=0.0) if kind == "loramoe"
              else peft.LoraConfig(r=4, target_modules=["gate_proj", "up_proj", "down_proj"]))
    adapted = peft.get_peft_model(base, config)
    same = evaluate(adapted, word_tokenizer, samples, batch_size=2, max_new_tokens=5, stop=(), progress=False)
    assert same.predictions == bare.predictions
    assert same.to_dict() == bare.to_dict()

    with torch.no_grad():  # the comparison can fail: a non-zero B changes the scores
        for name, p in adapted.named_parameters():
            if "loramoe_B" in name or "lora_B" in name:
                p.normal_(0, 0.5)
    changed = evaluate(adapted, word_tokenizer, samples, batch_size=2, max_new_tokens=5, stop=(), progress=False)
    assert [p.get("option_scores") for p in changed.predictions] != [p.get("option_scores") for p in bare.predictions]


def test_same_adapter_twice_gives_identical_numbers(word_tokenizer):
    torch.manual_seed(0)
    model = peft.get_peft_model(_random_llama(seed=7), LoraMoeConfig(num_experts=4, r=2, lora_dropout=0.3,
                                                                     init_weights=False))
    model.train()  # evaluate must switch dropout off itself, and restore the mode afterwards
    first = evaluate(model, word_tokenizer, _mixed_samples(), batch_size=3, max_new_tokens=6, progress=False)
    second = evaluate(model, word_tokenizer, _mixed_samples(), batch_size=3, max_new_tokens=6, progress=False)
    assert model.training
    assert first.predictions == second.predictions and first.to_dict() == second.to_dict()


def test_report_json_and_markdown(tmp_path, word_tokenizer):
    report = evaluate(bigram_llama(_capital_table()), word_tokenizer, _mixed_samples(), progress=False)
    paths = report.save(tmp_path)
    data = json.loads(paths["json"].read_text())
    assert set(data["tasks"]) == {"cbqa", "nli"}
    assert data["tasks"]["cbqa"]["main_metric"] == "exact_match" and data["tasks"]["cbqa"]["n"] == 3
    assert data["tasks"]["nli"]["main_metric"] == "accuracy"
    assert data["mean"] == pytest.approx((data["tasks"]["cbqa"]["exact_match"] + data["tasks"]["nli"]["accuracy"]) / 2)
    assert report.main["cbqa"] == pytest.approx(1 / 3)  # "... is" -> "paris"; the others do not match
    md = paths["markdown"].read_text()
    assert "| cbqa | generate | 3 | 33.3 |" in md and "| nli | choice | 2 |" in md and "**mean**" in md
    assert len(paths["predictions"].read_text().splitlines()) == 5


def test_cli_eval_base_plus_adapter(tmp_path, word_tokenizer):
    out = tmp_path / "out"
    base_dir, adapter_dir = save_base_and_loramoe(tmp_path, _random_llama(seed=2), word_tokenizer)
    tasks = _write(tmp_path / "nli.jsonl", [
        {"type": "choice", "prompt": "the cat is red ?", "choices": ["yes", "no"], "answer": 0},
        {"task": "cbqa", "type": "generate", "prompt": "q : capital of italy ?", "answers": ["rome"]},
    ])
    rc = cli_main(["eval", "--base", str(base_dir), "--adapter", str(adapter_dir), "--tasks", str(tasks),
                   "--out", str(out), "--no-progress", "--device", "cpu"])
    assert rc == 0
    data = json.loads((out / "eval.json").read_text())
    assert data["tasks"]["nli"]["n"] == 1 and data["tasks"]["cbqa"]["n"] == 1 and data["settings"]["adapter"] == str(adapter_dir)
    assert (out / "eval.md").is_file()


@pytest.mark.slow
def test_smollm2_answers_and_zero_B_loramoe_changes_nothing():
    """The real model (BPE tokenizer, GGUF base): a batch of three prompts of different lengths answered right,
    and a zero-B LoRAMoE on it scoring exactly like the base."""
    from loramoe.loading import load_base_model, load_tokenizer, smollm2_gguf_path

    try:
        smollm2_gguf_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))

    samples = load_tasks(sorted((Path(__file__).parents[1] / "examples" / "eval").glob("*.jsonl")), limit=3)
    base, tokenizer = load_base_model("smollm2"), load_tokenizer("smollm2")
    bare = evaluate(base, tokenizer, samples, batch_size=3, max_new_tokens=12, progress=False)
    assert [p["prediction"].strip() for p in bare.predictions[:3]] == ["Paris", "William Shakespeare", "Jupiter"]
    assert bare.scores["cbqa_mini"]["exact_match"] == 1.0
    adapted = peft.get_peft_model(base, LoraMoeConfig(num_experts=6, r=4))
    same = evaluate(adapted, tokenizer, samples, batch_size=3, max_new_tokens=12, progress=False)
    assert same.predictions == bare.predictions
