"""Routing analysis against hand-computed router weights: a Llama whose MLP input for token t is onehot(t), so a
router W_g gives token t the weights softmax(W_g[:, t]); padding must not count; figures are written."""

from __future__ import annotations

import json

import matplotlib.image
import peft
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import EVAL_WORDS, bigram_llama, save_base_and_loramoe
from loramoe import LoraMoeConfig
from loramoe.cli import main as cli_main
from loramoe.evaluate import EvalSample
from loramoe.routing import layer_of, routing_profile

W = {w: i for i, w in enumerate(EVAL_WORDS)}
MLP = "model.layers.0.mlp."


def _random_llama(layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(EVAL_WORDS), hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=0, eos_token_id=1, bos_token_id=None)
    return LlamaForCausalLM(cfg).eval()


def _samples() -> list[EvalSample]:
    return [
        EvalSample(task="facts", type="generate", prompt="the cat is red ?", answers=["paris", "rome"]),
        EvalSample(task="facts", type="generate", prompt="dog", answers=["blue green"]),
        EvalSample(task="nli", type="choice", prompt="q : capital of france ?", choices=["yes", "no"], answer=1),
    ]


def _tokens(text: str) -> list[int]:
    return [W[w] for w in text.split()]


@pytest.fixture
def routed_bigram():
    """One-layer bigram Llama with LoRAMoE (N=3, K=1): hand-set routers on gate_proj and up_proj, zero router
    (uniform weights) on down_proj. The pad token's router column is extreme, so counting padding would show."""
    model = peft.get_peft_model(bigram_llama(torch.zeros(len(W), len(W))),
                                LoraMoeConfig(num_experts=3, r=2, knowledge_experts=1, lora_dropout=0.0))
    g = torch.Generator().manual_seed(0)
    routers = {"gate_proj": 2 * torch.randn(3, len(W), generator=g), "up_proj": 2 * torch.randn(3, len(W), generator=g),
               "down_proj": torch.zeros(3, 16)}
    routers["gate_proj"][:, W["<pad>"]] = torch.tensor([50.0, -50.0, -50.0])
    with torch.no_grad():
        for name, router in routers.items():
            model.get_submodule("base_model.model." + MLP + name).loramoe_router["default"].copy_(router)
    return model, routers


