"""Instruction data: formats, labels, task types, truncation, mixing, every bad-input case, the collator."""

from __future__ import annotations

import json
import re

import pytest
import torch

from loramoe.data import (
    DataError,
    InstructionCollator,
    fit_to_length,
    load_instruction_data,
    parse_data_spec,
    read_records,
)


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
    assert [(place.line, int(place)) for place, _ in records] == [(2, 1), (4, 2)] and problems == []
    data = load_instruction_data(path, byte_tokenizer)
    assert [s.source.rsplit(":", 1)[1] for s in data.samples] == ["2 (record 1)", "4 (record 2)"]
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
    assert "1 truncated at the end to fit 40 tokens" in data.report.summary()


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
    for spec, shown in [("x.jsonl:-1", "-1.0"), ("x.jsonl:+inf", "inf"), ("x.jsonl:NaN", "nan"),
                        ({"path": "x.jsonl", "weight": "fast"}, "'fast'")]:  # fmt: skip
        with pytest.raises(DataError, match=rf"^x\.jsonl: mixing weight must be a finite number > 0, got {shown}$"):
            parse_data_spec(spec)


def test_a_json_list_on_one_line_tells_its_records_apart(tmp_path, byte_tokenizer):
    """json.dump writes a list on one line: each record is placed by its index too, and counted in the mix."""
    records = [rec(task_type=i % 2) for i in range(16)]
    records[6] = {"instruction": "x", "task_type": 0}  # record 7 has no output
    path = tmp_path / "list.json"
    path.write_text(json.dumps(records))
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}:1 \(record 7\): missing field 'output'"):
        load_instruction_data(path, byte_tokenizer)
    data = load_instruction_data(path, byte_tokenizer, skip_bad=True)
    assert [s.source for s in data.samples][:7] == [f"{path}:1 (record {i})" for i in (1, 2, 3, 4, 5, 6, 8)]
    assert data.report.skipped == [f"{path}:1 (record 7): missing field 'output' (a record needs 'instruction', "
                                   "'output' and 'task_type')"]  # fmt: skip
    types = data.report.task_types()
    assert (types["downstream"]["records"], types["knowledge"]["records"]) == (8, 8)
    assert (types["downstream"]["skipped"], types["downstream"]["used"], types["knowledge"]["used"]) == (1, 7, 8)


# ---- bad input -------------------------------------------------------------------------------------------------

BAD_CASES = [  # (line content, expected message fragment)
    ('{"instruction": "a", "output": "b", "task_type": 1', "malformed JSON"),
    (json.dumps({"instruction": "a", "task_type": 1}), "missing field 'output'"),
    (json.dumps({"instruction": "a", "output": "b"}), "missing field 'task_type'"),
    (json.dumps(rec(task_type="poetry")), "unknown task_type 'poetry'"),
    (json.dumps(rec(task_type=2)), "unknown task_type 2"),
    (json.dumps(rec(instruction="x" * 60)), "truncated away entirely"),  # only without fitting (fit_prompt=False)
    (json.dumps(rec(output=7)), "field 'output' must be a string"),
    (json.dumps({"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "a"}],
                 "task_type": 0}), "messages[0].role 'wizard' is not a chat role"),
    ("[1, 2]", "expected a JSON object"),
    (json.dumps(rec(inp="\ud800")), "field 'input' holds '\\ud800', a lone UTF-16 surrogate, not text"),
    (json.dumps({"messages": [{"role": "user", "content": "a\udfff"}, {"role": "assistant", "content": "b"}],
                 "task_type": 0}), "messages[0].content holds '\\udfff', a lone UTF-16 surrogate"),
]


@pytest.mark.parametrize("line,message", BAD_CASES, ids=[m for _, m in BAD_CASES])
def test_bad_record_names_file_and_line(tmp_path, byte_tokenizer, line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [rec(), rec(), line, rec()])
    with pytest.raises(DataError, match=re.escape(message)) as info:
        load_instruction_data(path, byte_tokenizer, max_seq_len=48, fit_prompt=False)
    assert str(info.value).startswith(f"{path}:3: ")


def test_skip_bad_reports_every_skipped_record(tmp_path, byte_tokenizer):
    lines = [json.dumps(rec())] + [line for line, _ in BAD_CASES] + [json.dumps(rec(task_type=1))]
    path = write_jsonl(tmp_path / "mixed.jsonl", lines)
    data = load_instruction_data(path, byte_tokenizer, max_seq_len=48, skip_bad=True, fit_prompt=False)
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


# ---- fitting over-long samples ---------------------------------------------------------------------------------


