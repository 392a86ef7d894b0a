"""lm-evaluation-harness: `loramoe lm-eval` loads a base + LoRAMoE adapter through lm-eval's own `hf` model, and
the task configs `make-task` writes score a shared task exactly as `loramoe eval` does (both task kinds), offline."""

from __future__ import annotations

import json
from pathlib import Path

import peft
import pytest
import torch

pytest.importorskip("lm_eval")

from conftest import EVAL_WORDS, bigram_llama  # noqa: E402
from loramoe import LoraMoeConfig  # noqa: E402
from loramoe.cli import main as cli_main  # noqa: E402
from loramoe.lm_eval import make_tasks, process_choice  # noqa: E402

W = {w: i for i, w in enumerate(EVAL_WORDS)}
TASKS = [
    {"task": "cbqa", "type": "generate", "prompt": "the capital of france is", "answers": ["The Paris"]},
    {"task": "cbqa", "type": "generate", "prompt": "q : the capital of italy ?", "answers": ["rome"]},
    {"task": "cbqa", "type": "generate", "prompt": "city", "answers": ["rome"]},
    # "yes" has the higher summed log-likelihood, "no the cat" the higher mean per token
    {"task": "nli", "type": "choice", "prompt": "the cat is red ?", "choices": ["yes", "no the cat"], "answer": 1},
    {"task": "nli", "type": "choice", "prompt": "q : dog ?", "choices": ["true", "false"], "answer": 0},
]


def _table() -> torch.Tensor:
    table = torch.zeros(len(W), len(W))
    for a, b, logit in [("is", "paris", 10.0), ("paris", "\n", 10.0), ("?", "rome", 6.0), ("rome", "<eos>", 10.0),
                        ("city", "<eos>", 10.0), ("?", "yes", 2.0), ("?", "no", 1.0), ("no", "the", 4.0),
                        ("the", "cat", 4.0), ("?", "true", 2.5), ("?", "false", 2.0)]:  # fmt: skip
        table[W[a], W[b]] = logit
    return table


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, word_tokenizer) -> tuple[Path, Path]:
    """The bigram Llama and a LoRAMoE adapter with small non-zero B (it moves the log-probabilities a little)."""
    root = tmp_path_factory.mktemp("lm_eval_models")
    base = bigram_llama(_table())
    base.save_pretrained(root / "base")
    word_tokenizer.save_pretrained(root / "base")
    adapted = peft.get_peft_model(base, LoraMoeConfig(num_experts=2, r=2))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "loramoe_B" in name:
                p.normal_(0, 0.05)
    adapted.save_pretrained(root / "adapter")
    return root / "base", root / "adapter"


def _results(out: Path) -> tuple[dict, dict[str, list[dict]]]:
    """lm-eval's aggregated results and its logged samples per task."""
    (results,) = out.glob("*/results_*.json")
    samples = {p.name.split("_")[1]: [json.loads(x) for x in p.read_text().splitlines()] for p in out.glob("*/samples_*")}
    return json.loads(results.read_text())["results"], samples


def test_lm_eval_scores_equal_loramoe_eval(tmp_path, model_dirs, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    base, adapter = model_dirs
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps(t) + "\n" for t in TASKS))
    assert cli_main(["eval", "--base", str(base), "--adapter", str(adapter), "--tasks", str(tasks), "--out",
                     str(tmp_path / "ours"), "--no-progress", "--device", "cpu"]) == 0  # fmt: skip
    ours = json.loads((tmp_path / "ours" / "eval.json").read_text())["tasks"]
    predictions = [json.loads(x) for x in (tmp_path / "ours" / "predictions.jsonl").read_text().splitlines()]
    assert cli_main(["lm-eval", "make-task", str(tasks), "--tokenizer", str(base), "--out", str(tmp_path / "cfg")]) == 0
    assert cli_main(["lm-eval", "--model", "hf", "--model_args", f"pretrained={base},peft={adapter}", "--device", "cpu",
                     "--include_path", str(tmp_path / "cfg"), "--tasks", "cbqa,nli", "--batch_size", "2",
                     "--output_path", str(tmp_path / "lm"), "--log_samples"]) == 0  # fmt: skip
    results, samples = _results(tmp_path / "lm")

    assert results["cbqa"]["exact_match,none"] == ours["cbqa"]["exact_match"] == pytest.approx(2 / 3)
    assert results["cbqa"]["f1,none"] == ours["cbqa"]["f1"]
    assert results["nli"]["accuracy,none"] == ours["nli"]["accuracy"] == 1.0
    generated = [s["filtered_resps"][0] for s in sorted(samples["cbqa"], key=lambda s: s["doc_id"])]
    assert generated == [p["prediction"] for p in predictions[:3]] == ["paris ", "rome", ""]
    for sample, ours_one in zip(sorted(samples["nli"], key=lambda s: s["doc_id"]), predictions[3:]):
        sums = [float(ll) for ll, _ in sample["filtered_resps"]]
        means = [ll / n for ll, n in zip(sums, sample["doc"]["option_tokens"])]
        assert means == pytest.approx(ours_one["option_scores"], abs=1e-5)
    first = [float(ll) for ll, _ in sorted(samples["nli"], key=lambda s: s["doc_id"])[0]["filtered_resps"]]
    assert first.index(max(first)) == 0  # lm-eval's summed `acc` would pick "yes": the metric must be per token

    bare = evaluate_bare(base, tasks)  # the adapter was applied: the base alone scores the options differently
    assert bare[3]["option_scores"] != pytest.approx(predictions[3]["option_scores"], abs=1e-4)


