"""Instruction data: formats, labels, task types, truncation, mixing, every bad-input case, the collator."""

from __future__ import annotations

import json

import pytest
import torch

from loramoe.data import DataError, InstructionCollator, load_instruction_data, parse_data_spec, read_records


def write_jsonl(path, records) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def rec(instruction="Add.", inp="1 + 2", output="3", task_type=0) -> dict:
    return {"instruction": instruction, "input": inp, "output": output, "task_type": task_type}


def target_text(tok, sample) -> str:
    return tok.decode([t for t, lab in zip(sample.input_ids, sample.labels) if lab != -100])


# ---- good input ------------------------------------------------------------------------------------------------


def test_reference_format_prompt_target_and_labels(tmp_path, byte_tokenizer):
    tok = byte_tokenizer
    path = write_jsonl(tmp_path / "a.jsonl", [rec("Add the numbers.", "17 + 25", "42", 0), rec("Capital of France?", "", "Paris", 1)])
    data = load_instruction_data(path, tok, max_seq_len=256)
    with_input, without_input = data.samples
    # byte tokenizer: one token per byte, so lengths are known by hand; EOS (id 1) ends prompt and target
    assert tok.decode(with_input.input_ids) == "Add the numbers.\n17 + 25</s>42</s>"
    prompt_len = len("Add the numbers.\n17 + 25") + 1  # + EOS
    assert with_input.labels == [-100] * prompt_len + with_input.input_ids[prompt_len:]
    assert target_text(tok, with_input) == "42</s>"
    assert tok.decode(without_input.input_ids) == "Capital of France?</s>Paris</s>"  # empty input: no "\n"
    assert [s.task_type for s in data.samples] == [0, 1]
    assert with_input.source.endswith("a.jsonl:1") and without_input.source.endswith("a.jsonl:2")
    assert data[0] == {"input_ids": with_input.input_ids, "labels": with_input.labels, "task_type": 0}


def test_json_list_records_keep_their_line_numbers(tmp_path, byte_tokenizer):
    path = tmp_path / "list.json"
    path.write_text('[\n  {"instruction": "a", "output": "b", "task_type": 1},\n\n  {"instruction": "c",\n'
                    '   "output": "d", "task_type": 0}\n]\n')
    records, problems = read_records(path)
    assert [line for line, _ in records] == [2, 4] and problems == []
    data = load_instruction_data(path, byte_tokenizer)
    assert [s.source.rsplit(":", 1)[1] for s in data.samples] == ["2", "4"]
    assert "input" not in json.loads(path.read_text())[0]  # input is optional


def test_task_type_names_from_config_and_defaults(tmp_path, byte_tokenizer):
    path = write_jsonl(tmp_path / "t.jsonl", [rec(task_type="cbqa"), rec(task_type="nli"), rec(task_type="knowledge"),
                                              rec(task_type="downstream"), rec(task_type=-1)])
    data = load_instruction_data(path, byte_tokenizer, task_type_names={"cbqa": 1, "nli": 0})
    assert [s.task_type for s in data.samples] == [1, 0, 1, 0, -1]
    assert data.task_type_counts() == {1: 2, 0: 2, -1: 1}


def test_chat_format_labels_every_assistant_turn(tmp_path, byte_tokenizer):
    tok = byte_tokenizer
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of Italy?"},
                {"role": "assistant", "content": "Rome"}, {"role": "user", "content": "And France?"},
                {"role": "assistant", "content": "Paris"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages, "task_type": 1}])
    (sample,) = load_instruction_data(path, tok).samples
    full = tok.apply_chat_template(messages, tokenize=False)
    assert tok.decode(sample.input_ids) == full
    # the targets are exactly the assistant turns as the template renders them (content + "</s>\n")
    assert target_text(tok, sample) == "Rome</s>\nParis</s>\n"
    assert sample.task_type == 1


