"""Model level: a small LLaMA with each method on its FFN linears; an AdamW training step and greedy generate()."""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import peft
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import loramoe
from loramoe.balance import importance, localized_balancing_loss

from .measure import peak_bytes, saved_tensor_bytes, time_interleaved
from .methods import ALPHA, METHODS, LoopLoraMoe

FFN = ("gate_proj", "up_proj", "down_proj")
PAIRS = [("loramoe", "base"), ("loramoe", "lora"), ("loramoe", "loop"), ("lora", "base"), ("loop", "base")]


@dataclass(frozen=True)
class ModelCase:
    hidden: int = 1024  # the FFN is the layer benchmarks' main shape, 1024 -> 2752
    intermediate: int = 2752
    layers: int = 4
    heads: int = 16
    vocab: int = 8192
    batch: int = 4
    seq: int = 128
    n_experts: int = 6
    r: int = 4
    dropout: float = 0.05
    prompt: int = 32
    new_tokens: int = 32


def _base_model(case: ModelCase) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=case.vocab, hidden_size=case.hidden, intermediate_size=case.intermediate,
                      num_hidden_layers=case.layers, num_attention_heads=case.heads, num_key_value_heads=case.heads,
                      max_position_embeddings=max(case.seq, case.prompt + case.new_tokens), pad_token_id=0,
                      eos_token_id=1, bos_token_id=None)
    return LlamaForCausalLM(cfg).requires_grad_(False)


def _fused_model(base: LlamaForCausalLM, case: ModelCase, n_experts: int) -> peft.PeftModel:
    """LoRAMoE on the FFN linears, reproducibly initialised, with B non-zero (as after some training)."""
    torch.manual_seed(1)
    model = peft.get_peft_model(copy.deepcopy(base), loramoe.LoraMoeConfig(
        num_experts=n_experts, r=case.r, lora_alpha=ALPHA, lora_dropout=case.dropout))
    with torch.no_grad():
        for _, layer in loramoe.find_tuner(model).loramoe_layers():
            layer.loramoe_B["default"].normal_(0, 0.02)
    return model


def _loop_model(base: LlamaForCausalLM, case: ModelCase, n_experts: int) -> tuple[nn.Module, list[LoopLoraMoe]]:
    """The base model with every FFN linear replaced by the per-expert loop, holding the fused model's experts."""
    fused_layers = dict(loramoe.find_tuner(_fused_model(base, case, n_experts)).loramoe_layers())
    model = copy.deepcopy(base)
    loops = []
    for name, module in list(model.named_modules()):
        if name.rsplit(".", 1)[-1] in FFN:
            parent, child = name.rsplit(".", 1)
            loop = LoopLoraMoe(module, n_experts, case.r, ALPHA, case.dropout).copy_from(fused_layers[name])
            setattr(model.get_submodule(parent), child, loop)
            loops.append(loop)
    return model, loops


class Runner:
    """One method's model with its training step and generation; the loss includes the LBC where there is one."""

    def __init__(self, method: str, base: LlamaForCausalLM, case: ModelCase, n_experts: int) -> None:
        self.method, self.loops = method, []
        if method == "base":
            self.model = copy.deepcopy(base)
            self.model.enable_input_require_grads()  # backward runs through every layer, as it must under adapters
        elif method == "lora":
            config = peft.LoraConfig(r=n_experts * case.r, lora_alpha=ALPHA, lora_dropout=case.dropout,
                                     target_modules=list(FFN))
            self.model = peft.get_peft_model(copy.deepcopy(base), config)
        elif method == "loramoe":
            self.model = _fused_model(base, case, n_experts)
        elif method == "loop":
            self.model, self.loops = _loop_model(base, case, n_experts)
        else:
            raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=1e-4) if params else None
        self.config = loramoe.LoraMoeConfig(num_experts=n_experts, r=case.r)
        g = torch.Generator().manual_seed(2)
        ids = torch.randint(2, case.vocab, (case.batch, case.seq), generator=g)
        self.batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
        self.task_types = torch.arange(case.batch) % 2  # alternating downstream / knowledge samples
        self.prompt = torch.randint(2, case.vocab, (1, case.prompt), generator=g)
        self.new_tokens = case.new_tokens

    def loss(self) -> torch.Tensor:
        if self.method == "loramoe":
            return self.model(**self.batch, task_types=self.task_types).loss
        for loop in self.loops:
            loop.sink = []
        loss = self.model(**self.batch).loss
        if self.loops:  # the same LBC the library adds, from the loop's router weights
            cfg = self.config
            terms = [localized_balancing_loss(importance(w), self.task_types, cfg.knowledge_experts, cfg.blc_alpha,
                                              cfg.blc_mode) for loop in self.loops for w in loop.sink]
            loss = loss + cfg.blc_weight * torch.stack(terms).sum()
            for loop in self.loops:
                loop.sink = None
        return loss

    def train_step(self) -> None:
        self.model.train()
        if self.opt is not None:
            self.opt.zero_grad(set_to_none=True)
        self.loss().backward()
        if self.opt is not None:
            self.opt.step()

    def generate(self) -> torch.Tensor:
        self.model.eval()
        return self.model.generate(input_ids=self.prompt, attention_mask=torch.ones_like(self.prompt),
                                   max_new_tokens=self.new_tokens, min_new_tokens=self.new_tokens,
                                   do_sample=False, pad_token_id=0)


