"""Shared fixtures: tiny models built from configs (no download), and an independent per-expert reference."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 64


def tiny_model(arch: str = "llama", seed: int = 0, layers: int = 2) -> torch.nn.Module:
    torch.manual_seed(seed)
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        model = LlamaForCausalLM(cfg)
    elif arch == "qwen2":
        cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        model = Qwen2ForCausalLM(cfg)
    elif arch == "gpt2":
        cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                         bos_token_id=0, eos_token_id=1)
        model = GPT2LMHeadModel(cfg)
    else:
        raise ValueError(arch)
    return model.eval()


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    """Three right-padded samples; sample 1 has three padding positions."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, VOCAB, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.fixture(scope="session", autouse=True)
def _data_cache(tmp_path_factory):
    """`loramoe train` keeps its token cache in ``$LORAMOE_CACHE``: a folder of this session, never the user's."""
    os.environ["LORAMOE_CACHE"] = str(tmp_path_factory.mktemp("data-cache"))


class NaiveLoraMoe(torch.nn.Module):
    """SPEC.md's formula, written as plainly as possible (a Python loop over experts), as the test oracle:
    y = W0 x + b + (alpha / r) * sum_i softmax(W_g x)_i * B_i A_i x."""

    def __init__(self, base: torch.nn.Module, A: list[torch.Tensor], B: list[torch.Tensor], router: torch.Tensor,
                 scaling: float) -> None:
        super().__init__()
        self.base = base
        self.A = torch.nn.ParameterList([torch.nn.Parameter(a.clone()) for a in A])
        self.B = torch.nn.ParameterList([torch.nn.Parameter(b.clone()) for b in B])
        self.router = torch.nn.Parameter(router.clone())
        self.scaling = scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.softmax((x @ self.router.T).float(), dim=-1)
        y = self.base(x)
        for i in range(len(self.A)):
            y = y + self.scaling * w[..., i : i + 1] * ((x @ self.A[i].T) @ self.B[i].T)
        return y


# ---- evaluation and routing: a word-level tokenizer and a "bigram" Llama whose logits are a hand-set table ----
EVAL_WORDS = ["<pad>", "<eos>", "<unk>", "\n", "q", "a", ":", "?", "the", "capital", "of", "france", "italy", "is",
              "paris", "rome", "city", "yes", "no", "maybe", "true", "false", "cat", "dog", "red", "blue", "green",
              "one", "two", "three", "four", "five"]


@pytest.fixture(scope="session")
def word_tokenizer():
    """Word-level tokenizer over EVAL_WORDS (id = list index); "\\n" and punctuation are tokens of their own;
    pad id 0, eos id 1; no BOS is added."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(EVAL_WORDS)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n|\w+|[^\w\s]"), behavior="removed", invert=True)
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def bigram_llama(table: torch.Tensor) -> LlamaForCausalLM:
    """A one-layer Llama over EVAL_WORDS whose next-token logits are exactly ``table[current token]`` (V x V).

    Embeddings are one-hot, attention and MLP outputs are zeroed (o_proj = down_proj = 0), both norms map a
    one-hot vector to itself, and lm_head holds the table: the logits depend on the current token only, which
    makes every log-probability computable by hand. The MLP input of token t is onehot(t), so a LoRAMoE router
    on gate_proj/up_proj gives token t the weights softmax(W_g[:, t]).
    """
    v = len(EVAL_WORDS)
    cfg = LlamaConfig(vocab_size=v, hidden_size=v, intermediate_size=16, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=64, rms_norm_eps=1e-12, tie_word_embeddings=False,
                      pad_token_id=0, eos_token_id=1, bos_token_id=None)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.eye(v))
        layer = model.model.layers[0]
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
        for norm in (layer.input_layernorm, layer.post_attention_layernorm, model.model.norm):
            norm.weight.fill_(v ** -0.5)  # RMSNorm(onehot) = sqrt(v) * onehot
        model.lm_head.weight.copy_(table.T)
    return model.eval()


# ---- training: the byte-level tokenizer and tiny random Llama of examples/make_tiny_model.py ----
def _make_tiny_model_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "examples" / "make_tiny_model.py"
    spec = importlib.util.spec_from_file_location("make_tiny_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def byte_tokenizer():
    """One token per UTF-8 byte plus <s> (0), </s> (1), <pad> (2); has a small chat template; adds no BOS."""
    return _make_tiny_model_module().byte_tokenizer()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A saved tiny random Llama (hidden 32, 2 layers) with the byte tokenizer, as `loramoe train --model` takes."""
    return _make_tiny_model_module().make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), hidden=32)


# A toy-size pre-trained world model, shared by the reproduce and sweep tests (built once per session).


def toy_pretrain_config():
    from loramoe.reproduce.pretrain import PretrainConfig

    return PretrainConfig(num_people=24, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=48,
                          block_size=32, batch_size=4, steps=3, threads=1)  # fmt: skip


@pytest.fixture(scope="session")
def toy_base(tmp_path_factory):
    """(path, model, tokenizer, world) of a toy pre-trained base saved with `save_base`."""
    from loramoe.reproduce.pretrain import pretrain, save_base

    config = toy_pretrain_config()
    model, tokenizer, world = pretrain(config, log=lambda line: None)
    path = tmp_path_factory.mktemp("toy_base")
    save_base(model, tokenizer, config, path)
    return path, model, tokenizer, world


def save_base_and_loramoe(root, base, tokenizer):
    """Write ``root/base`` (model + tokenizer) and ``root/adapter`` (a random-B LoRAMoE, N=2, r=2) for CLI tests."""
    import peft

    from loramoe import LoraMoeConfig

    base_dir, adapter_dir = root / "base", root / "adapter"
    base.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    peft.get_peft_model(base, LoraMoeConfig(num_experts=2, r=2, init_weights=False)).save_pretrained(adapter_dir)
    return base_dir, adapter_dir