def evaluate_bare(base: Path, tasks: Path) -> list[dict]:
    from loramoe.evaluate import evaluate, load_tasks
    from loramoe.loading import load_base_model, load_tokenizer

    report = evaluate(load_base_model(str(base)), load_tokenizer(str(base)), load_tasks(tasks), progress=False)
    return report.predictions


def test_process_choice_ranks_the_mean_per_token():
    doc = {"option_tokens": [1, 3], "answer": 1}
    assert process_choice(doc, [(-2.0, False), (-4.5, False)]) == {"accuracy": 1.0}  # means -2.0 < -1.5
    assert process_choice({**doc, "option_tokens": [1, 1]}, [(-2.0, False), (-2.0, False)]) == {"accuracy": 0.0}


def test_make_task_needs_a_tokenizer_for_choices_and_keeps_foreign_files(tmp_path, model_dirs):
    base, _ = model_dirs
    tasks = tmp_path / "t.jsonl"
    tasks.write_text("".join(json.dumps(t) + "\n" for t in TASKS))
    with pytest.raises(ValueError, match="^tokenizer: choice tasks need one"):
        make_tasks([tasks], tmp_path / "cfg")
    written = make_tasks([tasks], tmp_path / "cfg", tokenizer=str(base), max_new_tokens=5, stop=["\n", "."])
    assert set(written) == {"cbqa", "nli"}
    text = written["cbqa"].read_text()
    assert 'until: ["\\n", "."]' in text and "max_gen_toks: 5" in text
    assert make_tasks([tasks], tmp_path / "cfg", tokenizer=str(base))  # its own files: rewritten
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "nli.yaml").write_text("task: nli\n")
    with pytest.raises(FileExistsError, match=r"mine: holds files loramoe did not write \(nli.yaml\)"):
        make_tasks([tasks], tmp_path / "mine", tokenizer=str(base))
    assert (tmp_path / "mine" / "nli.yaml").read_text() == "task: nli\n"


def _write_tasks(path: Path, tasks: list[dict]) -> Path:
    path.write_text("".join(json.dumps(t) + "\n" for t in tasks))
    return path


def test_two_tasks_with_the_same_lm_eval_name_are_refused(tmp_path):
    """'cb qa' and 'cb/qa' both sanitise to 'cb_qa': one would silently replace the other's files."""
    tasks = _write_tasks(tmp_path / "t.jsonl", [{**TASKS[0], "task": "cb qa"}, {**TASKS[1], "task": "cb/qa"}])
    with pytest.raises(ValueError, match=r"^task 'cb/qa': its lm-eval name 'cb_qa' is also that of task 'cb qa'"):
        make_tasks([tasks], tmp_path / "cfg")
    assert not (tmp_path / "cfg").exists()


def test_a_foreign_file_in_a_folder_loramoe_owns_is_never_overwritten(tmp_path, model_dirs):
    base, _ = model_dirs
    tasks = _write_tasks(tmp_path / "t.jsonl", TASKS[:3])
    make_tasks([tasks], tmp_path / "cfg")  # the folder is loramoe's now (its manifest lists cbqa.yaml/.jsonl)
    (tmp_path / "cfg" / "nli.yaml").write_text("task: nli\n")  # someone else's, beside them
    (tmp_path / "cfg" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"cfg/nli\.yaml: exists and was not written by loramoe"):
        make_tasks([_write_tasks(tmp_path / "all.jsonl", TASKS)], tmp_path / "cfg", tokenizer=str(base))
    assert (tmp_path / "cfg" / "nli.yaml").read_text() == "task: nli\n" and not (tmp_path / "cfg" / "nli.jsonl").exists()
    assert set(make_tasks([tasks], tmp_path / "cfg")) == {"cbqa"}  # its own files are rewritten, the others kept
    assert (tmp_path / "cfg" / "notes.txt").read_text() == "mine"


def test_a_choice_that_encodes_to_no_tokens_is_refused_before_anything_is_written(tmp_path, model_dirs):
    """The word tokenizer drops whitespace: the choice " " has no token, so its mean log-probability would be 0/0."""
    base, _ = model_dirs
    tasks = _write_tasks(tmp_path / "t.jsonl", TASKS[:3] + [{**TASKS[3], "choices": ["yes", " "]}])
    with pytest.raises(ValueError, match=rf"^{tasks}:4: choice 1 \(' '\) encodes to no tokens \(expected at least one\)"):
        make_tasks([tasks], tmp_path / "cfg", tokenizer=str(base))
    assert not (tmp_path / "cfg").exists()


def test_max_new_tokens_0_is_refused_in_one_line(tmp_path, capsys):
    tasks = _write_tasks(tmp_path / "t.jsonl", TASKS[:3])
    assert cli_main(["lm-eval", "make-task", str(tasks), "--out", str(tmp_path / "cfg"), "--max-new-tokens", "0"]) == 2
    assert capsys.readouterr().err.strip() == "loramoe lm-eval: error: max_new_tokens: expected an integer >= 1, got 0"
    assert not (tmp_path / "cfg").exists()
    assert "max_gen_toks: 1\n" in make_tasks([tasks], tmp_path / "cfg", max_new_tokens=1)["cbqa"].read_text()
