"""Prefill on a GPU through the product class: `CarvedForCausalLM` as `from_pretrained` gives it
(moe_impl "auto") against the dense `LlamaForCausalLM`, whole model, eager, batch 1.

Random weights at the real shapes (see decode_speed.py: speed does not depend on the values; the
random router spreads tokens over the experts). The carved model is ToMoE-shaped at p = 0.5: every MLP
top-1 of 8 experts, each a random half of the channels; Q/K keep half of each head's dims; V keeps
every dim with a per-token mask of at most half. Also timed: the carved model's reference MoE path
("masked"). The former default, "sorted", is left out: its cached per-expert slices would hold
another four MLPs' worth of weights (8 half-width experts), and dense + carved + both caches of the
LLaMA-2-7B shape pass 80 GB; bench/moe_layer.py times it at the layer.

Correctness before timing: on the model's own hidden states (captured at 1, 16 and the largest token
count, so each of auto's three algorithms runs), every layer's auto MLP must match the masked
reference; the end-to-end logit difference is recorded (bf16 routing ties flip, see decode_speed.py).

Timing: per token count, rounds that interleave the variants (dense, auto, masked), each
round a median of CUDA-event timings over fresh random prompts; the ratio is dense time / carved
time per round, and the median of the rounds is reported with its range.
    cd bench && PYTHONPATH=../src python prefill_product.py --out results/prefill_product_h100.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import statistics
import sys

import torch
from decode_speed import SHAPES, build, carved_config, llama_config, randomise_experts, relative_error
from timing import cuda_event_ms
from transformers import LlamaForCausalLM

from llmcarve.models.carved import CarvedForCausalLM

CARVED_PATHS = ("auto", "masked")
TOKENS = (512, 2048, 4096)
ROUNDS, REPEATS = 5, 5


@torch.inference_mode()
def check_auto_path(model: CarvedForCausalLM, name: str) -> dict:
    """Exits (no timing) if an auto MLP differs from the masked reference on real activations."""
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, max(TOKENS)), device="cuda")
    captured = []
    hooks = [layer.mlp.register_forward_pre_hook(lambda _m, args: captured.append(args[0])) for layer in model.model.layers]
    model.config.moe_impl = "masked"
    masked_logits = model(input_ids=ids[:, :64], use_cache=False).logits
    captured.clear()
    model(input_ids=ids, use_cache=False)
    for hook in hooks:
        hook.remove()
    worst = 0.0
    for layer, hidden in zip(model.model.layers, captured):
        for rows in (hidden[:, :1], hidden[:, :16], hidden):
            model.config.moe_impl = "masked"
            reference = layer.mlp(rows)
            model.config.moe_impl = "auto"
            worst = max(worst, relative_error(layer.mlp(rows), reference))
    if worst > 1e-2:
        sys.exit(f"{name}: the auto MLP differs from the masked reference ({worst:.2e}); not timing it")
    auto_logits = model(input_ids=ids[:, :64], use_cache=False).logits
    return {"max_mlp_relative_error_auto_vs_masked": worst,
            "logit_relative_error_auto_vs_masked_64_tokens": relative_error(auto_logits, masked_logits)}


@torch.inference_mode()
def prefill_ms(model, tokens: int) -> float:
    prompts = [torch.randint(0, model.config.vocab_size, (1, tokens), device="cuda") for _ in range(REPEATS)]
    model(input_ids=prompts[0], use_cache=False)  # warm: packing, autotuning, allocator
    times = []
    for prompt in prompts:
        times += cuda_event_ms(lambda: model(input_ids=prompt, use_cache=False), 1)
    return statistics.median(times)


def bench_shape(name: str) -> dict:
    config = llama_config(SHAPES[name])
    dense = build(LlamaForCausalLM, config)
    dense_bytes = torch.cuda.memory_allocated()
    carved = build(CarvedForCausalLM, carved_config(config, moe=True))
    randomise_experts(carved)
    row = {"check": check_auto_path(carved, name)}
    carved.config.moe_impl = "auto"
    prefill_ms(carved, 16)  # packs every layer's experts once
    row["memory_gb"] = {"dense": dense_bytes / 2**30, "carved_with_packed_experts": (torch.cuda.memory_allocated() - dense_bytes) / 2**30}
    for tokens in TOKENS:
        rounds = {variant: [] for variant in ("dense", *CARVED_PATHS)}
        for _ in range(ROUNDS):
            rounds["dense"].append(prefill_ms(dense, tokens))
            for path in CARVED_PATHS:
                carved.config.moe_impl = path
                rounds[path].append(prefill_ms(carved, tokens))
        entry = {f"{variant}_ms": statistics.median(times) for variant, times in rounds.items()}
        for path in CARVED_PATHS:
            ratios = [d / c for d, c in zip(rounds["dense"], rounds[path])]
            entry[f"speedup_{path}_vs_dense"] = statistics.median(ratios)
            entry[f"speedup_{path}_vs_dense_range"] = [min(ratios), max(ratios)]
        row[str(tokens)] = entry
        print(f"{name} {tokens:5d} tokens: dense {entry['dense_ms']:.2f} ms  "
              + "  ".join(f"{p} {entry[p + '_ms']:.2f} ms ({entry['speedup_' + p + '_vs_dense']:.2f}x)" for p in CARVED_PATHS), flush=True)
    del dense, carved
    gc.collect()
    torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    args = parser.parse_args()
    result = {"date": dt.date.today().isoformat(), "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "dtype": "bfloat16", "command": "cd bench && PYTHONPATH=../src python " + " ".join(sys.argv),
              "weights": "random at the real shapes", "batch": 1, "rounds": ROUNDS, "repeats_per_round": REPEATS,
              "models": {}}
    for name in args.shapes:
        result["models"][name] = bench_shape(name)
        with open(args.out, "w") as handle:  # after each shape, so a cut-off run keeps what it measured
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
