"""Write a tiny random Llama (hidden 64, 2 layers) and a byte-level tokenizer with a chat template to a
directory, so that `loramoe train` can be tried in seconds on a laptop CPU without downloading anything.

    python examples/make_tiny_model.py runs/tiny-llama
    loramoe train --model runs/tiny-llama --data examples/data/tiny_instructions.jsonl --output-dir runs/tiny

The model knows nothing (random weights): it is for trying the tooling, not for results.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<s>", "</s>", "<pad>"]
# A minimal ChatML-style template: enough for chat-format ("messages") training data.
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """One token per byte (256) plus BOS/EOS/PAD: covers any UTF-8 text with no training step."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({ch: len(SPECIAL_TOKENS) + i for i, ch in enumerate(sorted(alphabet))})
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(SPECIAL_TOKENS)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", chat_template=CHAT_TEMPLATE
    )
    return tok


def make_tiny_llama(out_dir: str | Path, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """Save model + tokenizer under ``out_dir`` (safetensors) and return the path."""
    out = Path(out_dir)
    tok = byte_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="directory to write (created if missing)")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    path = make_tiny_llama(args.out_dir, args.hidden, args.layers, args.seed)
    print(f"tiny random Llama written to {path}")


if __name__ == "__main__":
    main()
