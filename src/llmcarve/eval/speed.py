"""Prefill and decode throughput and peak memory, measured the same way for every model.

Numbers from this module are for side-by-side comparison within one run on one machine; the
benchmarks in bench/ are where speed claims are made.
"""

from __future__ import annotations

import resource
import statistics
import time

import torch
from transformers import DynamicCache


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up: first calls pay for allocation and kernel selection
    times = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        fn()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.inference_mode()
def measure_speed(model, vocab_size: int, prefill_tokens: int = 512, decode_tokens: int = 32, repeats: int = 3, seed: int = 0) -> dict:
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab_size, (1, prefill_tokens), generator=generator).to(device)

    prefill_s = median_seconds(lambda: model(input_ids=prompt), repeats, device)

    def greedy_decode():
        # A plain KV-cached loop: one token per forward, batch 1, as a chat user sees it.
        cache = DynamicCache()
        out = model(input_ids=prompt[:, :16], past_key_values=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        for _ in range(decode_tokens):
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)

    decode_s = median_seconds(greedy_decode, repeats, device)
    report = {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "prefill_tokens": prefill_tokens,
        "prefill_tokens_per_s": prefill_tokens / prefill_s,
        "decode_tokens": decode_tokens,
        "decode_tokens_per_s": decode_tokens / decode_s,
    }
    if device.type == "cuda":
        report["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        # ru_maxrss is the process's peak resident set in KiB on Linux (includes the Python runtime).
        report["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return report
