"""Pre-train the miniature base model on the world: a word-level tokenizer (``tokenizers``) and a small
LLaMA-style model, trained from scratch until it knows the world's facts.

This is pre-training, not fine-tuning, so it has its own plain loop (nanoGPT style). It is deterministic:
one seed fixes the world, the corpus, the initial weights and the data order, and the thread count is set
explicitly, so the same command on the same CPU type and torch version gives bit-identical weights.

    python -m loramoe.reproduce.pretrain --out src/loramoe/reproduce/assets/tiny_base
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from ..data import encode_record
from .tasks import (
    COLORS,
    FAMILIES,
    MAX_WORDS,
    NEGATIVE,
    NOUNS,
    OBJECTS,
    POSITIVE,
    SIZES,
    THINGS,
    Sample,
    generate,
    knowledge_sample,
    lexicon,
)  # fmt: skip
from .world import STATEMENTS, World, make_world

SPECIAL_TOKENS = ("<pad>", "<unk>", "<eos>")


@dataclass
class PretrainConfig:
    """World size, model size and optimisation of the base model's pre-training."""

    seed: int = 0
    num_people: int = 200
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 384
    block_size: int = 32
    batch_size: int = 32
    steps: int = 3000
    lr: float = 3e-3
    warmup: int = 100
    threads: int = 1


def general_text(rng: random.Random, count: int) -> list[str]:
    """Neutral sentences that use the downstream vocabulary, so that its words mean something to the base model."""
    makers = (
        lambda: f"The {rng.choice(COLORS)} {rng.choice(OBJECTS)} is {rng.choice(SIZES)}.",
        lambda: f"The {rng.choice(THINGS)} was {rng.choice(POSITIVE + NEGATIVE)}.",
        lambda: f"I saw the {rng.choice(NOUNS)} and the {rng.choice(NOUNS)}.",
        lambda: (lambda n: f"The number {n + 1} comes after {n}.")(rng.randint(0, MAX_WORDS - 1)),
        # label words occur in plain text too: a word never seen in pre-training keeps an untrained (tied)
        # embedding that frozen-backbone adapters can hardly produce as an answer
        lambda: f"{rng.choice(('She', 'He'))} said {rng.choice(('yes', 'no'))} to the {rng.choice(NOUNS)}.",
        lambda: f"The {rng.choice(NOUNS)} number was {rng.choice(('positive', 'negative'))}.",
    )
    return [rng.choice(makers)() for _ in range(count)]


def statements(world: World) -> list[str]:
    """Every phrasing of every fact of everyone in the world."""
    return [f.statement(v) for f in world.facts_of("all") for v in range(len(STATEMENTS[f.attribute]))]


def train_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer: names and values are single tokens, which keeps sequences short on a CPU."""
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    # spaces and tabs separate tokens; every other non-word character (punctuation, newline) is a token
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r"[ \t]+"), behavior="removed"), pre_tokenizers.Split(Regex(r"\W"), behavior="isolated")]
    )
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=list(SPECIAL_TOKENS), min_frequency=1))
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")


def vocabulary_texts(world: World) -> list[str]:
    """Text that covers every word the pipeline can produce: world, lexicon and task wording."""
    samples = [s for fam in FAMILIES for s in generate(fam, 300, seed=12345, world=world)]
    samples += [knowledge_sample(f) for f in world.facts_of("all")]
    words = [" ".join(lexicon()), " ".join(world.reserved_words), " ".join(world.first_names)]
    words += [" ".join(pool) for pool in world.values.values()] + [t for ts in STATEMENTS.values() for t in ts]
    return words + [f"{s.instruction}\n{s.input}\n{s.output}" for s in samples]


def qa_ids(tokenizer: PreTrainedTokenizerFast, sample: Sample) -> list[int]:
    """A QA sample tokenised exactly as the fine-tuning data is (prompt, EOS, answer, EOS)."""
    return encode_record(sample.train_record(), tokenizer, max_seq_len=10_000, task_type_names={})[0].input_ids


def pretraining_documents(world: World, tokenizer: PreTrainedTokenizerFast, seed: int) -> list[list[int]]:
    """Token ids of every pre-training line: fact statements, closed-book QA on every fact in the instruction
    layout (the web has question-answer pages; it also lets the base model be asked questions directly),
    and general text. Each line ends with EOS."""
    eos = tokenizer.eos_token_id
    lines = statements(world) + general_text(random.Random(seed), 1000)
    docs = [tokenizer(t, add_special_tokens=False)["input_ids"] + [eos] for t in lines]
    docs += [qa_ids(tokenizer, knowledge_sample(f)) for f in world.facts_of("all")]
    return docs


def make_batch(docs: list[list[int]], gen: torch.Generator, batch_size: int, block: int, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of whole lines drawn at random (by ``gen``), packed up to ``block`` tokens; padding is masked."""
    ids = torch.full((batch_size, block), pad, dtype=torch.long)
    labels = torch.full((batch_size, block), -100, dtype=torch.long)
    for row in range(batch_size):
        pos = 0
        while True:
            doc = docs[int(torch.randint(len(docs), (1,), generator=gen))]
            if pos + len(doc) > block:
                break
            ids[row, pos : pos + len(doc)] = torch.tensor(doc)
            labels[row, pos : pos + len(doc)] = torch.tensor(doc)
            pos += len(doc)
    return ids, labels


def build_model(cfg: PretrainConfig, tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
        max_position_embeddings=4 * cfg.block_size, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    torch.manual_seed(cfg.seed)
    return LlamaForCausalLM(config)


def pretrain(
    cfg: PretrainConfig, log: Callable[[str], None] = print
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast, World]:
    """Build the world, its tokenizer and a base model that has read the world's facts."""
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    world = make_world(cfg.seed, cfg.num_people)
    tokenizer = train_tokenizer(vocabulary_texts(world) + statements(world))
    docs = pretraining_documents(world, tokenizer, cfg.seed)
    too_long = [d for d in docs if len(d) > cfg.block_size]
    if too_long:
        raise ValueError(f"PretrainConfig.block_size={cfg.block_size} is shorter than a line of {len(too_long[0])} tokens.")
    model = build_model(cfg, tokenizer).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / cfg.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / cfg.steps)))
    )
    gen = torch.Generator().manual_seed(cfg.seed)
    start = time.time()
    for step in range(cfg.steps):
        ids, labels = make_batch(docs, gen, cfg.batch_size, cfg.block_size, tokenizer.pad_token_id)
        loss = model(input_ids=ids, attention_mask=(labels != -100).long(), labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        if step % 100 == 0 or step == cfg.steps - 1:
            left = (time.time() - start) / (step + 1) * (cfg.steps - step - 1)
            log(f"pretrain step {step + 1}/{cfg.steps} loss {loss.item():.3f} ({left:.0f}s left)")
    torch.use_deterministic_algorithms(False)
    return model.eval(), tokenizer, world


def save_base(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, cfg: PretrainConfig, out: Path) -> None:
    """Write model (safetensors), tokenizer and the pre-training config atomically: temp dir, then rename."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp's 0700 would make shipped assets unreadable to other users
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "pretrain_config.json").write_text(json.dumps(asdict(cfg), indent=1) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Pre-train the miniature world's base model (deterministic).")
    parser.add_argument("--out", type=Path, required=True)
    for key, value in asdict(PretrainConfig()).items():
        parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    cfg = PretrainConfig(**{k: getattr(args, k) for k in asdict(PretrainConfig())})
    model, tokenizer, _ = pretrain(cfg)
    save_base(model, tokenizer, cfg, args.out)
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
