"""One ToMoE training step against a plain dense step of the same shape, on a GPU.

- tomoe: a step of llmcarve's trainer (train_tomoe): teacher forward (no grad), masked student forward
  with Gumbel masks, the four loss parts, backward into the hypernetwork/heads, AdamW, logging syncs.
  The student runs torch.compile'd, hooks included, as the trainer does by default on a GPU.
  Timed from the trainer's own per-step callback; the first steps (compiling) are left out.
- dense: the same model's teacher forward (no grad), then forward + backward of the same
  distillation loss with gradients flowing through every layer (to the input embeddings: the frozen
  weights get none, as in ToMoE), and one .item() as the trainer logs.
Random weights at the real shapes (speed and memory do not depend on the values). Also records peak
memory and the projected time of 20,000 steps of 2048 tokens.
    cd bench && PYTHONPATH=../src python train_step.py --out results/train_step_h100.json   (--profile: launches and kernel time)
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from decode_speed import SHAPES, llama_config
from timing import profile_totals
from llmcarve.methods.tomoe import losses
from llmcarve.methods.tomoe.trainer import ToMoEConfig, train_tomoe

RUNS = {  # shape: (dtype, batch, tokens per sequence)
    "smollm2-135m": ("float32", 8, 512),  # as bench/tomoe_gpu_run.py trains it
    "llama2-7b": ("bfloat16", 1, 2048),
}
STEPS, SKIP = 10, 3
DEVICE = "cuda"


def build(shape: str, dtype: torch.dtype) -> LlamaForCausalLM:
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(DEVICE):
            model = LlamaForCausalLM(llama_config(SHAPES[shape]))
    finally:
        torch.set_default_dtype(previous)
    return model.eval().requires_grad_(False)


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def dense_step_seconds(model, blocks: torch.Tensor, batch: int) -> list[float]:
    times = []
    for step in range(STEPS):
        ids = blocks[step * batch : (step + 1) * batch].to(DEVICE)
        sync()
        start = time.perf_counter()
        with torch.no_grad():
            teacher = model(input_ids=ids).logits
        embeds = model.model.embed_tokens(ids).detach().requires_grad_()
        loss = losses.distillation(model(inputs_embeds=embeds).logits, teacher)
        loss.backward()
        loss.item()
        sync()
        times.append(time.perf_counter() - start)
    return times[SKIP:]


def tomoe_step_seconds(model, blocks: torch.Tensor, batch: int) -> list[float]:
    stamps = []
    config = ToMoEConfig(steps=STEPS + 1, batch_size=batch, checkpoint_every=10**6)
    with tempfile.TemporaryDirectory() as scratch:
        train_tomoe(model, blocks, config, Path(scratch), on_step=lambda *_: (sync(), stamps.append(time.perf_counter())))
    return [b - a for a, b in zip(stamps[SKIP:], stamps[SKIP + 1 :])]


def profiled(run_steps, steps: int) -> dict:
    """Per step: wall time, GPU kernel time and kernel launches, over `steps` profiled steps."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
        sync()
        start = time.perf_counter()
        run_steps()
        sync()
        wall = time.perf_counter() - start
    events = prof.key_averages()
    kernel_ms, launches = profile_totals(events)
    return {"wall_ms": wall * 1e3 / steps, "gpu_kernel_ms": kernel_ms / steps, "launches": launches / steps, "events": events}


def profile_steps(shape: str) -> None:
    """Why a ToMoE step costs what it does: kernel launches, GPU kernel time and wall time per step,
    the dense step beside it (both under the profiler, which slows the host side of each alike)."""
    dtype_name, batch, length = RUNS[shape]
    model = build(shape, getattr(torch, dtype_name))
    blocks = torch.randint(0, model.config.vocab_size, (STEPS * batch + batch, length))
    dense_step_seconds(model, blocks, batch)  # warm
    dense = profiled(lambda: dense_step_seconds(model, blocks, batch), STEPS)
    config = ToMoEConfig(steps=STEPS, batch_size=batch, checkpoint_every=10**6)
    with tempfile.TemporaryDirectory() as scratch:
        train_tomoe(model, blocks, config, Path(scratch) / "warm")
        tomoe = profiled(lambda: train_tomoe(model, blocks, config, Path(scratch) / "timed"), STEPS)
    for name, row in (("dense", dense), ("tomoe", tomoe)):
        print(f"--- {shape} {name} step: wall {row['wall_ms']:.0f} ms, GPU kernels {row['gpu_kernel_ms']:.0f} ms, "
              f"{row['launches']:.0f} kernel launches per step")
    print(tomoe["events"].table(sort_by="self_cpu_time_total", row_limit=10, max_name_column_width=50))


def bench(shape: str) -> dict:
    dtype_name, batch, length = RUNS[shape]
    model = build(shape, getattr(torch, dtype_name))
    blocks = torch.randint(0, model.config.vocab_size, (STEPS * batch + batch, length))
    row = {"dtype": dtype_name, "batch": batch, "seq_len": length, "tokens_per_step": batch * length}
    for name, timer in (("dense", dense_step_seconds), ("tomoe", tomoe_step_seconds)):
        gc.collect()
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        seconds = timer(model, blocks, batch)
        row[f"{name}_step_s"] = statistics.median(seconds)
        row[f"{name}_step_s_all"] = seconds
        if DEVICE == "cuda":
            row[f"{name}_peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    row["tomoe_over_dense"] = row["tomoe_step_s"] / row["dense_step_s"]
    row["projected_hours_20000_steps_of_2048_tokens"] = row["tomoe_step_s"] * (2048 / (batch * length)) * 20000 / 3600
    print(f"{shape}: " + "  ".join(f"{k} {v:.3f}" for k, v in row.items() if isinstance(v, float)), flush=True)
    del model
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="the results JSON (required unless --profile)")
    parser.add_argument("--shapes", nargs="+", default=list(RUNS))
    parser.add_argument("--profile", action="store_true", help="only print a profile of ToMoE steps (no JSON)")
    args = parser.parse_args()
    if not args.profile and not args.out:
        parser.error("--out is required (the results JSON), unless --profile")
    if args.profile:
        for shape in args.shapes:
            profile_steps(shape)
        return
    result = {"date": dt.date.today().isoformat(), "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
              "torch": torch.__version__, "command": "cd bench && PYTHONPATH=../src python " + " ".join(sys.argv),
              "weights": "random at the real shapes", "steps_timed": STEPS - SKIP, "runs": {}}
    for shape in args.shapes:
        result["runs"][shape] = bench(shape)
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