def _check_parity(runners: dict[str, Runner]) -> float:
    """The loop and the fused model must compute the same logits (eval mode), or the comparison means nothing."""
    inputs = {k: v for k, v in runners["loramoe"].batch.items() if k != "labels"}
    with torch.no_grad():
        fused = runners["loramoe"].model.eval()(**inputs).logits
        loop = runners["loop"].model.eval()(**inputs).logits
    err = ((fused - loop).norm() / loop.norm()).item()
    if err > 1e-4:
        raise AssertionError(f"loramoe and loop models disagree: relative error {err:.2e}")
    return err


def run_model_case(
    case: ModelCase, rounds: int, generate_rounds: int, min_seconds: float, sweep: tuple[int, ...], sweep_rounds: int
) -> dict:
    """Training step and generate() of every method at ``case.n_experts``; then LoRAMoE and the loop across
    ``sweep`` expert counts (the claim: LoRAMoE's cost hardly depends on N)."""
    base = _base_model(case)
    runners = {m: Runner(m, base, case, case.n_experts) for m in METHODS}
    err = _check_parity(runners)
    train = time_interleaved({m: r.train_step for m, r in runners.items()}, rounds, min_seconds, PAIRS)
    generate = time_interleaved({m: r.generate for m, r in runners.items()}, generate_rounds, min_seconds, PAIRS)
    for r in runners.values():
        r.model.train()
    saved = {m: saved_tensor_bytes(r.loss, list(r.model.parameters())) for m, r in runners.items()}
    peak = {m: peak_bytes(r.train_step) for m, r in runners.items()}
    del runners

    sweep_runners = {f"{m}@{n}": Runner(m, base, case, n) for n in sweep for m in ("loramoe", "loop")}
    pairs = [(f"{m}@{sweep[-1]}", f"{m}@{sweep[0]}") for m in ("loramoe", "loop")]
    by_n = time_interleaved({k: r.train_step for k, r in sweep_runners.items()}, sweep_rounds, min_seconds, pairs)
    return {
        "config": asdict(case),
        "n_experts": case.n_experts,
        "train_step_ms": train.ms,
        "train_ratios": train.ratios,
        "generate_ms": generate.ms,
        "generate_tokens_per_s": {m: case.new_tokens / (ms / 1e3) for m, ms in generate.ms.items()},
        # tokens/s ratios are the inverse of the time ratios: loramoe/base = time(base) / time(loramoe)
        "generate_ratios": {k: 1.0 / v for k, v in generate.ratios.items()},
        "saved_bytes": saved,
        "peak_bytes": peak,
        "rounds": rounds,
        "generate_rounds": generate_rounds,
        "loop_vs_loramoe_rel_err": err,
        "n_sweep": {
            "n_experts": list(sweep),
            "train_step_ms": {m: [by_n.ms[f"{m}@{n}"] for n in sweep] for m in ("loramoe", "loop")},
            "ratios": by_n.ratios,
            "rounds": sweep_rounds,
        },
    }