def test_fitting_cuts_the_prompt_middle_keeping_its_start_and_question(tmp_path, byte_tokenizer):
    """Byte tokenizer (one token per byte, no BOS): prompt = instruction + EOS = 210 tokens, target "ok" + EOS =
    3; at 64 tokens the prompt keeps 61 = its first 31 and its last 30 (29 bytes + EOS)."""
    instruction = "HEAD " + "m" * 198 + " TAIL?"
    assert len(instruction) == 209
    path = write_jsonl(tmp_path / "long.jsonl", [rec(instruction, "", "ok", 1), rec()])
    data = load_instruction_data(path, byte_tokenizer, max_seq_len=64)
    sample = data.samples[0]
    assert byte_tokenizer.decode(sample.input_ids) == instruction[:31] + instruction[-29:] + "</s>ok</s>"
    assert sample.labels == [-100] * 61 + sample.input_ids[61:] and len(sample.input_ids) == 64
    file = data.report.files[0]
    assert (file.prompt_cut, file.prompt_tokens_cut, file.truncated) == (1, 210 - 61, 0)
    assert file.task_types["knowledge"] == {"records": 1, "valid": 1, "used": 1, "skipped": 0, "prompt_cut": 1, "truncated": 0}
    assert file.task_types["downstream"]["prompt_cut"] == 0
    assert "1 prompts cut in the middle (149 tokens)" in data.report.summary()
    # the strict behaviour, kept behind a flag: cut the end, and a response cut away entirely is a bad record
    with pytest.raises(DataError, match=r"long\.jsonl:1: the response is truncated away entirely"):
        load_instruction_data(path, byte_tokenizer, max_seq_len=64, fit_prompt=False)


def test_a_long_response_keeps_half_the_length_for_the_prompt_then_is_cut_at_its_end(tmp_path, byte_tokenizer):
    path = write_jsonl(tmp_path / "both.jsonl", [rec("p" * 99, "", "r" * 99, 0)])  # 100 prompt + 100 target tokens
    (sample,) = load_instruction_data(path, byte_tokenizer, max_seq_len=64).samples
    assert byte_tokenizer.decode(sample.input_ids) == "p" * 16 + "p" * 15 + "</s>" + "r" * 32  # prompt: 64 // 2
    file = load_instruction_data(path, byte_tokenizer, max_seq_len=64).report.files[0]
    assert (file.prompt_cut, file.prompt_tokens_cut, file.truncated) == (1, 68, 1)


def test_fitting_keeps_exactly_the_right_distinct_tokens_for_an_odd_prompt_budget():
    """Distinct token ids, so a cut moved by one token changes the result. Prompt 0..19 (20 tokens), target
    100..102: at 16 tokens the prompt keeps 13 = its first 7 and its last 6 (the odd token goes to the start)."""
    prompt, target = list(range(20)), [100, 101, 102]
    ids, labels, cut = fit_to_length(prompt + target, [-100] * 20 + target, 16)
    assert ids == [0, 1, 2, 3, 4, 5, 6, 14, 15, 16, 17, 18, 19, 100, 101, 102]
    assert labels == [-100] * 13 + [100, 101, 102] and (cut.prompt_tokens, cut.truncated) == (7, False)
    # 15 tokens and a 20-token target: the prompt keeps 15 // 2 = 7 (first 4, last 3), then the end is cut
    long_target = list(range(100, 120))
    ids, labels, cut = fit_to_length(prompt + long_target, [-100] * 20 + long_target, 15)
    assert ids == [0, 1, 2, 3, 17, 18, 19, 100, 101, 102, 103, 104, 105, 106, 107]
    assert labels == [-100] * 7 + list(range(100, 108)) and (cut.prompt_tokens, cut.truncated) == (13, True)
    # one token over: the single token removed is the middle one (index 10 of 0..19: head 10, tail 9)
    ids, _, cut = fit_to_length(prompt + target, [-100] * 20 + target, 22)
    assert ids == list(range(10)) + list(range(11, 20)) + target and cut.prompt_tokens == 1
    assert fit_to_length(prompt + target, [-100] * 20 + target, 23)[0] == prompt + target  # fits: untouched


def test_fitting_a_file_of_distinct_characters(tmp_path, byte_tokenizer):
    """The same cut through load_instruction_data: one byte per token, every byte of the prompt different."""
    instruction = "".join(chr(c) for c in range(ord("0"), ord("0") + 40))  # "0123456789:;<=>?@ABC..." (40 bytes)
    path = write_jsonl(tmp_path / "distinct.jsonl", [rec(instruction, "", "ok", 1)])
    (sample,) = load_instruction_data(path, byte_tokenizer, max_seq_len=30).samples  # prompt 41 (+EOS) -> keep 27
    assert byte_tokenizer.decode(sample.input_ids) == instruction[:14] + instruction[-12:] + "</s>ok</s>"


