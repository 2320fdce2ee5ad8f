"""The trained carved models on the CPU, as a user loads them: each MoE path of `CarvedForCausalLM`
against the dense model, side by side in one run (float32, batch 1).

Models come from a pipeline run's artifacts (`artifacts/model` and `artifacts/remove/<name>`): real
SmolLM2 weights with the routers ToMoE trained. Per model and path: prefill of P tokens (one forward)
and greedy decoding of N tokens with `generate` (KV cache). Variants are timed in interleaved rounds
(every variant once per round) so that load from other processes falls on all of them alike; the
ratio is taken per round, and the median of the rounds is reported with its range.

Correctness first: every path's logits must match the masked reference on the same prompt (98% of
the tokens within 1e-4 relative; see check_paths), or the script stops before timing.
    PYTHONPATH=src python bench/carved_cpu.py --artifacts artifacts --out bench/results/carved_cpu.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import llmcarve  # noqa: F401  (registers the carved class with the Auto classes)

PATHS = ("auto", "sorted", "masked")


def token_errors(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Relative error of each token's logits."""
    return ((out - ref).norm(dim=-1) / ref.norm(dim=-1)).flatten()


@torch.inference_mode()
def check_paths(model, prompt: torch.Tensor, name: str) -> dict:
    """Per token, not over the whole tensor: a trained router has near-ties, and a rounding difference
    between paths (another summation order) can flip one token's expert, which changes that token's
    logits wholesale and, through attention, a little of every later token's. So at least 98% of the
    tokens must agree within 1e-4; the worst token and the share above 1e-4 are recorded."""
    model.config.moe_impl = "masked"
    reference = model(input_ids=prompt).logits
    report = {}
    for path in PATHS:
        model.config.moe_impl = path
        errors = token_errors(model(input_ids=prompt).logits, reference)
        report[path] = {"max_token_error": errors.max().item(), "share_of_tokens_over_1e-4": (errors > 1e-4).float().mean().item()}
    if max(entry["share_of_tokens_over_1e-4"] for entry in report.values()) > 0.02:
        sys.exit(f"{name}: a path's logits differ from the masked reference ({report}); not timing it")
    return report


@torch.inference_mode()
def prefill_s(model, prompt: torch.Tensor) -> float:
    start = time.perf_counter()
    model(input_ids=prompt, use_cache=False)
    return time.perf_counter() - start


@torch.inference_mode()
def decode_s(model, prompt: torch.Tensor, new_tokens: int) -> float:
    start = time.perf_counter()
    model.generate(prompt, do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    parser.add_argument("--models", nargs="+", default=["tomoe@0.5", "tomoe@0.7"])
    parser.add_argument("--prefill-tokens", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--decode-prompt", type=int, default=32)
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    missing = [p for p in [args.artifacts / "model", *(args.artifacts / "remove" / m for m in args.models)] if not p.is_dir()]
    if missing:
        sys.exit(f"no model directory at {', '.join(map(str, missing))}: run the pipeline (`make run`) or pass --artifacts")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    dense = AutoModelForCausalLM.from_pretrained(args.artifacts / "model", dtype=torch.float32).eval()
    carved = {name: AutoModelForCausalLM.from_pretrained(args.artifacts / "remove" / name, dtype=torch.float32).eval() for name in args.models}
    vocab = dense.config.vocab_size
    prompts = {tokens: torch.randint(0, vocab, (1, tokens)) for tokens in args.prefill_tokens}
    decode_prompt = torch.randint(0, vocab, (1, args.decode_prompt))
    result = {"date": dt.date.today().isoformat(), "device": f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
              "torch": torch.__version__, "threads": args.threads, "dtype": "float32", "batch": 1, "rounds": args.rounds,
              "command": "PYTHONPATH=src python " + " ".join(sys.argv), "weights": f"trained ({args.artifacts.resolve()})", "models": {}}
    for name, model in carved.items():
        result["models"][name] = {"logits_vs_masked": check_paths(model, prompts[max(prompts)], name)}

    # every (model, path) and the dense model, once per round, for each measurement
    variants = [("dense", dense, None)] + [(f"{name}/{path}", model, path) for name, model in carved.items() for path in PATHS]
    measurements = {f"prefill_{t}": (lambda m, t=t: prefill_s(m, prompts[t])) for t in args.prefill_tokens}
    measurements[f"decode_{args.decode_tokens}"] = lambda m: decode_s(m, decode_prompt, args.decode_tokens)
    times = {label: {measure: [] for measure in measurements} for label, _, _ in variants}
    for measure, run in measurements.items():
        for _, model, path in variants:  # warm-up: packing, caches, allocator
            if path:
                model.config.moe_impl = path
            run(model)
        for _ in range(args.rounds):
            for label, model, path in variants:
                if path:
                    model.config.moe_impl = path
                times[label][measure].append(run(model))
    for label, _, path in variants:
        if path is None:
            continue
        name = label.split("/")[0]
        row = result["models"][name].setdefault(path, {})
        for measure in measurements:
            ratios = [d / c for d, c in zip(times["dense"][measure], times[label][measure])]
            row[f"{measure}_s"] = statistics.median(times[label][measure])
            row[f"{measure}_speedup_vs_dense"] = statistics.median(ratios)
            row[f"{measure}_speedup_range"] = [min(ratios), max(ratios)]
    result["dense"] = {f"{measure}_s": statistics.median(times["dense"][measure]) for measure in measurements}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"{'model/path':22s} " + "  ".join(f"{m:>14s}" for m in measurements))
    for name in args.models:
        for path in PATHS:
            row = result["models"][name][path]
            print(f"{name + '/' + path:22s} " + "  ".join(f"{row[m + '_speedup_vs_dense']:13.2f}x" for m in measurements))


if __name__ == "__main__":
    main()