def test_truncation_is_counted_and_keeps_max_len(tmp_path, byte_tokenizer):
    path = write_jsonl(tmp_path / "long.jsonl", [rec(output="x" * 100), rec()])
    data = load_instruction_data(path, byte_tokenizer, max_seq_len=40)
    assert len(data.samples[0].input_ids) == 40 and len(data.samples[0].labels) == 40
    assert data.report.truncated == 1
    assert "1 truncated to 40 tokens" in data.report.summary()


def test_mixing_weights_repeat_and_subsample(tmp_path, byte_tokenizer):
    a = write_jsonl(tmp_path / "a.jsonl", [rec(output=f"a{i}") for i in range(2)])
    b = write_jsonl(tmp_path / "b.jsonl", [rec(output=f"b{i}") for i in range(8)])
    data = load_instruction_data([(a, 2.0), f"{b}:0.5"], byte_tokenizer, seed=3)
    outputs = [target_text(byte_tokenizer, s)[:-4] for s in data.samples]
    assert outputs[:4] == ["a0", "a1", "a0", "a1"]  # weight 2: the whole file twice
    assert len(outputs) == 8 and len(set(outputs[4:])) == 4 and all(o.startswith("b") for o in outputs[4:])
    again = load_instruction_data([(a, 2.0), (b, 0.5)], byte_tokenizer, seed=3)
    other = load_instruction_data([(a, 2.0), (b, 0.5)], byte_tokenizer, seed=4)
    assert [s.input_ids for s in again.samples] == [s.input_ids for s in data.samples]  # seeded
    assert [s.input_ids for s in other.samples] != [s.input_ids for s in data.samples]
    assert [(f.records, f.valid, f.used) for f in data.report.files] == [(2, 2, 4), (8, 8, 4)]


def test_parse_data_spec_forms():
    assert parse_data_spec("x.jsonl:2.5")[1] == 2.5
    assert parse_data_spec("dir:v2/x.jsonl") == (parse_data_spec("dir:v2/x.jsonl")[0], 1.0)
    assert parse_data_spec({"path": "y.json", "weight": 3})[1] == 3.0
    with pytest.raises(DataError, match="weight must be a finite number > 0"):
        parse_data_spec(("x.jsonl", 0))


# ---- bad input -------------------------------------------------------------------------------------------------

BAD_CASES = [  # (line content, expected message fragment)
    ('{"instruction": "a", "output": "b", "task_type": 1', "malformed JSON"),
    (json.dumps({"instruction": "a", "task_type": 1}), "missing field 'output'"),
    (json.dumps({"instruction": "a", "output": "b"}), "missing field 'task_type'"),
    (json.dumps(rec(task_type="poetry")), "unknown task_type 'poetry'"),
    (json.dumps(rec(task_type=2)), "unknown task_type 2"),
    (json.dumps(rec(instruction="x" * 60)), "truncated away entirely"),
    (json.dumps(rec(output=7)), "field 'output' must be a string"),
    ("[1, 2]", "expected a JSON object"),
]


@pytest.mark.parametrize("line,message", BAD_CASES, ids=[m for _, m in BAD_CASES])
def test_bad_record_names_file_and_line(tmp_path, byte_tokenizer, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [rec(), rec(), line, rec()])
    with pytest.raises(DataError, match=message) as info:
        load_instruction_data(path, byte_tokenizer, max_seq_len=48)
    assert str(info.value).startswith(f"{path}:3: ")


def test_skip_bad_reports_every_skipped_record(tmp_path, byte_tokenizer):
    lines = [json.dumps(rec())] + [line for line, _ in BAD_CASES] + [json.dumps(rec(task_type=1))]
    path = write_jsonl(tmp_path / "mixed.jsonl", lines)
    data = load_instruction_data(path, byte_tokenizer, max_seq_len=48, skip_bad=True)
    assert [s.task_type for s in data.samples] == [0, 1]
    skipped = data.report.skipped
    assert len(skipped) == len(BAD_CASES)
    for number, (_, message) in enumerate(BAD_CASES, start=2):
        assert any(s.startswith(f"{path}:{number}: ") and message in s for s in skipped), (number, message)
    assert f"{len(BAD_CASES)} skipped" in data.report.summary()
    assert data.report.files[0].records == len(lines)