def test_chat_records_are_fitted_before_the_first_assistant_turn(tmp_path, byte_tokenizer):
    messages = [{"role": "user", "content": "Q " + "x" * 300 + " why?"}, {"role": "assistant", "content": "because"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages, "task_type": 0}])
    (sample,) = load_instruction_data(path, byte_tokenizer, max_seq_len=80).samples
    prompt = byte_tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    prompt_ids = byte_tokenizer(prompt, add_special_tokens=False)["input_ids"]  # "<s>", "</s>": one token each
    target_ids = byte_tokenizer("because</s>\n", add_special_tokens=False)["input_ids"]
    keep = 80 - len(target_ids)
    head, tail = (keep + 1) // 2, keep // 2
    assert sample.input_ids == prompt_ids[:head] + prompt_ids[-tail:] + target_ids
    assert byte_tokenizer.decode(sample.input_ids).startswith("<s>user\nQ x") and "x why?</s>" in byte_tokenizer.decode(sample.input_ids)
    assert target_text(byte_tokenizer, sample) == "because</s>\n"


def test_per_type_mix_before_and_after_is_reported(tmp_path, byte_tokenizer):
    records = [rec(task_type=1), rec(task_type=1), rec("x" * 60, task_type=0), rec(task_type=0), rec(task_type=0),
               rec(task_type="poetry"), "{broken"]  # fmt: skip
    path = write_jsonl(tmp_path / "mix.jsonl", records)
    data = load_instruction_data([f"{path}:2"], byte_tokenizer, max_seq_len=48, skip_bad=True, fit_prompt=False)
    types = data.report.to_dict()["task_types"]
    assert types == {
        "downstream": {"records": 3, "valid": 2, "used": 4, "skipped": 1, "prompt_cut": 0, "truncated": 0},
        "invalid": {"records": 2, "valid": 0, "used": 0, "skipped": 2, "prompt_cut": 0, "truncated": 0},
        "knowledge": {"records": 2, "valid": 2, "used": 4, "skipped": 0, "prompt_cut": 0, "truncated": 0},
    }
    assert data.report.to_dict()["files"][0]["task_types"] == types
    mix = data.report.mix()  # records: 3 / 2 / 2 of 7; samples used (weight 2): 4 / 0 / 4 of 8
    assert mix.startswith("downstream 3 (43%) -> 4 (50%) [1 skipped, 0 prompts cut, 0 truncated], invalid 2 (29%) -> 0 (0%)")
    assert mix.endswith("knowledge 2 (29%) -> 4 (50%)") and mix in data.report.summary()


def test_per_type_totals_are_summed_over_files(tmp_path, byte_tokenizer):
    """Two files sharing task types: the report's totals are the sums of the per-file counts, counted by hand."""
    a = write_jsonl(tmp_path / "a.jsonl", [rec(task_type=1), rec("x" * 60, task_type=0), rec(task_type=0)])
    b = write_jsonl(tmp_path / "b.jsonl", [rec(task_type=1), rec(task_type=1), rec(task_type=0), rec(task_type=7)])
    data = load_instruction_data([f"{a}:2", b], byte_tokenizer, max_seq_len=48, skip_bad=True, fit_prompt=False)
    assert data.report.task_types() == {
        "downstream": {"records": 3, "valid": 2, "used": 3, "skipped": 1, "prompt_cut": 0, "truncated": 0},
        "invalid": {"records": 1, "valid": 0, "used": 0, "skipped": 1, "prompt_cut": 0, "truncated": 0},
        "knowledge": {"records": 3, "valid": 3, "used": 4, "skipped": 0, "prompt_cut": 0, "truncated": 0},
    }
    fitted = load_instruction_data([a, b], byte_tokenizer, max_seq_len=48, skip_bad=True).report.task_types()
    assert fitted["downstream"]["prompt_cut"] == 1 and fitted["knowledge"]["prompt_cut"] == 0


def test_a_folder_as_data_is_named(tmp_path, byte_tokenizer):
    with pytest.raises(DataError, match=rf"^{re.escape(str(tmp_path))}: is a folder, but not one written by Dataset.save_to_disk"):
        load_instruction_data(tmp_path, byte_tokenizer)


@pytest.mark.parametrize("names,message", [
    ({"0": 1}, "'0' is not a name"),
    ({"knowledge": 0}, "'knowledge' is built in as 1"),
    ({"cbqa": 2}, r"task_type_names\['cbqa'\]=2: not a task type"),
    ({"nli": True}, r"task_type_names\['nli'\]=True: not a task type"),
])  # fmt: skip
def test_task_type_names_that_could_not_apply_are_refused(tmp_path, byte_tokenizer, names, message):
    path = write_jsonl(tmp_path / "a.jsonl", [rec()])
    with pytest.raises(ValueError, match=message):
        load_instruction_data(path, byte_tokenizer, task_type_names=names)
