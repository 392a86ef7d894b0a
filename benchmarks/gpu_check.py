"""One prepared GPU check: everything this project claims for CUDA, measured in one run, written to one JSON.

    PYTHONPATH=src python -m benchmarks.gpu_check --out DIR             # one H100/H200: < 8 min
    PYTHONPATH=src python -m benchmarks.gpu_check --out DIR --reduced   # tiny shapes; automatic without CUDA

Writes ``DIR/gpu_check.json``: one entry per section, each with a ``status`` (passed | failed | skipped: why |
error: what) and its figures; ``ok`` is true when no section failed or errored. Sections:

- ``parity``: the fused layer against the per-expert loop (`benchmarks.methods.LoopLoraMoe`) on the device, fp32
  and under bf16 autocast: output, every gradient, the LBC and its gradient;
- ``layer_benchmark``: LLaMA-2-7B's FFN shape (4096 -> 11008), 8k and 16k tokens, N = 6, r = 4, dropout 0.05,
  forward + backward, fp32 and bf16 autocast: ms, loramoe/base, loramoe/lora, loramoe/loop, peak memory;
- ``nf4``: LoRAMoE on an NF4 base (bitsandbytes): zero-B logits equal the base's, a few steps, save and reload;
- ``train_packed``: `loramoe train --packing --dtype bfloat16` on a random LLaMA of 7B layer shape (4 layers):
  real tokens/s and MFU (needs the packing and dtype options);
- ``compile_layer``: opcheck of the operators on the device, the compiled layer (fullgraph) against eager, and
  its time against eager at 8k tokens in bf16;
- ``train_compile``: the same random model trained eager and with ``--compile`` (bf16, fixed-length samples so
  one graph serves every step): losses step by step, tokens/s and MFU of both.

Sections run in that order and share the time budget (``--budget``, 450 s): one that would start after it is
recorded as skipped. The machine needs no network and nothing beyond torch, transformers, peft and accelerate
(bitsandbytes optional); models are built from configs, data is generated.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import platform
import random
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
# Dense bf16 tensor-core peaks (no sparsity), from NVIDIA's data sheets, for MFU.
PEAK_BF16_FLOPS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}
OVERHEAD = 40  # tokens a record adds around its output (prompt template, special tokens), with the byte tokenizer


@dataclass(frozen=True)
class Plan:
    """Shapes and sizes: `full` for one H100/H200, `reduced` for a CPU in CI (a few seconds)."""

    reduced: bool
    parity: tuple[int, int, int] = (1024, 4096, 11008)  # tokens, in, out
    bench: tuple[int, int] = (4096, 11008)
    bench_tokens: tuple[int, ...] = (8192, 16384)
    bench_rounds: int = 5
    min_seconds: float = 0.05
    experts: int = 6
    r: int = 4
    model: dict = field(default_factory=lambda: dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=4,
                                                     num_attention_heads=32, num_key_value_heads=32, vocab_size=32000))
    nf4_model: dict = field(default_factory=lambda: dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=2,
                                                         num_attention_heads=8, num_key_value_heads=8, vocab_size=1024))
    seq: int = 1024
    batch: int = 8
    steps: int = 8
    warmup_steps: int = 3  # not counted in tokens/s (the compiled run compiles in its first step)
    compile_tokens: int = 8192
    compile_backend: str = "inductor"


def full_plan() -> Plan:
    return Plan(reduced=False)


def reduced_plan() -> Plan:
    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=512)  # fmt: skip
    # aot_eager: the graph capture, functionalisation and autograd of a compiled run without inductor's C++ build,
    # which takes minutes on a loaded CPU (tests/test_compile.py covers inductor on CPU)
    return Plan(reduced=True, parity=(32, 64, 96), bench=(64, 96), bench_tokens=(32, 64), bench_rounds=2,
                min_seconds=0.0, model=small, nf4_model=small, seq=48, batch=2, steps=3, warmup_steps=1,
                compile_tokens=64, compile_backend="aot_eager")  # fmt: skip


# ---- helpers ---------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _fwd_bwd(module: nn.Module, owner: nn.Module, x: torch.Tensor, grad: torch.Tensor, device: torch.device,
             bf16: bool) -> Callable[[], None]:
    """One timed forward + backward of ``module`` (``owner`` holds the parameters whose gradients are cleared)."""

    def run() -> None:
        x.grad = None
        owner.zero_grad(set_to_none=True)
        with _autocast(device, bf16):
            y = module(x)
        y.backward(grad.to(y.dtype))
        _sync(device)

    return run


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def _peak_flops(device: torch.device) -> tuple[float | None, str]:
    if device.type != "cuda":
        return None, "not a CUDA device"
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_BF16_FLOPS.items():  # "H100 PCIe" before "H100"
        if key in name:
            return flops, f"{name}: {key} dense bf16 peak"
    return None, f"{name}: no peak known"


def _tiny_model_module() -> Any:
    spec = importlib.util.spec_from_file_location("make_tiny_model", ROOT / "examples" / "make_tiny_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _layer_pair(d_in: int, d_out: int, plan: Plan, dropout: float, device: torch.device):
    """The fused layer and the per-expert loop holding the same experts, around one frozen base."""
    from .methods import build_layer

    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out, bias=False).requires_grad_(False)
    fused = build_layer("loramoe", base, plan.experts, plan.r, dropout)
    with torch.no_grad():
        fused.loramoe_router["default"].normal_(0, 1 / math.sqrt(d_in))  # logits ~ N(0, 1): far from uniform
    loop = build_layer("loop", base, plan.experts, plan.r, dropout)
    loop.copy_from(fused)
    return base.to(device), fused.to(device), loop.to(device)


# ---- sections --------------------------------------------------------------------------------------------------


def environment(device: torch.device) -> dict:
    import accelerate
    import peft
    import transformers

    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
            "peft": peft.__version__, "accelerate": accelerate.__version__, "python": platform.python_version(),
            "device": str(device)}  # fmt: skip
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gib"] = torch.cuda.get_device_properties(device).total_memory / 2**30
    try:
        import bitsandbytes

        info["bitsandbytes"] = bitsandbytes.__version__
    except ImportError as e:
        info["bitsandbytes"] = f"not importable: {e}"
    return {"status": "passed", **info}


def _layer_losses(layer: nn.Module, sink: list[torch.Tensor], x: torch.Tensor, task_types: torch.Tensor,
                  bf16: bool) -> list[torch.Tensor]:  # fmt: skip
    """y, the LBC (K = N // 2, delta 0.1) of the router weights the layer puts in ``sink``, and the gradient of
    <y, g> + LBC with respect to x (the adapter weights' gradients are left in ``.grad``)."""
    from loramoe.balance import importance, localized_balancing_loss

    x = x.clone().requires_grad_()
    with _autocast(x.device, bf16):
        y = layer(x)
    weights = sink[-1]
    lbc = localized_balancing_loss(importance(weights), task_types, weights.shape[-1] // 2, 0.1)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.device, y.dtype)
    ((y * g).float().sum() + lbc).backward()
    return [y.detach().float(), lbc.detach(), x.grad]


def parity(plan: Plan, device: torch.device) -> dict:
    tokens, d_in, d_out = plan.parity
    samples = 4
    x = torch.randn(samples, tokens // samples, d_in, generator=torch.Generator().manual_seed(0)).to(device)
    task_types = torch.tensor([1, 0, 1, 0], device=device)
    n, r = plan.experts, plan.r
    results, errors, lbc = {}, {}, {}
    for mode, bf16 in (("fp32", False), ("bf16_autocast", True)):
        _, fused, loop = _layer_pair(d_in, d_out, plan, 0.0, device)
        fused.train()
        loop.train()
        fused._blc_sink, loop.sink = [], []
        got = _layer_losses(fused, fused._blc_sink, x, task_types, bf16)
        want = _layer_losses(loop, loop.sink, x, task_types, bf16)
        got += [fused.loramoe_A["default"].grad.view(n, r, -1), fused.loramoe_B["default"].grad.view(-1, n, r),
                fused.loramoe_router["default"].grad]  # fmt: skip
        want += [torch.stack([a.weight.grad for a in loop.lora_A]),
                 torch.stack([b.weight.grad for b in loop.lora_B], dim=1), loop.router.weight.grad]  # fmt: skip
        names = ["y", "lbc", "grad_x", "grad_A", "grad_B", "grad_router"]
        results[mode] = {name: _rel(a, b) for name, a, b in zip(names, got, want)}
        lbc[mode] = {"fused": got[1].item(), "loop": want[1].item()}
    limits = {"fp32": 1e-4, "bf16_autocast": 3e-2}  # bf16: both sides round, in different orders
    for mode, errs in results.items():
        errors.update({f"{mode}.{k}": v for k, v in errs.items() if not v < limits[mode]})
    return {"status": "failed" if errors else "passed", "relative_error": results, "lbc": lbc, "limits": limits,
            "over_limit": errors, "shape": {"tokens": tokens, "in": d_in, "out": d_out, "experts": n, "r": r}}  # fmt: skip


def layer_benchmark(plan: Plan, device: torch.device) -> dict:
    from .measure import peak_bytes, time_interleaved
    from .methods import METHODS, build_layer

    d_in, d_out = plan.bench
    pairs = [("loramoe", "base"), ("loramoe", "lora"), ("loramoe", "loop")]
    cases = []
    for tokens in plan.bench_tokens:
        for bf16 in (False, True):
            torch.manual_seed(0)
            base = nn.Linear(d_in, d_out, bias=False).requires_grad_(False)
            layers = {m: build_layer(m, base, plan.experts, plan.r, 0.05).to(device).train() for m in METHODS}
            x = torch.randn(1, tokens, d_in, device=device, requires_grad=True)
            grad = torch.randn(1, tokens, d_out, device=device)

            fns = {m: _fwd_bwd(layer, layer, x, grad, device, bf16) for m, layer in layers.items()}
            timing = time_interleaved(fns, plan.bench_rounds, plan.min_seconds, pairs)
            peak = {m: peak_bytes(fn) for m, fn in fns.items()}
            cases.append({"tokens": tokens, "in": d_in, "out": d_out, "mode": "bf16 autocast" if bf16 else "fp32",
                          "ms": timing.ms, "ratios": timing.ratios, "peak_mib": {m: b / 2**20 for m, b in peak.items()}})  # fmt: skip
            del layers, fns, x, grad
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return {"status": "passed", "experts": plan.experts, "r": plan.r, "dropout": 0.05, "cases": cases,
            "peak_memory": "torch.cuda.max_memory_allocated above the start" if device.type == "cuda"
            else "tensor bytes alive (CPU proxy, benchmarks.measure.peak_bytes)"}  # fmt: skip


def _llama(spec: dict, device: torch.device, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(**spec, max_position_embeddings=4096, tie_word_embeddings=False, pad_token_id=2,
                         bos_token_id=0, eos_token_id=1)  # fmt: skip
    with torch.device(device):
        return LlamaForCausalLM(config).to(dtype).eval()


def nf4(plan: Plan, device: torch.device, workdir: Path) -> dict:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        return {"status": f"skipped: bitsandbytes is not importable ({e})"}
    import peft

    from loramoe import LoraMoeConfig
    from loramoe.quantization import quantize_model

    def base() -> nn.Module:
        return quantize_model(_llama(plan.nf4_model, torch.device("cpu")), "nf4", device=device)

    ids = torch.randint(3, plan.nf4_model["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(0)).to(device)
    quantized = base()
    with torch.no_grad():
        base_logits = quantized(input_ids=ids).logits
    model = peft.get_peft_model(quantized, LoraMoeConfig(num_experts=plan.experts, r=plan.r))
    with torch.no_grad():
        zero_b = torch.equal(model(input_ids=ids).logits, base_logits)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids, task_types=torch.tensor([1, 0], device=device)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    model.save_pretrained(workdir / "nf4_adapter")
    reloaded = peft.PeftModel.from_pretrained(base(), workdir / "nf4_adapter").eval()
    with torch.no_grad():
        same = torch.equal(reloaded(input_ids=ids).logits, trained)
    ok = zero_b and same and all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    return {"status": "passed" if ok else "failed", "zero_b_logits_equal_base": zero_b, "losses": losses,
            "reloaded_logits_equal_trained": same, "bitsandbytes": bitsandbytes.__version__}  # fmt: skip


def _write_data(path: Path, count: int, lengths: Callable[[int], int]) -> str:
    """Instruction records of random lowercase text; with the byte tokenizer a record of output length L has a
    fixed number of tokens more than L, so ``lengths`` sets the sample lengths."""
    rng = random.Random(0)
    rows = []
    for i in range(count):
        text = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz ") for _ in range(lengths(i)))
        rows.append({"instruction": "Continue.", "input": "", "output": text, "task_type": i % 2})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def _flops_per_token(model: nn.Module, spec: dict, seq: int) -> float:
    """Training FLOPs per token: 4 per frozen linear weight (forward and the input gradient; a frozen base has no
    weight gradient), 6 per trainable weight, and 12 L d seq for attention's two products (PaLM's convention)."""
    frozen = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return 4 * frozen + 6 * trainable + 12 * spec["num_hidden_layers"] * spec["hidden_size"] * seq


def _train_run(plan: Plan, device: torch.device, workdir: Path, name: str, data: str, **options: Any) -> dict:
    """One `loramoe train` run on a fresh random model; steady-state real tokens/s from metrics.jsonl."""
    from loramoe.train import TrainConfig, train

    dtype = {"bfloat16": torch.bfloat16}.get(options.get("dtype"), torch.float32)
    model = _llama(plan.model, device, dtype)
    tokenizer = _tiny_model_module().byte_tokenizer()
    cfg = TrainConfig(model=f"random llama {plan.model}", data=[data], output_dir=str(workdir / name),
                      num_experts=plan.experts, r=plan.r, max_seq_len=plan.seq, batch_size=plan.batch,
                      max_steps=plan.steps, lr=2e-4, warmup_ratio=0.0, progress=False, seed=0, overwrite=True,
                      **options)  # fmt: skip
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = train(cfg, model=model, tokenizer=tokenizer)
    seconds = time.perf_counter() - start
    records = [json.loads(line) for line in (workdir / name / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "step_seconds" in r]
    counted = steps[plan.warmup_steps:]
    tokens = steps[-1]["tokens"] - steps[plan.warmup_steps - 1]["tokens"]
    tokens_per_s = tokens / sum(r["step_seconds"] for r in counted)
    flops = _flops_per_token(result.model, plan.model, plan.seq)
    peak, peak_note = _peak_flops(device)
    out = {"options": options, "steps": len(steps), "seconds": seconds,
           "first_step_seconds": steps[0]["step_seconds"], "lm_loss": [r["lm_loss"] for r in steps],
           "blc_loss": [r["blc_loss"] for r in steps], "tokens_per_s": tokens_per_s,
           "tokens_per_s_counts": f"steps {plan.warmup_steps + 1}-{len(steps)}", "flops_per_token": flops,
           "mfu": tokens_per_s * flops / peak if peak else None, "peak_flops": peak_note}  # fmt: skip
    if device.type == "cuda":
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    del result, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def _train_fields() -> set[str]:
    import dataclasses

    from loramoe.train import TrainConfig

    return {f.name for f in dataclasses.fields(TrainConfig)}


def train_packed(plan: Plan, device: torch.device, workdir: Path) -> dict:
    missing = {"packing", "dtype"} - _train_fields()
    if missing:
        return {"status": f"skipped: packing not available (TrainConfig has no {sorted(missing)})"}
    def length(i: int) -> int:  # up to a full row (the template and special tokens add OVERHEAD)
        return random.Random(i).randint(plan.seq // 16, plan.seq - OVERHEAD)

    data = _write_data(workdir / "varied.jsonl", plan.batch * plan.steps * 4, length)
    run = _train_run(plan, device, workdir, "packed", data, packing=True, dtype="bfloat16")
    ok = all(math.isfinite(v) for v in run["lm_loss"] + run["blc_loss"])
    return {"status": "passed" if ok else "failed", "model": plan.model, **run}


def compile_layer(plan: Plan, device: torch.device) -> dict:
    import torch._dynamo

    from loramoe.layer import _mix_experts_backward_op, _mix_experts_op

    from .measure import time_interleaved

    g = torch.Generator().manual_seed(0)
    x, router, A, B = (torch.randn(*s, generator=g).to(device) for s in [(64, 96), (6, 96), (24, 96), (80, 24)])
    keep = (torch.rand(64, 96, generator=g) >= 0.1).to(device)
    torch.library.opcheck(_mix_experts_op, (*(t.clone().requires_grad_() for t in (x, router, A, B)), keep, 1.5))
    _, w, h = _mix_experts_op(x, router, A, B, keep, 1.5)
    torch.library.opcheck(_mix_experts_backward_op, (torch.randn(64, 80, device=device), torch.randn_like(w), x, keep,
                                                     router, A, B, h, w, 1.5, [True] * 4))  # fmt: skip
    tokens, d_in, d_out = plan.parity
    samples = 4
    xs = torch.randn(samples, tokens // samples, d_in, generator=torch.Generator().manual_seed(0)).to(device)
    task_types = torch.tensor([1, 0, 1, 0], device=device)
    errors, over = {}, {}
    for mode, bf16 in (("fp32", False), ("bf16_autocast", True)):
        _, fused, _ = _layer_pair(d_in, d_out, plan, 0.0, device)
        fused.train()
        fused._blc_sink = []
        runs = []
        for module in (fused, torch.compile(fused, fullgraph=True, backend=plan.compile_backend)):
            fused.zero_grad(set_to_none=True)
            out = _layer_losses(module, fused._blc_sink, xs, task_types, bf16)
            runs.append(out + [p.grad for p in (fused.loramoe_A["default"], fused.loramoe_B["default"],
                                                fused.loramoe_router["default"])])  # fmt: skip
        names = ["y", "lbc", "grad_x", "grad_A", "grad_B", "grad_router"]
        errors[mode] = {k: _rel(a, b) for k, a, b in zip(names, *runs)}
        limit = 1e-4 if not bf16 else 2e-2
        over.update({f"{mode}.{k}": v for k, v in errors[mode].items() if not v < limit})
        torch._dynamo.reset()

    torch.manual_seed(0)
    _, fused, _ = _layer_pair(d_in, d_out, plan, 0.05, device)
    base = fused.base_layer
    x = torch.randn(1, plan.compile_tokens, d_in, device=device, requires_grad=True)
    grad = torch.randn(1, plan.compile_tokens, d_out, device=device)

    def step(module: nn.Module, owner: nn.Module) -> Callable[[], None]:
        return _fwd_bwd(module, owner, x, grad, device, True)

    fns = {"base eager": step(base, base), "loramoe eager": step(fused.train(), fused),
           "base compiled": step(torch.compile(base, backend=plan.compile_backend), base),
           "loramoe compiled": step(torch.compile(fused, fullgraph=True, backend=plan.compile_backend), fused)}  # fmt: skip
    compile_s = {}
    for name in ("base compiled", "loramoe compiled"):
        start = time.perf_counter()
        fns[name]()
        compile_s[name] = time.perf_counter() - start
    pairs = [("loramoe compiled", "loramoe eager"), ("base compiled", "base eager"), ("loramoe eager", "base eager"),
             ("loramoe compiled", "base compiled")]  # fmt: skip
    timing = time_interleaved(fns, plan.bench_rounds, plan.min_seconds, pairs)
    torch._dynamo.reset()
    return {"status": "failed" if over else "passed", "opcheck": "passed", "backend": plan.compile_backend,
            "relative_error_vs_eager": errors, "over_limit": over,
            "timing": {"tokens": plan.compile_tokens, "in": d_in, "out": d_out, "mode": "bf16 autocast, dropout 0.05",
                       "ms": timing.ms, "ratios": timing.ratios, "first_call_s": compile_s}}  # fmt: skip


def train_compile(plan: Plan, device: torch.device, workdir: Path) -> dict:
    if plan.reduced:
        return {"status": "skipped: reduced mode (compiling a model takes minutes on a CPU; tests/test_compile.py "
                          "trains compiled against eager)"}  # fmt: skip
    data = _write_data(workdir / "fixed.jsonl", plan.batch * plan.steps, lambda i: plan.seq - OVERHEAD)
    options: dict[str, Any] = {"lora_dropout": 0.0}  # the same masks in both runs: none
    options |= {"dtype": "bfloat16"} if "dtype" in _train_fields() else {"bf16": True}
    eager = _train_run(plan, device, workdir, "eager", data, **options)
    compiled = _train_run(plan, device, workdir, "compiled", data, compile=True, **options)
    diffs = [abs(a - b) / abs(b) for a, b in zip(compiled["lm_loss"], eager["lm_loss"])]
    ok = max(diffs) < 1e-2  # bf16: the compiled kernels round in other places
    return {"status": "passed" if ok else "failed", "model": plan.model, "lm_loss_max_rel_diff": max(diffs),
            "limit": 1e-2, "eager": eager, "compiled": compiled,
            "compiled_over_eager_tokens_per_s": compiled["tokens_per_s"] / eager["tokens_per_s"]}  # fmt: skip


# ---- driver ----------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json")
    parser.add_argument("--reduced", action="store_true", help="tiny shapes (automatic without CUDA)")
    parser.add_argument("--budget", type=float, default=450.0, help="seconds; later sections are skipped after it")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    plan = reduced_plan() if args.reduced or device.type != "cuda" else full_plan()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 parity means fp32 products
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    report: dict[str, Any] = {"plan": asdict(plan), "command": "python -m benchmarks.gpu_check"
                              + (" --reduced" if args.reduced else ""), "complete": False}  # fmt: skip
    path = args.out / "gpu_check.json"
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        sections: list[tuple[str, Callable[[], dict]]] = [
            ("environment", lambda: environment(device)),
            ("parity", lambda: parity(plan, device)),
            ("layer_benchmark", lambda: layer_benchmark(plan, device)),
            ("nf4", lambda: nf4(plan, device, workdir)),
            ("train_packed", lambda: train_packed(plan, device, workdir)),
            ("compile_layer", lambda: compile_layer(plan, device)),
            ("train_compile", lambda: train_compile(plan, device, workdir)),
        ]
        for name, run in sections:
            elapsed = time.perf_counter() - start
            if elapsed > args.budget:
                report[name] = {"status": f"skipped: time budget ({elapsed:.0f} s of {args.budget:.0f} s used)"}
                continue
            section_start = time.perf_counter()
            try:
                report[name] = run()
            except Exception as e:  # one section's failure must not lose the others' results
                report[name] = {"status": f"error: {type(e).__name__}: {e}",
                                "traceback": traceback.format_exc().splitlines()[-12:]}  # fmt: skip
            report[name]["seconds"] = time.perf_counter() - section_start
            print(f"{name}: {report[name]['status']} ({report[name]['seconds']:.1f} s)", flush=True)
            path.write_text(json.dumps(report, indent=1, default=str))  # a run cut short keeps what it measured
    report["seconds"] = time.perf_counter() - start
    names = [name for name, _ in sections]
    report["ok"] = not any(report[n]["status"].startswith(("failed", "error")) for n in names)
    report["complete"] = True
    path.write_text(json.dumps(report, indent=1, default=str))
    print(f"{'ok' if report['ok'] else 'NOT ok'}: {report['seconds']:.0f} s; wrote {path}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