def test_empty_file_is_an_error_or_a_reported_skip(tmp_path, byte_tokenizer):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(DataError, match=r"empty\.jsonl:1: file is empty"):
        load_instruction_data(empty, byte_tokenizer)
    good = write_jsonl(tmp_path / "good.jsonl", [rec()])
    data = load_instruction_data([empty, good], byte_tokenizer, skip_bad=True)
    assert len(data) == 1 and data.report.skipped == [f"{empty}:1: file is empty (expected a JSON list or JSON lines of instruction records)"]
    with pytest.raises(DataError, match="no usable samples"):
        load_instruction_data([empty], byte_tokenizer, skip_bad=True)
    (tmp_path / "nolist.json").write_text("[ ]")
    with pytest.raises(DataError, match="JSON list is empty"):
        load_instruction_data(tmp_path / "nolist.json", byte_tokenizer)


def test_broken_json_list_names_the_line(tmp_path, byte_tokenizer):
    path = tmp_path / "broken.json"
    path.write_text('[\n {"instruction": "a", "output": "b", "task_type": 1}\n {"instruction": "c"}\n]')
    with pytest.raises(DataError, match=r"broken\.json:3: malformed JSON \(expected ',' or '\]'"):
        load_instruction_data(path, byte_tokenizer, skip_bad=True)  # a broken list cannot be skipped past
    with pytest.raises(DataError, match="file not found"):
        load_instruction_data(tmp_path / "missing.jsonl", byte_tokenizer)


def test_chat_record_needs_a_template_and_an_assistant_turn(tmp_path, byte_tokenizer, word_tokenizer):
    no_answer = {"messages": [{"role": "user", "content": "hi"}], "task_type": 0}
    path = write_jsonl(tmp_path / "c.jsonl", [no_answer])
    with pytest.raises(DataError, match=r"c\.jsonl:1: 'messages' has no assistant turn"):
        load_instruction_data(path, byte_tokenizer)
    chat = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "task_type": 0}
    path = write_jsonl(tmp_path / "d.jsonl", [chat])
    with pytest.raises(DataError, match="tokenizer has no chat template"):
        load_instruction_data(path, word_tokenizer)


# ---- collator --------------------------------------------------------------------------------------------------


def test_collator_pads_right_and_masks(byte_tokenizer):
    eos = byte_tokenizer.eos_token_id
    items = [
        {"input_ids": [5, 6, eos, 7, eos], "labels": [-100, -100, -100, 7, eos], "task_type": 1},
        {"input_ids": [8, eos, 9], "labels": [-100, -100, 9], "task_type": 0},
    ]
    batch = InstructionCollator(pad_token_id=eos)(items)  # pad id = EOS, as for many chat models
    assert batch["input_ids"].tolist() == [[5, 6, eos, 7, eos], [8, eos, 9, eos, eos]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]  # from lengths, not pad id
    assert batch["labels"].tolist() == [[-100, -100, -100, 7, eos], [-100, -100, 9, -100, -100]]
    assert batch["task_types"].tolist() == [1, 0] and batch["task_types"].dtype == torch.long
    padded = InstructionCollator(pad_token_id=eos, pad_to_multiple_of=4)(items)
    assert padded["input_ids"].shape == (2, 8)
    with pytest.raises(ValueError, match="pad_token_id"):
        InstructionCollator(pad_token_id=None)


def test_dataset_and_collator_feed_a_dataloader(tmp_path, byte_tokenizer):
    path = write_jsonl(tmp_path / "a.jsonl", [rec(task_type=i % 2) for i in range(5)])
    data = load_instruction_data(path, byte_tokenizer)
    loader = torch.utils.data.DataLoader(data, batch_size=2, collate_fn=InstructionCollator(byte_tokenizer.pad_token_id))
    batches = list(loader)
    assert [b["input_ids"].shape[0] for b in batches] == [2, 2, 1]
    assert torch.cat([b["task_types"] for b in batches]).tolist() == [0, 1, 0, 1, 0]