def _expected(router: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    return torch.stack([router[:, t].softmax(dim=0) for t in tokens]).mean(dim=0)


@pytest.mark.parametrize("include_answer", [False, True])
def test_shares_match_hand_computed_router_weights(word_tokenizer, routed_bigram, include_answer):
    model, routers = routed_bigram
    profile = routing_profile(model, word_tokenizer, _samples(), batch_size=4, include_answer=include_answer,
                              progress=False)
    extra = include_answer
    facts = _tokens("the cat is red ?") + _tokens("paris") * extra + _tokens("dog") + _tokens("blue green") * extra
    nli = _tokens("q : capital of france ?") + _tokens("no") * extra
    assert list(profile.datasets) == ["facts", "nli"]
    assert profile.datasets["facts"].tokens == len(facts) and profile.datasets["nli"].tokens == len(nli)
    assert profile.datasets["facts"].samples == 2

    for name, tokens in [("facts", facts), ("nli", nli)]:
        modules = profile.datasets[name].modules
        assert set(modules) == {MLP + m for m in routers}
        for m, router in routers.items():
            want = _expected(router, tokens) if m != "down_proj" else torch.full((3,), 1 / 3)
            assert modules[MLP + m] == pytest.approx(want.tolist(), abs=1e-5)
            assert sum(modules[MLP + m]) == pytest.approx(1.0, abs=1e-6)
        # K = 1: the knowledge share is expert 0's weight; the layer value averages its three modules
        want_layer = (_expected(routers["gate_proj"], tokens)[0] + _expected(routers["up_proj"], tokens)[0] + 1 / 3) / 3
        assert profile.layer_knowledge_shares(name) == {"0": pytest.approx(want_layer.item(), abs=1e-5)}
        assert profile.knowledge_share(name) == pytest.approx(want_layer.item(), abs=1e-5)


def test_batching_does_not_change_shares(word_tokenizer, routed_bigram):
    model, _ = routed_bigram
    one = routing_profile(model, word_tokenizer, _samples(), batch_size=1, progress=False).to_dict()
    many = routing_profile(model, word_tokenizer, _samples(), batch_size=8, progress=False).to_dict()
    for name in one["datasets"]:
        assert one["datasets"][name]["expert_shares"] == pytest.approx(many["datasets"][name]["expert_shares"], abs=1e-6)


def test_zero_router_is_uniform_and_groups_use_K_from_config(word_tokenizer):
    model = peft.get_peft_model(_random_llama(), LoraMoeConfig(num_experts=6, r=2, knowledge_experts=2))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "loramoe_router" in name:
                p.zero_()
    data = routing_profile(model, word_tokenizer, _samples(), progress=False).to_dict()
    assert data["knowledge_experts"] == 2 and data["groups"] == {"knowledge": [0, 1], "downstream": [2, 3, 4, 5]}
    for d in data["datasets"].values():
        assert d["knowledge_share"] == pytest.approx(2 / 6)
        assert set(d["layers"]) == {"0", "1"} and all(v == pytest.approx(2 / 6) for v in d["layers"].values())
        assert len(d["modules"]) == 6  # 2 layers x (gate, up, down)


def test_random_router_json_and_figures(tmp_path, word_tokenizer):
    model = peft.get_peft_model(_random_llama(), LoraMoeConfig(num_experts=4, r=2, init_weights=False))
    profile = routing_profile(model, word_tokenizer, _samples(), batch_size=2, progress=False)
    paths = profile.save(tmp_path)
    data = json.loads(paths["json"].read_text())
    for d in data["datasets"].values():
        layer_means: dict[str, list[float]] = {}
        for module, entry in d["modules"].items():
            assert sum(entry["expert_shares"]) == pytest.approx(1.0, abs=1e-6)
            assert entry["knowledge_share"] == pytest.approx(sum(entry["expert_shares"][:2]))
            layer_means.setdefault(layer_of(module), []).append(entry["knowledge_share"])
        assert d["layers"] == pytest.approx({k: sum(v) / len(v) for k, v in layer_means.items()})
        assert sum(d["expert_shares"]) == pytest.approx(1.0, abs=1e-6)
    assert data["figures"] == {"heatmap": "routing_heatmap.png", "bars": "routing_bars.png"}
    for key in ("heatmap", "bars"):
        assert paths[key].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        height, width, _ = matplotlib.image.imread(paths[key]).shape
        assert height > 200 and width > 400
    assert "| facts | 2 |" in paths["markdown"].read_text()


def test_layer_of():
    assert layer_of("model.layers.12.mlp.up_proj") == "12"
    assert layer_of("transformer.h.3.mlp.c_fc") == "3"
    assert layer_of("lm_head") == "lm_head"


def test_model_without_loramoe_is_refused(word_tokenizer):
    with pytest.raises(ValueError, match="carries no LoRAMoE adapter"):
        routing_profile(_random_llama(), word_tokenizer, _samples(), progress=False)


def test_cli_routes(tmp_path, word_tokenizer):
    out = tmp_path / "out"
    base_dir, adapter_dir = save_base_and_loramoe(tmp_path, _random_llama(layers=1), word_tokenizer)
    trivia = tmp_path / "trivia.jsonl"
    trivia.write_text(json.dumps({"type": "generate", "prompt": "capital of italy ?", "answers": ["rome"]}) + "\n")
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps({"task": "nli", "type": "choice", "prompt": "cat ?", "choices": ["yes", "no"],
                                 "answer": 0}) + "\n")
    rc = cli_main(["routes", "--base", str(base_dir), "--adapter", str(adapter_dir), "--tasks", str(trivia),
                   str(mixed), "--out", str(out), "--no-progress", "--device", "cpu", "--include-answer"])
    assert rc == 0
    data = json.loads((out / "routing.json").read_text())
    assert list(data["datasets"]) == ["trivia", "nli"] and data["tokens_counted"] == "prompt+answer"
    assert data["datasets"]["trivia"]["tokens"] == 5
    assert (out / "routing_heatmap.png").is_file() and (out / "routing_bars.png").is_file()
