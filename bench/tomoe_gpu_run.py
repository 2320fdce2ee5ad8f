"""ToMoE against the static baseline on a GPU: the README's quality table for the embedded SmolLM2.

Trains ToMoE at each budget with a wall-clock budget per run (steps = what fits, recorded), converts
to the deterministic MoE model, and measures held-out perplexity next to dense and static pruning at
the same budgets, with the same protocol as `make run` (BoolQ Wikipedia passages, 512-token
non-overlapping windows, no BOS, first 64 windows). Also times prefill of dense vs carved models.

Inputs are prepared on a CPU machine by `bench/prepare_gpu_inputs.py` (token blocks only, so the GPU
side needs torch, transformers, safetensors and gguf):
    python bench/tomoe_gpu_run.py --gguf SmolLM2.gguf --inputs .gpudata --minutes 3 --out results.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from llmcarve.calibration import collect_channel_stats
from llmcarve.eval.accounting import parameter_report
from llmcarve.eval.perplexity import Protocol, perplexity
from llmcarve.methods.baselines.static import prune_static
from llmcarve.methods.tomoe.convert import convert_to_moe
from llmcarve.methods.tomoe.trainer import ToMoEConfig, train_tomoe
from llmcarve.models.loading import load_model, materialize

PROTOCOL = Protocol(seq_len=512, max_windows=64)


def heldout_ppl(model, tokens: list[int]) -> float:
    return perplexity(model, tokens, PROTOCOL, progress=False)["ppl"]


@torch.inference_mode()
def prefill_ms(model, tokens: int, batch: int = 1, repeats: int = 20) -> float:
    ids = torch.randint(0, model.config.vocab_size, (batch, tokens), device="cuda")
    for _ in range(3):
        model(input_ids=ids)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        model(input_ids=ids)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def steps_that_fit(model, blocks, config: ToMoEConfig, seconds: float, scratch: Path) -> int:
    """Time a short probe run, leaving out its first steps (allocation and kernel selection)."""
    probe = ToMoEConfig(**{**config.__dict__, "steps": 16, "checkpoint_every": 1000})
    stamps = []
    train_tomoe(model, blocks, probe, scratch, on_step=lambda *_: stamps.append(time.perf_counter()))
    per_step = (stamps[-1] - stamps[3]) / (len(stamps) - 4)
    return max(20, int(seconds / per_step))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", required=True)
    parser.add_argument("--inputs", required=True, help="folder written by bench/prepare_gpu_inputs.py")
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.7])
    parser.add_argument("--minutes", type=float, default=3.0, help="training wall time per budget")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False  # evaluate in true fp32, as on the CPU

    model_dir = materialize(args.gguf if args.gguf.endswith(".gguf") else args.gguf, "/tmp/llmcarve-model")
    inputs = load_file(Path(args.inputs) / "inputs.safetensors")
    train_blocks, heldout = inputs["train_blocks"].long(), inputs["heldout_tokens"].tolist()
    dense, _ = load_model(model_dir, "float32", "cuda")
    results = {
        "date": dt.date.today().isoformat(),
        "device": torch.cuda.get_device_name(),
        "command": "python bench/tomoe_gpu_run.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()),
        "protocol": PROTOCOL.describe() | {"corpus": "BoolQ Wikipedia passages"},
        "train_tokens_available": train_blocks.numel(),
        "models": {"dense": {"ppl": heldout_ppl(dense, heldout), **parameter_report(dense, 512)}},
    }
    stats = collect_channel_stats(dense, train_blocks[:64].cuda(), batch_size=8, progress=False)
    dense_cpu, _ = load_model(model_dir, "float32", "cpu")  # carving slices weights on the CPU
    for p in args.budgets:
        static = prune_static(dense_cpu, stats, p).cuda().eval()
        results["models"][f"static@{p:g}"] = {"ppl": heldout_ppl(static, heldout), **parameter_report(static, 512)}
        del static
    Path(args.out).write_text(json.dumps(results, indent=2))
    trainee, _ = load_model(model_dir, "bfloat16", "cuda")
    for p in args.budgets:
        config = ToMoEConfig(p=p, steps=1, batch_size=args.batch_size, lr=args.lr, checkpoint_every=10**9)
        steps = steps_that_fit(trainee, train_blocks, config, args.minutes * 60, Path(f"/tmp/probe-{p}"))
        config = ToMoEConfig(**{**config.__dict__, "steps": steps})
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        result = train_tomoe(trainee, train_blocks, config, Path(f"/tmp/ckpt-{p}"))
        seconds = time.perf_counter() - start
        moe = convert_to_moe(dense_cpu, result.heads.float().cpu(), config.offset, result.v_topk).cuda().eval()
        history = result.history
        results["models"][f"tomoe@{p:g}"] = {
            "ppl": heldout_ppl(moe, heldout),
            **parameter_report(moe, 512),
            "training": {
                "steps": steps, "batch_size": args.batch_size, "seq_len": train_blocks.shape[1], "lr": args.lr,
                "tokens": steps * args.batch_size * train_blocks.shape[1], "seconds": seconds,
                "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30,
                "final_ratio": history[-1]["ratio"],
                "kd_first_last": [history[0]["kd"], sum(h["kd"] for h in history[-20:]) / min(20, len(history))],
                "kd_curve": [round(sum(h["kd"] for h in history[i : i + max(1, steps // 20)]) / len(history[i : i + max(1, steps // 20)]), 4) for i in range(0, steps, max(1, steps // 20))],
                "ratio_curve": [round(history[i]["ratio"], 4) for i in range(0, steps, max(1, steps // 20))],
            },
        }
        moe = moe.to(torch.bfloat16)  # prefill timed in bf16, as served
        for impl in ("masked", "sorted"):
            moe.config.moe_impl = impl
            results["models"][f"tomoe@{p:g}"][f"prefill_ms_2048_bf16_{impl}"] = prefill_ms(moe, 2048)
        del moe
        Path(args.out).write_text(json.dumps(results, indent=2))  # keep what is done if the run is cut short
    results["prefill_ms_2048_bf16"] = {"dense": prefill_ms(dense.to(torch.bfloat16), 2048)}
    for name, report in results["models"].items():
        print(f"{name:12s} ppl {report['ppl']:8.2f}  active_ratio {report['active_ratio']:.3f}")
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
