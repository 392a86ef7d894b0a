"""Where the time goes: torch.profiler tables for the targets' layer case and for decoding.

    python -m benchmarks.profile_ops             # layer 1024 -> 2752, 2048 tokens, N = 6: base, lora, loramoe
    python -m benchmarks.profile_ops --decode    # 32 generated tokens of the benchmark model: base, loramoe
"""

from __future__ import annotations

import argparse

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from .layer_bench import LayerCase
from .methods import build_layer
from .model_bench import ModelCase, Runner, _base_model


def _table(fn, repeats: int, rows: int) -> str:
    for _ in range(2):
        fn()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(repeats):
            fn()
    return prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=rows)


def layer_tables(case: LayerCase, methods: list[str], repeats: int = 3, rows: int = 18) -> dict[str, str]:
    torch.manual_seed(0)
    base = nn.Linear(case.d_in, case.d_out, bias=False).requires_grad_(False)
    x = torch.randn(1, case.tokens, case.d_in, requires_grad=True)
    grad = torch.randn(1, case.tokens, case.d_out)
    tables = {}
    for method in methods:
        layer = build_layer(method, base, case.n_experts, case.r, case.dropout).train()

        def step(layer=layer) -> None:
            x.grad = None
            layer.zero_grad(set_to_none=True)
            layer(x).backward(grad)

        tables[method] = _table(step, repeats, rows)
    return tables


def decode_tables(case: ModelCase, methods: list[str], rows: int = 18) -> dict[str, str]:
    base = _base_model(case)
    return {m: _table(Runner(m, base, case, case.n_experts).generate, 1, rows) for m in methods}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_ops", description=__doc__.splitlines()[0])
    parser.add_argument("--decode", action="store_true", help="profile generate() instead of the layer")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.decode:
        tables = decode_tables(ModelCase(), ["base", "loramoe"])
    else:
        tables = layer_tables(LayerCase(6, 2048, 1024, 2752), ["base", "lora", "loramoe"])
    for method, table in tables.items():
        print(f"== {method}\n{table}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
